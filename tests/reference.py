"""Brute-force, step-by-step references for TBPTT(k1, k2), written straight from SPEC.md.

The model is called one time step at a time, each update rebuilds its whole window from scratch, and
parameter versions are explicit copies. Slow on purpose: nothing here shares code with the trainer.
"""

import torch
from torch.func import functional_call

from ignite_tbptt.trainer import _detach_hidden


def _step(model, theta, x_t, hidden):
    args = (x_t,) if hidden is None else (x_t, hidden)
    return functional_call(model, theta, args)


def reference_trajectory(model, x, y, k1, k2, overlap, lr, loss_fn, dim=0):
    """Parameters after every SGD update of TBPTT(k1, k2) over one sequence, as a list of dicts."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    T, o = x.shape[dim], k2 - k1
    step_x = [x.narrow(dim, i, 1) for i in range(T)]
    states = {0: None}  # states[t]: the state after step t, as the latest run computed it
    versions = {}  # versions[t]: the parameters the single forward pass used at step t ("retain")
    trajectory = []
    for s in range(0, T, k1):
        t, w = min(s + k1, T), max(0, s - o)
        if overlap == "retain":
            hidden = states[s]
            for i in range(s, t):
                versions[i] = {n: v.clone() for n, v in params.items()}
                _, hidden = _step(model, versions[i], step_x[i], hidden)
                states[i + 1] = _detach_hidden(hidden)
            thetas = [{n: v.clone().requires_grad_() for n, v in versions[i].items()} for i in range(w, t)]
        else:
            current = {n: v.clone().requires_grad_() for n, v in params.items()}
            thetas = [current] * (t - w)
        hidden, outputs = states[w], []
        for i in range(w, t):
            y_pred, hidden = _step(model, thetas[i - w], step_x[i], hidden)
            if overlap != "retain":
                states[i + 1] = _detach_hidden(hidden)
            if i >= s:
                outputs.append(y_pred)
        loss = loss_fn(torch.cat(outputs, dim), y.narrow(dim, s, t - s))
        unique = list({id(th): th for th in thetas}.values())
        leaves = [th[n] for th in unique for n in params]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        total = {n: torch.zeros_like(v) for n, v in params.items()}
        for (n, g) in zip([n for _ in unique for n in params], grads):
            if g is not None:
                total[n] += g
        params = {n: params[n] - lr * total[n] for n in params}
        trajectory.append(params)
    return trajectory
