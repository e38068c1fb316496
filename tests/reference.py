"""Brute-force, step-by-step references for TBPTT(k1, k2), written straight from docs/contract.md.

The model is called one time step at a time, each update rebuilds its whole window from scratch, and
parameter versions are explicit copies. Slow on purpose: nothing here shares code with the trainer.
"""

import torch
from torch.func import functional_call

from ignite_tbptt.trainer import _detach_hidden


def _step(model, theta, x_t, hidden):
    args = (x_t,) if hidden is None else (x_t, hidden)
    return functional_call(model, theta, args)


def _zip_map(fn, *hiddens):
    """Apply ``fn`` to the matching tensors of hidden states of one structure (tensor, dict or sequence)."""
    first = hiddens[0]
    if isinstance(first, torch.Tensor):
        return fn(*hiddens)
    if isinstance(first, dict):
        return {k: _zip_map(fn, *(h[k] for h in hiddens)) for k in first}
    mapped = [_zip_map(fn, *parts) for parts in zip(*hiddens)]
    return type(first)(*mapped) if hasattr(first, "_fields") else type(first)(mapped)


def _by_sample(choose):
    """A tensor function that rebuilds its result sample by sample along the batch axis -2."""
    return lambda *ts: torch.stack([choose(b, *parts) for b, parts in enumerate(zip(*(t.unbind(-2) for t in ts)))], -2)


def _gated_step(model, theta, x_t, hidden, keep, valid, cut=None):
    """One step with per-sample resets (``keep[b]`` False: zero sample b first), padding (``valid[b]``) and the
    end of a burn-in (``cut[b]``: sample b's state is held constant from here)."""
    if keep is not None and hidden is not None:
        hidden = _zip_map(_by_sample(lambda b, h: h if keep[b] else torch.zeros_like(h)), hidden)
    if cut is not None and hidden is not None:
        hidden = _zip_map(_by_sample(lambda b, h: h.detach() if cut[b] else h), hidden)
    y_t, new = _step(model, theta, x_t, hidden)
    if valid is not None:
        old = hidden if hidden is not None else _zip_map(torch.zeros_like, new)
        new = _zip_map(_by_sample(lambda b, n, o: n if valid[b] else o), new, old)
    return y_t, new


def _compensate(hidden, factor):
    """``hidden`` with its gradient multiplied by ``factor`` (the value unchanged up to rounding)."""
    return _zip_map(lambda h: h * factor + h.detach() * (1 - factor), hidden)


def reference_trajectory(model, x, y, k1, k2, overlap, lr, loss_fn, dim=0, valid=None, resets=None, accumulate=1,
                         bounds=None, burn_in=0, windows=None, factors=None, rate_by_length=True):
    """Parameters after every SGD update of TBPTT(k1, k2) over one sequence, as a list of dicts.

    ``valid`` and ``resets`` (time-major ``(T, B)`` bools, ``dim=0`` only) mark padded steps and the steps
    before which a sample's state is zeroed; a chunk's loss is ``loss_fn`` over its valid (step, sample) pairs.
    With ``accumulate = N`` the parameters change after every N-th chunk, by the mean of the N chunks' gradients.
    ``bounds`` replays given chunks ``(s, t)`` instead of the ``k1`` grid (random lengths, with ``k1`` their
    ``bptt``); each update's rate is then ``lr * (t - s) / k1`` (``rate_by_length=False``: ``lr``). With ``burn_in = b`` every sample's first ``b``
    valid steps after its state starts afresh score nothing, and its state is held constant after them.
    ``windows`` gives each update's window start instead of ``max(0, s - (k2 - k1))`` (random truncation), and
    ``factors`` maps a position to the factor by which a backward pass that crosses it multiplies the state
    gradient (ARTBP's compensation).
    """
    keeps = [None] * x.shape[dim] if resets is None else [~r if r.any() else None for r in resets]
    valids = [None] * x.shape[dim] if valid is None else list(valid)
    warm, cuts = _burn_in(x.shape[dim], x.shape[1 - dim], valid, resets, burn_in)
    scored = None if not burn_in and valid is None else (~warm if valid is None else valid & ~warm)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    T, o = x.shape[dim], k2 - k1
    step_x = [x.narrow(dim, i, 1) for i in range(T)]
    states = {0: None}  # states[t]: the state after step t, as the latest run computed it
    versions = {}  # versions[t]: the parameters the single forward pass used at step t ("retain")
    trajectory = []
    pending = {n: torch.zeros_like(v) for n, v in params.items()}
    chunks = bounds if bounds is not None else [(s, min(s + k1, T)) for s in range(0, T, k1)]
    for c, (s, t) in enumerate(chunks):
        w = max(0, s - o) if windows is None else windows[c]
        rate = lr * (t - s) / k1 if bounds is not None and rate_by_length else lr
        if overlap == "retain":
            hidden = states[s]
            for i in range(s, t):
                versions[i] = {n: v.clone() for n, v in params.items()}
                _, hidden = _gated_step(model, versions[i], step_x[i], hidden, keeps[i], valids[i], cuts[i])
                states[i + 1] = _detach_hidden(hidden)
            thetas = [{n: v.clone().requires_grad_() for n, v in versions[i].items()} for i in range(w, t)]
        else:
            current = {n: v.clone().requires_grad_() for n, v in params.items()}
            thetas = [current] * (t - w)
        hidden, outputs = states[w], []
        for i in range(w, t):
            if factors and i > w and i in factors:
                hidden = _compensate(hidden, factors[i])
            y_pred, hidden = _gated_step(model, thetas[i - w], step_x[i], hidden, keeps[i], valids[i], cuts[i])
            if overlap != "retain":
                states[i + 1] = _detach_hidden(hidden)
            if i >= s:
                outputs.append(y_pred)
        y_pred, y_c = torch.cat(outputs, dim), y.narrow(dim, s, t - s)
        if scored is not None:
            if not scored[s:t].any():
                trajectory.append(params)  # nothing scored in the chunk: no update
                continue
            y_pred, y_c = y_pred[scored[s:t]], y_c[scored[s:t]]
        loss = loss_fn(y_pred, y_c)
        unique = list({id(th): th for th in thetas}.values())
        leaves = [th[n] for th in unique for n in params]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for (n, g) in zip([n for _ in unique for n in params], grads):
            if g is not None:
                pending[n] += g / accumulate
        if (c + 1) % accumulate == 0:
            params = {n: params[n] - rate * pending[n] for n in params}
            pending = {n: torch.zeros_like(v) for n, v in params.items()}
        trajectory.append(params)
    return trajectory


def _burn_in(T, B, valid, resets, burn_in):
    """Step by step: which (step, sample) pairs are warm-up, and before which steps a sample's warm-up ended."""
    warm = torch.zeros(T, B, dtype=torch.bool)
    cuts = [None] * T
    remaining, was_warm = [burn_in] * B, [False] * B
    for t in range(T):
        cut = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            reset = resets is not None and bool(resets[t, b])
            if reset:
                remaining[b] = burn_in
            warm[t, b] = remaining[b] > 0
            cut[b] = was_warm[b] and not warm[t, b] and not reset
            if warm[t, b] and (valid is None or valid[t, b]):
                remaining[b] -= 1
            was_warm[b] = bool(warm[t, b])
        cuts[t] = cut if cut.any() else None
    return warm, cuts


def _per_sample(hidden, fresh, dims, reset):
    """``hidden`` with sample ``b`` replaced by ``fresh``'s where ``reset[b]``, rebuilt sample by sample along each
    leaf's batch axis (``dims``: one int, or a dict of ints / nested dicts matching the hidden)."""
    if isinstance(hidden, dict):
        return {k: _per_sample(hidden[k], fresh[k], dims if isinstance(dims, int) else dims[k], reset) for k in hidden}
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(_per_sample(h, f, dims if isinstance(dims, int) else dims[i], reset)
                            for i, (h, f) in enumerate(zip(hidden, fresh)))
    rows = [f.detach() if reset[b] else h for b, (h, f) in enumerate(zip(hidden.unbind(dims), fresh.unbind(dims)))]
    return torch.stack(rows, dims)


def reference_chunked_trajectory(model, x, y, k1, k2, overlap, lr, loss_fn, resets=None, fresh=None, dims=0, chunks=None,
                                 windows=None, cuts=None):
    """Parameters after every SGD update of TBPTT(k1, k2), backpropagating through the chunked model.

    The model runs in the calls the forward pass makes: every ``k1``-step chunk, cut further before every step
    where some sample resets (``resets``: ``(T, B)`` bools, ``x`` time-first). ``k2 - k1`` must be a multiple of
    ``k1``, so every window starts at a call boundary. Each update rebuilds its window's calls from the state at
    the window start, which is held constant, with the parameters of the update (``"recompute"``) or those each
    call ran under (``"retain"``). A reset puts ``fresh(hidden)``'s value in the resetting samples, one sample at
    a time. ``chunks`` (``(s, t)`` pairs), ``windows`` (each update's window start) and ``cuts`` (where calls
    start, besides the chunk starts) replace the ``k1`` grid and its windows, for any ``k2``.
    """
    T, o = x.shape[0], k2 - k1
    if chunks is None:
        assert o % k1 == 0, "the chunked reference needs k2 - k1 to be a multiple of k1"
        chunks = [(s, min(s + k1, T)) for s in range(0, T, k1)]
    windows = [max(0, s - o) for s, _ in chunks] if windows is None else windows
    cuts = {s for s, _ in chunks} | set(cuts or ()) | (
        {int(t) for t in resets.any(1).nonzero().flatten()} if resets is not None else set())
    bounds = sorted(cuts | {T})
    calls = list(zip(bounds[:-1], bounds[1:]))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    states, versions, trajectory = {0: None}, {}, []

    def run(a, b, theta, hidden):
        if hidden is not None and resets is not None and resets[a].any():
            hidden = _per_sample(hidden, fresh(hidden), dims, resets[a])
        return functional_call(model, theta, (x[a:b],) if hidden is None else (x[a:b], hidden))

    for (s, t), w in zip(chunks, windows):
        if overlap == "retain":
            hidden = states[s]
            for a, b in [c for c in calls if s <= c[0] < t]:
                versions[a] = {n: v.clone() for n, v in params.items()}
                hidden = _detach_hidden(run(a, b, versions[a], hidden)[1])
                states[b] = hidden
        current = {n: v.clone().requires_grad_() for n, v in params.items()}
        hidden, outputs, thetas = states[w], [], []
        for a, b in [c for c in calls if w <= c[0] < t]:
            theta = current if overlap == "recompute" else {n: v.clone().requires_grad_() for n, v in versions[a].items()}
            thetas.append(theta)
            y_pred, hidden = run(a, b, theta, hidden)
            if overlap == "recompute":
                states[b] = _detach_hidden(hidden)
            if a >= s:
                outputs.append(y_pred)
        loss = loss_fn(torch.cat(outputs), y[s:t])
        unique = list({id(th): th for th in thetas}.values())
        grads = torch.autograd.grad(loss, [th[n] for th in unique for n in params], allow_unused=True)
        step = {n: torch.zeros_like(v) for n, v in params.items()}
        for n, g in zip([n for _ in unique for n in params], grads):
            if g is not None:
                step[n] += g
        params = {n: params[n] - lr * step[n] for n in params}
        trajectory.append(params)
    return trajectory
