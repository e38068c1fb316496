"""Unbiased truncation, ``k2=ARTBP(p, cap)``: its speed, its memory, and what its variance costs on the main job.

- ``speed``: seconds per batch of the trainer with ``ARTBP(p, cap)`` in both overlap modes, against a
  hand-written ARTBP loop replaying the same truncations (the windows re-run from the state kept at their start,
  the compensation as a gradient hook at every crossed boundary) and against the trainer with a fixed ``k2``
  equal to ARTBP's mean window; rounds interleaved, glibc's allocator pinned (``bench_common``).
- ``memory``: the peak of one batch in a fresh process (``bench_memory``) at two lengths ``T``: bounded by the
  cap, whatever the draws, never by ``T``.
- ``noise``: on the main job's model and data, the gradient of one update at fixed parameters over many
  independent draws: how far ARTBP's truncation noise spreads it, against the spread of the same update's
  fixed-window gradient over the batch's rows (the minibatch noise SGD lives with anyway).
- ``train``: the main job (``python -m ignite_tbptt.demo``) with ``--artbp P`` against ``--k2`` at the same mean
  window, several seeds.

    python benchmarks/bench_artbp.py                         # every section, about 10 minutes on 2 cores
    python benchmarks/bench_artbp.py --sections speed memory
    python benchmarks/bench_artbp.py --quick                 # a smoke run (the test suite runs it)
"""

import argparse
import contextlib
import io
import re
import statistics
import sys
from typing import Any, Dict

import torch
from torch import nn

import bench_common as bc
import bench_memory
from ignite_tbptt import ARTBP, Tbptt_Events, create_supervised_tbptt_trainer, demo
from ignite_tbptt.schedule import plan_chunks, truncate


def hand_written_artbp(model, optimizer, loss_fn, x, y, chunks) -> None:
    """ARTBP by hand, in recompute style, over ``chunks`` whose windows and factors were drawn beforehand.

    Every update re-runs its window from the state kept at the window's start, one model call per chunk, with a
    hook multiplying the state gradient by the chunk's factor where the window crosses its start.
    """
    states: Dict[int, Any] = {0: None}  # the state at each chunk start, as the latest run computed it
    for c in chunks:
        h = states[c.window_start]
        h = None if h is None else bc.detach(h)
        for d in chunks[:c.index + 1]:
            if d.start < c.window_start:
                continue
            if d.start > c.window_start and d.factor != 1.0:
                for t in bc._flat(h):
                    t.register_hook(lambda g, f=d.factor: g * f)
            y_pred, h = model(x[d.start:d.stop]) if h is None else model(x[d.start:d.stop], h)
            states[d.stop] = h
        optimizer.zero_grad()
        loss_fn(y_pred, y[c.start:c.stop]).backward()  # y_pred: the chunk's own, from the window's last call
        optimizer.step()
        states = {p: (bc.detach(s) if s is not None else None) for p, s in states.items() if p >= c.window_start}


def speed_section(args) -> str:
    device = torch.device("cpu")
    k1, p, cap = args.k1, args.p, args.cap
    T, batch = (80, 4) if args.quick else (args.T, args.batch)
    base = bc.make_model("lstm", args.n_in, args.hidden, device)
    x, y = bc.make_data(T, batch, args.n_in, device)
    chunks = truncate(plan_chunks(T, k1, k1), ARTBP(p, cap=cap, seed=args.seed), None, stream=False)[0]
    mean_window = statistics.fmean(c.stop - c.window_start for c in chunks)
    fixed_k2 = k1 * max(1, round(mean_window / k1))
    fresh = bc.fresh_copies(base)

    def trainer_run(k2, overlap):
        def setup():
            model, optimizer = fresh()
            trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=k1, k2=k2,
                                                      overlap=overlap)
            return lambda: trainer.run([(x, y)])
        return setup

    def loop_run():
        model, optimizer = fresh()
        return lambda: hand_written_artbp(model, optimizer, nn.MSELoss(), x, y, chunks)

    contenders = {
        "hand-written ARTBP loop (recompute)": loop_run,
        "ignite_tbptt ARTBP, recompute": trainer_run(ARTBP(p, cap=cap, seed=args.seed), "recompute"),
        "ignite_tbptt ARTBP, retain": trainer_run(ARTBP(p, cap=cap, seed=args.seed), "retain"),
        f"ignite_tbptt fixed k2 = {fixed_k2}, recompute": trainer_run(fixed_k2, "recompute"),
        f"ignite_tbptt fixed k2 = {fixed_k2}, retain": trainer_run(fixed_k2, "retain"),
    }
    times = bc.interleaved(contenders, 1 if args.quick else args.rounds, bc.synchronizer(device))
    loop = min(times["hand-written ARTBP loop (recompute)"])
    rows = [[name, f"{min(t):.4f}", f"{statistics.median(t):.4f}", f"{min(t) / loop:.3f}"] for name, t in times.items()]
    return (
        f"Speed: {bc.describe_device(device)}, LSTM({args.hidden}) fused, batch {batch}, T = {T}, k1 = {k1}, "
        f"ARTBP(p={p}, cap={cap}, seed={args.seed}) with a mean window of {mean_window:.1f} steps; {args.rounds} "
        "interleaved rounds, "
        f"glibc allocator {args.malloc}{bc.load_note()}\n\n"
        + bc.markdown_table(["run", "fastest s", "median s", "fastest / hand-written loop"], rows)
    )


def memory_section(args) -> str:
    k1, p, cap = args.k1, args.p, args.cap
    lengths = [40, 80] if args.quick else args.mem_T
    common = dict(device="cpu", hidden=args.hidden, batch=args.batch, n_in=args.n_in, extra={}, threads=None,
                  malloc="mmap", who="ignite_tbptt", k1=k1)
    configs = [dict(common, k2=f"ARTBP({p}, cap={cap})", artbp=dict(p=p, cap=cap, seed=0), overlap=o, T=T)
               for o in ("recompute", "retain") for T in lengths]
    configs += [dict(common, k2=k1 * cap, overlap=o, T=T) for o in ("recompute", "retain") for T in lengths]
    results = bench_memory.measure_all(configs, args.jobs)
    return (
        f"Memory: CPU, LSTM({args.hidden}) fused, batch {args.batch}, k1 = {k1}, one batch per fresh process; the "
        f"fixed window k2 = {k1 * cap} is ARTBP's cap of {cap} chunks\n\n" + bench_memory.tables(results, lengths, False)
    )


def noise_section(args) -> str:
    """The spread of one update's gradient over independent ARTBP draws, at fixed parameters on the main job."""
    corpus = demo.encode(demo.load_documents(None))
    rows, seq_len, k1 = (4, 100, 25) if args.quick else (32, 200, 25)
    hidden = 32 if args.quick else 256
    torch.manual_seed(0)
    model = demo.CharLSTM(len(corpus.vocab), hidden)
    batches = demo.StreamBatches(corpus.train, rows, seq_len)
    batch = next(iter(batches))
    last = seq_len // k1 - 1  # the batch's last update: the one with the most boundaries to cross

    def gradients(k2, data):
        """The gradient of update ``last`` of every batch of ``data``, each batch a fresh stream, learning rate 0."""
        trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                                  demo.sequence_loss, tbtt_step=k1, k2=k2)
        seen = []

        @trainer.on(Tbptt_Events.GRADIENTS_COMPUTED)
        def keep(engine):
            if engine.state.chunk.index == last:
                seen.append(torch.cat([q.grad.flatten() for q in model.parameters()]).clone())

        trainer.run(data)
        return torch.stack(seen)

    def spread(g):
        mean = g.mean(0)
        return float((g - mean).pow(2).sum(1).mean().sqrt() / mean.norm())

    draws = gradients(ARTBP(args.p, cap=args.cap, seed=0), [batch] * (6 if args.quick else args.draws))
    full = gradients(seq_len, [batch])[0]  # the window reaches back to the batch start: what ARTBP estimates
    bias = float((draws.mean(0) - full).norm() / full.norm())
    x, y, _ = batch  # the same update's full-window gradient on each row alone: the minibatch noise
    per_row = gradients(seq_len, [(x[:, r:r + 1], y[:, r:r + 1]) for r in range(rows)])
    minibatch = spread(per_row) / rows ** 0.5  # the spread of a mean over `rows` rows
    return (
        f"Gradient noise at fixed parameters: the main job's CharLSTM({hidden}) at its initialisation, its first "
        f"batch ({rows} rows x {seq_len} steps), update {last + 1} (k1 = {k1}), ARTBP(p={args.p}, cap={args.cap}), "
        f"{len(draws)} independent draws\n\n"
        + bc.markdown_table(["spread (root mean square distance from the mean, over the mean's norm)", "value"], [
            ["ARTBP's gradient over its draws", f"{spread(draws):.3f}"],
            [f"the full-window gradient of a {rows}-row batch over its rows (minibatch noise)", f"{minibatch:.3f}"],
            ["ARTBP's mean against the full-window gradient (bias, with its noise)", f"{bias:.3f}"],
        ])
    )


def train_section(args) -> str:
    seeds = [0] if args.quick else list(range(args.seeds))
    toy = ["--epochs", "1", "--hidden", "16", "--seq-len", "50", "--batch-size", "4"] if args.quick else []
    fixed = ["--k2", str(args.train_k2)]
    random = ["--artbp", str(args.train_p)] + (["--artbp-cap", str(args.train_cap)] if args.train_cap else [])
    rows = []
    for seed in seeds:
        row = [seed]
        for extra in (fixed, random):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                demo.main(["--no-progress", "--seed", str(seed), *toy, *extra])
            m = re.search(r"result: train ([\d.]+) bits/char, validation ([\d.]+) bits/char, (\d+) s, ([\d,]+) tokens/s",
                          out.getvalue())
            row += [f"{m.group(1)} / {m.group(2)}", m.group(4)]
        rows.append(row)
    cap = f", --artbp-cap {args.train_cap}" if args.train_cap else ""
    return (
        f"The main job (`python -m ignite_tbptt.demo`, k1 = 25{', toy size' if args.quick else ', 5 epochs'}): "
        f"`--k2 {args.train_k2}` against `--artbp {args.train_p}{cap}` (a mean window of "
        f"{1 / args.train_p:.0f} chunks)\n\n"
        + bc.markdown_table(["seed", "k2: train / validation bits/char", "tokens/s", "ARTBP: train / validation",
                             "tokens/s"], rows)
    )


SECTIONS = {"speed": speed_section, "memory": memory_section, "noise": noise_section, "train": train_section}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--p", type=float, default=0.25)
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2,
                        help="the speed section's draws (2: a mean window of 79 steps at T = 400, near the 72 of a long run)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--n-in", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T", type=int, default=400)
    parser.add_argument("--mem-T", type=bc.parse_ints, default=[1000, 4000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-k2", type=int, default=50)
    parser.add_argument("--train-p", type=float, default=0.5)
    parser.add_argument("--train-cap", type=int, default=None)
    bc.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    bc.resolve_malloc(args)
    if args.quick:
        args.hidden, args.batch, args.n_in, args.rounds, args.cap = 16, 4, 4, 1, 3
    for name in args.sections:
        print(SECTIONS[name](args), end="\n\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
