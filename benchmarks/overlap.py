"""Time the trainer against a hand-written loop and Ignite's trainer, and the two overlap modes.

All contenders run in one process, in interleaved rounds (A B C A B C ...), on the same data and a fresh
copy of the same model; the table reports median seconds per batch and ratios. Run:

    python benchmarks/overlap.py            # CPU, about two minutes on 2 cores
    python benchmarks/overlap.py --device cuda
"""

import argparse
import copy
import statistics
import time

import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer


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


def detach(h):
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


def hand_written(model, optimizer, loss_fn, x, y, k1):
    """The loop people write by hand for k2 == k1."""
    hidden = None
    for x_c, y_c in zip(x.split(k1), y.split(k1)):
        optimizer.zero_grad()
        y_pred, hidden = model(x_c) if hidden is None else model(x_c, detach(hidden))
        loss_fn(y_pred, y_c).backward()
        optimizer.step()


def hand_written_recompute(model, optimizer, loss_fn, x, y, k1, k2):
    """A straightforward recompute loop for k2 > k1: re-run the last k2 steps from a stored state."""
    o, T = k2 - k1, x.shape[0]
    states = {0: None}
    for s in range(0, T, k1):
        t, w = min(s + k1, T), max(0, s - o)
        nxt = min(t, s + k1 - o) if s + k1 < T else t
        optimizer.zero_grad()
        h = states[w]
        h = None if h is None else detach(h)
        bounds = sorted({w, s, max(w, nxt), t})
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y_pred, h = model(x[a:b]) if h is None else model(x[a:b], h)
            if a >= s:
                outs.append(y_pred)
            if b == nxt:
                states = {b: h}
        nn.functional.mse_loss(torch.cat(outs), y[s:t]).backward()
        optimizer.step()


def run_contenders(make_model, x, y, k1, k2, rounds, with_baselines):
    """Median seconds per batch for every contender, measured in interleaved rounds."""
    base = make_model()
    loss_fn = nn.MSELoss()

    def fresh():
        model = copy.deepcopy(base)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    def engine_runner(factory, **kw):
        model, opt = fresh()
        engine = factory(model, opt, loss_fn, tbtt_step=k1, **kw)
        return lambda: engine.run([(x, y)])

    def loop_runner(fn, *args):
        model, opt = fresh()
        return lambda: fn(model, opt, loss_fn, x, y, *args)

    contenders = {}
    if k2 == k1:
        contenders["hand-written loop"] = loop_runner(hand_written, k1)
        contenders["ignite trainer"] = engine_runner(ignite_trainer)
        contenders["ignite_tbptt"] = engine_runner(create_supervised_tbptt_trainer)
    else:
        if with_baselines:
            contenders["hand-written recompute"] = loop_runner(hand_written_recompute, k1, k2)
        contenders["recompute"] = engine_runner(create_supervised_tbptt_trainer, k2=k2, overlap="recompute")
        contenders["retain"] = engine_runner(create_supervised_tbptt_trainer, k2=k2, overlap="retain")
    times = {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--T", type=int, default=400)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch, n_in = 32, 16
    cases = [
        ("LSTM(256) fused", lambda: FusedLSTM(n_in, 256).to(device), 20, 20),
        ("GRUCell(64) loop", lambda: CellGRU(n_in, 64).to(device), 20, 20),
        ("LSTM(256) fused", lambda: FusedLSTM(n_in, 256).to(device), 20, 40),
        ("GRUCell(64) loop", lambda: CellGRU(n_in, 64).to(device), 20, 40),
        ("LSTM(256) fused", lambda: FusedLSTM(n_in, 256).to(device), 5, 40),
        ("GRUCell(64) loop", lambda: CellGRU(n_in, 64).to(device), 5, 40),
    ]
    x = torch.randn(args.T, batch, n_in, device=device)
    y = torch.randn(args.T, batch, n_in, device=device)
    print(f"device {device}, T={args.T}, batch {batch}, {args.rounds} interleaved rounds, median s/batch")
    print(f"| model | k1 | k2 | contender | s/batch | ratio |")
    print(f"|---|---|---|---|---|---|")
    for name, make_model, k1, k2 in cases:
        result = run_contenders(make_model, x, y, k1, k2, args.rounds, with_baselines=True)
        reference = next(iter(result.values()))
        for contender, seconds in result.items():
            print(f"| {name} | {k1} | {k2} | {contender} | {seconds:.4f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
