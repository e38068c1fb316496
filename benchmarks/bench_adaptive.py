"""Adaptive truncation, ``k2=AdaptiveK2(delta, ...)``: what an estimate costs, what the monitor costs, and the main
job trained with an adaptive window against a grid of fixed ones.

- ``estimate``: seconds of one :func:`~ignite_tbptt.gradient_horizon` estimate on a batch of the main job
  (``python -m ignite_tbptt.demo``'s model and data) against seconds per training update (one chunk) and per batch.
- ``monitor``: seconds per batch of ``overlap="retain"`` with and without ``monitor_state_grads=True``, rounds
  interleaved (``bench_common.interleaved``).
- ``train``: the main job (CharLSTM, 32 streams of 200 steps, k1 = 25, Adam 3e-3, carried state) with
  ``AdaptiveK2(delta)`` against fixed ``k2`` values, several seeds: training and validation bits per character,
  seconds, and the windows the adaptive run chose.
- ``budget``: the same comparison at the same compute: every run trains for ``--budget`` seconds of the process's
  CPU time on one thread (a fair measure on a shared machine, where wall-clock time is not), then validates.

    python benchmarks/bench_adaptive.py                           # every section (see the docs for its run time)
    python benchmarks/bench_adaptive.py --sections train --epochs 1 --hidden 128
    python benchmarks/bench_adaptive.py --sections budget --hidden 128 --budget 60 --seeds 3
    python benchmarks/bench_adaptive.py --quick                   # a smoke run (the test suite runs it)
"""

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from ignite.engine import Events
from ignite.metrics import Loss

import bench_common as bc
from ignite_tbptt import (
    AdaptiveK2, StreamBatches, TbpttLoss, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer,
    demo, gradient_horizon,
)


def main_job(args, hidden: int):
    """The main job's corpus, batches and a fresh model (seeded by the caller)."""
    corpus = demo.encode(demo.load_documents(None))
    rows, seq_len = (4, 60) if args.quick else (32, 200)
    if args.quick:  # a smoke run: the first few thousand characters
        corpus = corpus._replace(train=[d[:1200] for d in corpus.train[:1]], valid=[d[:500] for d in corpus.valid[:1]])
    batches = StreamBatches(corpus.train, rows, seq_len)
    return corpus, batches, demo.CharLSTM(len(corpus.vocab), hidden)


def adaptive(args) -> AdaptiveK2:
    return AdaptiveK2(args.delta, every=args.every, k_max=args.k_max, max_lag=args.max_lag)


def estimate_section(args) -> str:
    torch.manual_seed(0)
    _, batches, model = main_job(args, args.hidden)
    data = iter(batches)
    first = [next(data)[:2] for _ in range(2 if args.quick else 4)]  # (x, y): the run below starts mid-stream
    trainer = create_supervised_tbptt_trainer(model, torch.optim.Adam(model.parameters(), 3e-3), demo.sequence_loss,
                                              tbtt_step=args.k1, k2=args.k1 + args.max_lag, carry_state=True)
    trainer.run(first[:1])  # warm-up
    start = time.perf_counter()
    trainer.run(first[1:])
    per_batch = (time.perf_counter() - start) / (len(first) - 1)
    per_update = per_batch / -(-first[0][0].shape[0] // args.k1)
    x, y = first[-1][0], first[-1][1]
    times = []
    for _ in range(1 if args.quick else 3):
        start = time.perf_counter()
        horizon = gradient_horizon(model, x, y, demo.sequence_loss, max_lag=args.max_lag, tbtt_step=args.k1)
        times.append(time.perf_counter() - start)
    estimate = min(times)
    return (
        f"Cost of an estimate: {bc.describe_device(torch.device('cpu'))}{bc.load_note()}; CharLSTM({args.hidden}), "
        f"a batch of {tuple(x.shape)}, max_lag = {args.max_lag}, training at k1 = {args.k1}, k2 = {args.k1 + args.max_lag} "
        f"(recompute); fastest of {len(times)} estimates\n\n"
        + bc.markdown_table(["what", "seconds", "in training updates"], [
            ["one training update (chunk)", f"{per_update:.3f}", "1"],
            ["one training batch", f"{per_batch:.3f}", f"{per_batch / per_update:.1f}"],
            [f"one estimate (beta = {horizon.decay:.3f}, K(0.1) = {horizon.suggest(0.1)})", f"{estimate:.3f}",
             f"{estimate / per_update:.1f}"],
        ])
        + f"\n\nEvery {args.every} updates, the estimates add {100 * estimate / (per_update * args.every):.1f}% to training."
    )


def monitor_section(args) -> str:
    torch.manual_seed(0)
    _, batches, base = main_job(args, args.hidden)
    batch = next(iter(batches))
    fresh = bc.fresh_copies(base)

    def setup(monitor: bool):
        def make():
            model, optimizer = fresh()
            trainer = create_supervised_tbptt_trainer(model, optimizer, demo.sequence_loss, tbtt_step=args.k1,
                                                      k2=args.monitor_k2, overlap="retain", monitor_state_grads=monitor)
            return lambda: trainer.run([batch])
        return make

    times = bc.interleaved({"retain": setup(False), "retain, monitor_state_grads=True": setup(True)},
                           1 if args.quick else args.rounds, lambda: None)
    plain = statistics.median(times["retain"])
    rows = [[name, f"{min(t):.4f}", f"{statistics.median(t):.4f}", f"{statistics.median(t) / plain:.3f}"]
            for name, t in times.items()]
    return (
        f"Cost of the monitor: CharLSTM({args.hidden}), a batch of {tuple(batch[0].shape)}, k1 = {args.k1}, "
        f"k2 = {args.monitor_k2}, retain; {args.rounds} interleaved rounds{bc.load_note()}\n\n"
        + bc.markdown_table(["run", "fastest s/batch", "median s/batch", "median / without"], rows)
    )


def main_job_run(args, k2: Any, seed: int):
    """A seeded run of the main job with window ``k2``: its batches, trainer, evaluator and validation batches."""
    torch.manual_seed(seed)
    corpus, batches, model = main_job(args, args.hidden)
    valid = StreamBatches(corpus.valid, 8, 60 if args.quick else 200)
    trainer = create_supervised_tbptt_trainer(model, torch.optim.Adam(model.parameters(), lr=3e-3), demo.sequence_loss,
                                              tbtt_step=args.k1, k2=k2, carry_state=True)
    evaluator = create_supervised_tbptt_evaluator(model, {"loss": Loss(demo.sequence_loss)}, tbtt_step=args.k1 * 4,
                                                  carry_state=True, output_transform=demo.flat_pair)
    return batches, trainer, evaluator, valid


def train_once(args, k2: Any, seed: int) -> Dict[str, Any]:
    """One run of the main job; its bits per character, seconds and (adaptive) the windows chosen."""
    batches, trainer, evaluator, valid = main_job_run(args, k2, seed)
    TbpttLoss().attach(trainer, "loss")
    windows: List[int] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: windows.append(e.state.k2))
    start = time.perf_counter()
    state = trainer.run(batches, max_epochs=args.epochs)
    seconds = time.perf_counter() - start
    return {"train": state.metrics["loss"] * demo.LOG2E, "valid": evaluator.run(valid).metrics["loss"] * demo.LOG2E,
            "seconds": seconds, "windows": windows, "history": getattr(trainer.adaptive_k2, "history", None)}


def budget_once(args, k2: Any, seed: int) -> Dict[str, Any]:
    """The main job trained until ``args.budget`` seconds of this process's CPU time, then validated."""
    batches, trainer, evaluator, valid = main_job_run(args, k2, seed)
    tally: Dict[str, Any] = {"tokens": 0, "windows": []}
    start = time.process_time()

    @trainer.on(Events.ITERATION_COMPLETED)
    def spend(engine):
        x = engine.state.batch[0]
        tally["tokens"] += x.shape[0] * x.shape[1]
        tally["windows"].append(engine.state.k2)
        if time.process_time() - start >= args.budget:
            engine.terminate()

    trainer.run(batches, max_epochs=10 ** 6)
    return {"valid": evaluator.run(valid).metrics["loss"] * demo.LOG2E, "cpu": time.process_time() - start,
            "tokens": tally["tokens"], "windows": tally["windows"],
            "history": getattr(trainer.adaptive_k2, "history", None)}


def run_grid(args, once: Callable[[Any, Any, int], Dict[str, Any]]) -> Tuple[List[int], Dict[str, List[Dict[str, Any]]], str]:
    """``once`` for every fixed ``k2`` of the grid and the adaptive window, on every seed: the seeds, the results
    by window name, and the adaptive window's name."""
    seeds = [0] if args.quick else list(range(args.seeds))
    configs = [(f"k2 = {k2}", k2) for k2 in args.grid] + [(f"AdaptiveK2({args.delta})", None)]
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in configs}
    for seed in seeds:
        for name, k2 in configs:
            results[name].append(once(args, k2 if k2 is not None else adaptive(args), seed))
            print(f"  seed {seed}, {name}: {results[name][-1]['valid']:.3f} bits/char", file=sys.stderr, flush=True)
    return seeds, results, configs[-1][0]


def estimates(seeds: List[int], runs: List[Dict[str, Any]]) -> str:
    """The K of each estimate of the adaptive runs, per seed."""
    return "; ".join(f"seed {s}: " + ", ".join(f"{K}" for _, K, _ in r["history"]) for s, r in zip(seeds, runs))


def train_section(args) -> str:
    seeds, results, name = run_grid(args, train_once)
    rows = []
    for window, runs in results.items():
        windows = [w for r in runs for w in r["windows"]]
        rows.append([window, " / ".join(f"{r['train']:.3f}" for r in runs), " / ".join(f"{r['valid']:.3f}" for r in runs),
                     f"{statistics.fmean(r['valid'] for r in runs):.3f}", f"{statistics.fmean(r['seconds'] for r in runs):.0f}",
                     f"{statistics.fmean(windows):.1f}"])
    return (
        f"The main job trained: CharLSTM({args.hidden}), {args.epochs} epoch(s), k1 = {args.k1}, carried state, "
        f"recompute; AdaptiveK2(delta={args.delta}, every={args.every}, k_max={args.k_max}, max_lag={args.max_lag}); "
        f"seeds {seeds}{bc.load_note()}\n\n"
        + bc.markdown_table(["window", "train bits/char (per seed)", "validation bits/char (per seed)",
                             "mean validation", "mean seconds", "mean k2 per batch"], rows)
        + f"\n\nThe K of each estimate of the adaptive runs: {estimates(seeds, results[name])}"
    )


def budget_section(args) -> str:
    """Fixed windows against ``AdaptiveK2`` at the same compute: each run gets ``--budget`` CPU seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the process's CPU time is then the compute a run used, whatever else the machine runs
    try:
        seeds, results, name = run_grid(args, budget_once)
    finally:
        torch.set_num_threads(threads)
    rows = [[window, " / ".join(f"{r['valid']:.3f}" for r in runs), f"{statistics.fmean(r['valid'] for r in runs):.3f}",
             f"{statistics.fmean(r['tokens'] for r in runs) / 1e3:.0f}", f"{statistics.fmean(r['cpu'] for r in runs):.1f}",
             f"{statistics.fmean(w for r in runs for w in r['windows']):.1f}"] for window, runs in results.items()]
    return (
        f"At the same compute: CharLSTM({args.hidden}), {args.budget:g} CPU seconds of training each (one thread), "
        f"k1 = {args.k1}, carried state, recompute; AdaptiveK2(delta={args.delta}, every={args.every}, "
        f"k_max={args.k_max}, max_lag={args.max_lag}); seeds {seeds}{bc.load_note()}\n\n"
        + bc.markdown_table(["window", "validation bits/char (per seed)", "mean validation", "thousand tokens trained",
                             "CPU seconds", "mean k2 per batch"], rows)
        + f"\n\nThe K of each estimate of the adaptive runs: {estimates(seeds, results[name])}"
    )


SECTIONS = {"estimate": estimate_section, "monitor": monitor_section, "train": train_section, "budget": budget_section}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--k1", type=int, default=25)
    parser.add_argument("--grid", type=bc.parse_ints, default=[25, 50, 100], help="the fixed k2 values")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--k-max", type=int, default=300)
    parser.add_argument("--max-lag", type=int, default=100)
    parser.add_argument("--budget", type=float, default=60.0, help="CPU seconds of training per run (budget)")
    parser.add_argument("--monitor-k2", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    bc.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    bc.resolve_malloc(args)
    if args.quick:
        args.hidden, args.k1, args.grid, args.max_lag, args.k_max, args.every = 16, 5, [5], 8, 12, 20
        args.monitor_k2, args.rounds, args.epochs, args.budget = 10, 1, 1, 1.0
    for name in args.sections:
        print(SECTIONS[name](args), end="\n\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
