"""Small float64 models of the state layouts people carry today, written here for the state-protocol tests.

Each takes ``x`` of shape ``(time, batch, features)`` and returns ``(y_pred, hidden)``. Each says where its
state keeps the batch (``batch_dims``) and, where it is not zeros, what a fresh state is (``fresh``).
"""

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn


# Notebook 05's models (minGRU, selective SSM, Transformer-XL memory) live in notebooks/state_models.py, beside
# the notebook, which imports them from its own folder with only the package installed; loaded from there by path
# (notebooks/ is no package), so that there is one copy.
_spec = importlib.util.spec_from_file_location(
    "notebook_state_models", Path(__file__).resolve().parents[1] / "notebooks" / "state_models.py"
)
_notebook_models = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_notebook_models)
MinGRU, SelectiveSSM, MemoryBlock = _notebook_models.MinGRU, _notebook_models.SelectiveSSM, _notebook_models.MemoryBlock


class XLSTMBlocks(nn.Module):
    """xLSTM-style blocks with exponential gating and a stabiliser: a dict of ``(c, n, m)`` per block, each
    ``(B, H)``, batch at 0. ``in_place=True`` updates the state it is given with ``copy_``, as xLSTM's step
    kernels do."""

    batch_dims = 0

    def __init__(self, n_in=2, n_hidden=3, n_out=2, blocks=2, in_place=False):
        super().__init__()
        sizes = [n_in] + [n_hidden] * blocks
        self.gates = nn.ModuleList(nn.Linear(a, 4 * n_hidden) for a in sizes[:-1])  # mLSTM: gates from the input
        self.head, self.n_hidden, self.in_place = nn.Linear(n_hidden, n_out), n_hidden, in_place

    def _fresh(self, batch, like):
        return {f"block{i}": {k: like.new_zeros(batch, self.n_hidden) for k in "cnm"} for i in range(len(self.gates))}

    def forward(self, x, hidden=None):
        state = self._fresh(x.shape[1], x) if hidden is None else hidden
        cells = {name: dict(cell) for name, cell in state.items()}
        outs = []
        for x_t in x.unbind(0):
            inp = x_t
            for i, gate in enumerate(self.gates):
                name, cell = f"block{i}", cells[f"block{i}"]
                i_pre, f_pre, z, o = gate(inp).chunk(4, 1)
                m = torch.maximum(f_pre + cell["m"], i_pre)
                i_g, f_g = (i_pre - m).exp(), (f_pre + cell["m"] - m).exp()
                cell.update(c=f_g * cell["c"] + i_g * torch.tanh(z), n=f_g * cell["n"] + i_g, m=m)
                inp = torch.sigmoid(o) * cell["c"] / cell["n"].clamp(min=1.0)
            outs.append(self.head(inp))
        if self.in_place and hidden is not None:
            for name, cell in cells.items():
                for key, value in cell.items():
                    hidden[name][key].copy_(value)
            return torch.stack(outs), hidden
        return torch.stack(outs), cells


class RWKVStyle(nn.Module):
    """An RWKV-style linear recurrence: per layer and head a ``(hs, hs)`` state with a learnt decay, kept as one
    tensor ``(layers, B, H, hs, hs)``: the batch at axis 1 of 5."""

    batch_dims = 1

    def __init__(self, n_in=2, layers=2, heads=2, hs=2, n_out=2):
        super().__init__()
        d = heads * hs
        self.inp = nn.Linear(n_in, d)
        self.rkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.decay = nn.Parameter(torch.randn(layers, heads, hs))
        self.head, self.shape = nn.Linear(d, n_out), (layers, heads, hs)

    def forward(self, x, hidden=None):
        layers, heads, hs = self.shape
        B = x.shape[1]
        state = x.new_zeros(layers, B, heads, hs, hs) if hidden is None else hidden
        inp, new_states = self.inp(x), []
        for layer, proj in enumerate(self.rkv):
            r, k, v = (t.view(x.shape[0], B, heads, hs) for t in proj(inp).chunk(3, -1))
            w = torch.sigmoid(self.decay[layer]).unsqueeze(-1)  # (H, hs, 1): decay of each key row
            s, outs = state[layer], []
            for t in range(x.shape[0]):
                s = w * s + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
                outs.append((r[t].unsqueeze(-2) @ s).squeeze(-2))
            inp = inp + torch.stack(outs).reshape(x.shape[0], B, heads * hs)
            new_states.append(s)
        return self.head(inp), torch.stack(new_states)


class CacheList(nn.Module):
    """mambapy's ``Mamba.step`` pattern: the state is a list with one cache ``(h, conv)`` per layer, and the model
    writes each layer's new cache into the list it is given (``caches[i] = ...``). A fresh cache is ``(None,
    zeros)``, as in mambapy: ``None`` until the layer's first step. With ``counter=True`` the state is a dict that
    also keeps ``"step"``, each sample's step count ``(B,)`` as an integer tensor, which the output reads, and an
    optional memory ``"memory"`` that stays ``None``. ``writes=False`` computes the same into a list of its own:
    the references run that twin, since they keep the states they hand the model."""

    batch_dims = 0

    def __init__(self, n_in=2, d=3, layers=2, n_out=2, counter=False, writes=True):
        super().__init__()
        self.cells = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(layers))
        self.inp, self.head, self.d = nn.Linear(n_in, d), nn.Linear(d, n_out), d
        self.counter, self.writes = counter, writes

    def fresh(self, batch, like):
        caches = [(None, like.new_zeros(batch, self.d)) for _ in self.cells]
        if not self.counter:
            return caches
        return {"caches": caches, "step": torch.zeros(batch, dtype=torch.long, device=like.device), "memory": None}

    def forward(self, x, hidden=None):
        state = self.fresh(x.shape[1], x) if hidden is None else hidden
        caches = state["caches"] if self.counter else state
        caches = caches if self.writes else list(caches)
        step = state["step"] if self.counter else None
        outs = []
        for x_t in x.unbind(0):
            u = self.inp(x_t)
            if step is not None:
                u = u + torch.cos(0.3 * step.to(u.dtype)).unsqueeze(1)
                step = step + 1
            for i, cell in enumerate(self.cells):
                h, conv = caches[i]
                h = torch.zeros_like(u) if h is None else h
                z, cand = cell(torch.cat([u, conv], 1)).chunk(2, 1)
                h = torch.sigmoid(z) * h + torch.tanh(cand)
                caches[i] = (h, u)  # written into the list it was given, as mambapy does
                u = h
            outs.append(self.head(u))
        if self.counter:
            return torch.stack(outs), {"caches": caches, "step": step, "memory": None}
        return torch.stack(outs), caches


def make_state_model(kind, seed=0, **kwargs):
    torch.manual_seed(seed)
    models = {"mingru": MinGRU, "ssm": SelectiveSSM, "memory": MemoryBlock, "xlstm": XLSTMBlocks, "rwkv": RWKVStyle,
              "caches": CacheList}
    return models[kind](**kwargs).double()
