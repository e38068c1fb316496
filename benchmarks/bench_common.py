"""Shared pieces of the benchmarks: models, hand-written TBPTT loops, the compute floor, timing and tables.

The hand-written loops are the baselines the trainer is compared against. They share no code with
``ignite_tbptt``; ``tests/test_benchmarks.py`` checks that they compute what the trainer computes.
All data is ``(time, batch, features)``.
"""

import copy
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmark this checkout's ignite_tbptt, installed or not
    sys.path.insert(0, ROOT)

MIB = 2 ** 20


class FusedLSTM(nn.Module):
    """One ``nn.LSTM`` call per chunk: cheap per step, one kernel over the whole chunk."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(n_in, n_hidden), nn.Linear(n_hidden, n_in)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


class CellGRU(nn.Module):
    """A Python loop over ``nn.GRUCell``: per-step overhead dominates."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.cell, self.head, self.n_hidden = nn.GRUCell(n_in, n_hidden), nn.Linear(n_hidden, n_in), n_hidden

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], self.n_hidden) if hidden is None else hidden
        outs = []
        for x_t in x.unbind(0):
            h = self.cell(x_t, h)
            outs.append(h)
        return self.head(torch.stack(outs)), h


class WordLM(nn.Module):
    """A word-level language model: embedding, LSTM, decoder over a large vocabulary, whose two big matrices
    sit off the state path (the decoder reads the state, the embedding feeds the input)."""

    def __init__(self, vocab: int, embedding: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, embedding), nn.LSTM(embedding, hidden)
        self.decode = nn.Linear(hidden, vocab)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.embed(x), hidden)
        return self.decode(out), hidden


def lm_loss(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1))


def make_tokens(T: int, batch: int, vocab: int, device: torch.device, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (T + 1, batch), generator=g)
    return tokens[:-1].to(device), tokens[1:].to(device)


MODELS = {"lstm": ("LSTM({}) fused", FusedLSTM), "gru": ("GRUCell({}) loop", CellGRU)}


def model_label(kind: str, hidden: int) -> str:
    return MODELS[kind][0].format(hidden)


def make_model(kind: str, n_in: int, hidden: int, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind][1](n_in, hidden).to(device)


def make_data(T: int, batch: int, n_in: int, device: torch.device, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, batch, n_in, generator=g)
    y = torch.randn(T, batch, n_in, generator=g)
    return x.to(device), y.to(device)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------------
# Hidden-state helpers for the hand-written loops: a tensor (GRU) or a tuple of tensors (LSTM).


def detach(h):
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def _leaf(h):
    """A copy of the state cut from its graph that collects the state gradient."""
    if h is None:
        return None
    return tuple(_leaf(t) for t in h) if isinstance(h, tuple) else h.detach().requires_grad_()


def _flat(h) -> List[torch.Tensor]:
    return [] if h is None else list(h) if isinstance(h, tuple) else [h]


# ---------------------------------------------------------------------------------------------------------
# Hand-written TBPTT loops: what people write without the trainer. Each takes one batch (x, y).


def hand_written(model, optimizer, loss_fn, x, y, k1, k2=None):
    """The loop people write by hand for ``k2 == k1``: one forward and backward per chunk, state detached."""
    hidden = None
    for x_c, y_c in zip(x.split(k1), y.split(k1)):
        optimizer.zero_grad()
        y_pred, hidden = model(x_c) if hidden is None else model(x_c, detach(hidden))
        loss_fn(y_pred, y_c).backward()
        optimizer.step()


def hand_written_recompute(model, optimizer, loss_fn, x, y, k1, k2):
    """TBPTT(k1, k2) by re-running each window ``(w, t]`` from the state kept at ``w``.

    The run of one window also computes the state where the next window starts; only that one state is kept.
    """
    T, o = x.shape[0], k2 - k1
    kept = None  # the state at the current window's start (None: the fresh start at position 0)
    for s in range(0, T, k1):
        t, w = min(s + k1, T), max(0, s - o)
        nxt = max(0, s + k1 - o) if s + k1 < T else t  # where the next window starts
        bounds = sorted({w, s, t} | ({nxt} if w < nxt < t else set()))
        optimizer.zero_grad()
        h, outs = (None if kept is None else detach(kept)), []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y_pred, h = model(x[a:b]) if h is None else model(x[a:b], h)
            if a >= s:
                outs.append(y_pred)
            if b == nxt:
                kept = h
        loss_fn(torch.cat(outs), y[s:t]).backward()
        optimizer.step()


def hand_written_retain(model, optimizer, loss_fn, x, y, k1, k2):
    """TBPTT(k1, k2) running every step forward once and keeping the graphs of the last ``k2`` steps.

    The forward pass is cut into segments at every window start; each segment starts from a leaf copy of the
    state, so an update can chain the state gradient back through the segments of its window. A chunk whose
    graph must outlive ``optimizer.step()`` runs under clones of the parameters: the retained graph saves the
    clones, the in-place step cannot invalidate it, and the gradient still reaches ``.grad`` through the clone.
    """
    T, o = x.shape[0], k2 - k1
    starts = range(0, T, k1)
    window_starts = sorted({max(0, s - o) for s in starts})
    params = dict(model.named_parameters())
    segments: List[Tuple[int, Any, Any]] = []  # (start, input-state leaf, output state), oldest first
    h = None
    for s in starts:
        t, w = min(s + k1, T), max(0, s - o)
        nxt = max(0, s + k1 - o) if s + k1 < T else t  # the next window's start
        keep = nxt < t  # a later window reaches into this chunk
        if keep:
            theta = {n: p.clone() for n, p in params.items()}
            forward = lambda *args: functional_call(model, theta, args)  # noqa: E731
        else:
            forward = model
        bounds = [s, *(c for c in window_starts if s < c < t), t]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            h_in = _leaf(h)
            y_pred, h = forward(x[a:b]) if h_in is None else forward(x[a:b], h_in)
            segments.append((a, h_in, h))
            outs.append(y_pred)
        optimizer.zero_grad()
        loss_fn(torch.cat(outs), y[s:t]).backward(retain_graph=keep)
        window = [seg for seg in segments if seg[0] >= w]
        for (_, h_in, _), (_, _, h_out) in zip(window[:0:-1], window[-2::-1]):  # newest to oldest
            pairs = [(out, leaf.grad) for out, leaf in zip(_flat(h_out), _flat(h_in)) if leaf.grad is not None]
            for leaf in _flat(h_in):
                leaf.grad = None
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs], retain_graph=keep)
        for leaf in _flat(window[0][1]):
            leaf.grad = None  # the window start is held constant
        optimizer.step()
        segments = [seg for seg in segments if seg[0] >= nxt]


HAND_WRITTEN = {"loop": hand_written, "recompute": hand_written_recompute, "retain": hand_written_retain}


# ---------------------------------------------------------------------------------------------------------
# Timing.


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def floor_parts(model, loss_fn, x, y, k1, sync) -> Tuple[float, float]:
    """Seconds of forward and of backward over the whole batch, chunked by ``k1``, each timed on its own.

    The forward builds the graph as training does (one call per chunk, state detached between chunks); no
    optimizer step. TBPTT(k1, k2) cannot do less than ``forward + (k2 / k1) * backward``.
    """
    forward = backward = 0.0
    hidden = None
    for x_c, y_c in zip(x.split(k1), y.split(k1)):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        y_pred, hidden = model(x_c) if hidden is None else model(x_c, detach(hidden))
        loss = loss_fn(y_pred, y_c)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        forward, backward = forward + t1 - t0, backward + t2 - t1
    model.zero_grad(set_to_none=True)
    return forward, backward


FLOOR = "compute floor"


def interleaved(
    contenders: Dict[str, Callable[[], Callable[[], Any]]], rounds: int, sync
) -> Dict[str, List[float]]:
    """Seconds of each contender in each of ``rounds`` round-robin rounds, after one warm-up round.

    A contender is a setup function returning the run to time; it is set up anew, untimed, every round. A run
    that returns a number reports its own time (the compute floor); the others are timed here.
    """
    for setup in contenders.values():
        setup()()
        sync()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, setup in contenders.items():
            fn = setup()
            sync()
            start = time.perf_counter()
            reported = fn()
            sync()
            times[name].append(reported if isinstance(reported, float) else time.perf_counter() - start)
    return times


def fresh_copies(base: nn.Module, lr: float = 1e-3):
    """A factory of (model, SGD optimizer) pairs, each on its own deep copy of ``base``."""

    def fresh():
        model = copy.deepcopy(base)
        return model, torch.optim.SGD(model.parameters(), lr=lr)

    return fresh


# ---------------------------------------------------------------------------------------------------------
# Output.


MALLOC_MODES = {
    # tensors up to 32 MiB come from the heap, and freed memory stays there for reuse: steady timings
    "heap": ((-1, 1 << 30), (-3, 32 << 20)),  # (M_TRIM_THRESHOLD, 1 GiB), (M_MMAP_THRESHOLD, 32 MiB)
    # tensors over 128 KiB get mappings of their own, returned on free: the resident peak follows live tensors
    "mmap": ((-3, 128 << 10),),  # (M_MMAP_THRESHOLD, 128 KiB, glibc's default, but fixed)
    "default": (),
}


def set_malloc(mode: str) -> bool:
    """Fix glibc's allocator thresholds for this process (see :data:`MALLOC_MODES`); False where impossible.

    By default glibc raises its mmap threshold as large blocks are freed, so where a tensor of a few MiB comes
    from (a fresh, zero-filled mapping or reused heap) depends on what ran before. The same loop then runs at
    one of two speeds from one process to the next (1.5x apart for an LSTM(256) recompute loop on CPU), and the
    resident peak wanders by tens of MiB. Fixing the thresholds makes both repeatable.
    """
    if not MALLOC_MODES[mode]:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_MODES[mode])
    except (OSError, AttributeError, TypeError):
        return False


def add_malloc_argument(parser) -> None:
    parser.add_argument("--malloc", choices=sorted(MALLOC_MODES), default=None,
                        help="glibc allocator thresholds for timings (default heap; --quick: default, untouched)")


def resolve_malloc(args) -> None:
    """Pick the allocator mode for timings and apply it to this process."""
    if args.malloc is None:
        args.malloc = "default" if args.quick else "heap"
    if not set_malloc(args.malloc):
        args.malloc = "default"  # not glibc: nothing to fix


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_ints(text: str) -> List[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def load_note() -> str:
    """The machine's load averages: timings from a busy machine are worth less."""
    try:
        return ", load average {:.2f} {:.2f} {:.2f} on {} CPUs".format(*os.getloadavg(), os.cpu_count())
    except (AttributeError, OSError):
        return ""

