"""Small float64 models of the state layouts people carry today, written here for the state-protocol tests.

Each takes ``x`` of shape ``(time, batch, features)`` and returns ``(y_pred, hidden)``. Each says where its
state keeps the batch (``batch_dims``) and, where it is not zeros, what a fresh state is (``fresh``).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def _log_g(v):
    """log of minGRU's positive activation g(v) = v + 0.5 (v >= 0), sigmoid(v) (v < 0)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


class MinGRU(nn.Module):
    """minGRU in log space (Feng et al. 2024): the state is ``log h``, ``(B, H)``, and a fresh ``h`` is 0.5.

    ``parallel=True`` runs a chunk as one log-space scan from its initial state, ``False`` step by step: the
    two are the same function.
    """

    batch_dims = 0
    H0 = 0.5

    def __init__(self, n_in=2, n_hidden=3, n_out=2, parallel=True):
        super().__init__()
        self.gate, self.cand, self.head = nn.Linear(n_in, n_hidden), nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_out)
        self.n_hidden, self.parallel = n_hidden, parallel

    def fresh(self, batch, like):
        return like.new_full((batch, self.n_hidden), math.log(self.H0))

    @staticmethod
    def reset(hidden, keep):
        return torch.where(keep.unsqueeze(1), hidden, torch.full_like(hidden, math.log(MinGRU.H0)))

    def forward(self, x, hidden=None):
        log_h = self.fresh(x.shape[1], x) if hidden is None else hidden
        k = self.gate(x)
        log_z, log_keep = -F.softplus(-k), -F.softplus(k)  # log z, log (1 - z)
        log_b = log_z + _log_g(self.cand(x))
        if self.parallel:
            a_star = log_keep.cumsum(0)
            terms = torch.cat([log_h.unsqueeze(0), log_b - a_star])
            states = a_star + torch.logcumsumexp(terms, 0)[1:]
        else:
            steps = []
            for t in range(x.shape[0]):
                log_h = torch.logaddexp(log_keep[t] + log_h, log_b[t])
                steps.append(log_h)
            states = torch.stack(steps)
        return self.head(states.exp()), states[-1]


class SelectiveSSM(nn.Module):
    """A Mamba-style diagonal selective SSM after a short causal convolution, run as a chunked scan.

    State: ``{"ssm": (B, D, N), "conv": (B, D, K - 1)}``, batch at axis 0. A chunk of ``L`` steps is one scan
    from its initial state through an ``L x L`` matrix of decays, as Mamba-2's chunked scan does.
    """

    batch_dims = {"ssm": 0, "conv": 0}

    def __init__(self, n_in=2, d=3, n=2, k=3, n_out=2):
        super().__init__()
        self.inp, self.conv = nn.Linear(n_in, d), nn.Parameter(torch.randn(d, k) * 0.5)
        self.dt, self.b, self.c = nn.Linear(d, d), nn.Linear(d, n), nn.Linear(d, n)
        self.a_log, self.skip = nn.Parameter(torch.rand(d, n).log()), nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, n_out)
        self.d, self.n, self.k = d, n, k

    def forward(self, x, hidden=None):
        T, B, _ = x.shape
        u = self.inp(x).permute(1, 2, 0)  # (B, D, T)
        conv_state = u.new_zeros(B, self.d, self.k - 1) if hidden is None else hidden["conv"]
        h0 = u.new_zeros(B, self.d, self.n) if hidden is None else hidden["ssm"]
        padded = torch.cat([conv_state, u], 2)
        u = F.silu(F.conv1d(padded, self.conv.unsqueeze(1), groups=self.d))  # (B, D, T)
        ut = u.permute(0, 2, 1)  # (B, T, D)
        dt = F.softplus(self.dt(ut))  # (B, T, D)
        decay = dt.unsqueeze(-1) * -self.a_log.exp()  # (B, T, D, N): log of each step's decay
        cum = decay.cumsum(1)
        seg = cum.unsqueeze(2) - cum.unsqueeze(1)  # seg[:, t, s] = sum of decays over (s, t]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        weights = torch.where(causal.view(1, T, T, 1, 1), seg, torch.full_like(seg, -math.inf)).exp()
        inputs = (dt * ut).unsqueeze(-1) * self.b(ut).unsqueeze(2)  # (B, T, D, N)
        states = torch.einsum("btsdn,bsdn->btdn", weights, inputs) + cum.exp() * h0.unsqueeze(1)
        y = torch.einsum("btdn,btn->btd", states, self.c(ut)) + self.skip * ut
        hidden = {"ssm": states[:, -1], "conv": padded[:, :, -(self.k - 1):]}
        return self.head(y).transpose(0, 1), hidden


class MemoryBlock(nn.Module):
    """A Transformer-XL memory block: a chunk attends causally over ``[memory; chunk]``, and the memory keeps
    the last ``M`` hidden vectors. It starts empty, grows to ``(B, M, d)``, and its output depends on where the
    stream is cut into calls."""

    batch_dims = 0

    def __init__(self, n_in=2, d=4, n_out=2, memory=4, distances=32):
        super().__init__()
        self.inp, self.q, self.k, self.v = nn.Linear(n_in, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(distances) * 0.1)  # a learnt score per distance back (Transformer-XL's
        self.head, self.memory = nn.Linear(d, n_out), memory  # relative positions, in their simplest form)

    def forward(self, x, hidden=None):
        h = torch.tanh(self.inp(x)).transpose(0, 1)  # (B, T, d)
        mem = h[:, :0] if hidden is None else hidden
        context = torch.cat([mem, h], 1)
        T, m = h.shape[1], mem.shape[1]
        scores = self.q(h) @ self.k(context).transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, T, m + T)
        back = torch.arange(T, device=x.device).unsqueeze(1) + m - torch.arange(m + T, device=x.device).unsqueeze(0)
        scores = scores + self.bias[back.clamp(0, len(self.bias) - 1)]
        attended = scores.masked_fill(back < 0, -math.inf).softmax(-1) @ self.v(context)
        out = h + attended
        return self.head(out).transpose(0, 1), torch.cat([mem, out], 1)[:, -self.memory:]


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
