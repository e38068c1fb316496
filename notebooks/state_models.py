"""The small reference models of notebook 05: minGRU, a selective SSM and a Transformer-XL memory block.

They live next to the notebooks so that a notebook opened from this folder, with only the package installed,
imports them (``from state_models import ...``); ``tests/state_models.py`` loads them from here, and the state
protocol tests check them against a float64 reference. Each takes ``x`` of shape ``(time, batch, features)`` and
returns ``(y_pred, hidden)``; each says where its state keeps the batch (``batch_dims``) and, where it is not
zeros, what a fresh state is (``fresh``).
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
