"""Compiled models: ``torch.compile`` (inductor) against eager, in the trainer and in Ignite's trainer.

For each case the contenders are the trainer on the eager model, the trainer on the compiled model and, with
``k1 == k2``, Ignite's trainer on the same compiled model. Every contender keeps its own model (compiled once)
for the whole case and builds a fresh trainer each round. The first batch of a contender is timed on its own:
for a compiled one it holds the compilation (``compile s``: that batch's time less the steady-state time;
a second compiled contender of a case finds much of it in dynamo's cache, as a second trainer in a notebook
would).
The steady state is the fastest of the interleaved rounds that follow, against the eager trainer.

    python benchmarks/bench_compile.py              # T = 400, batch 32, 5 rounds (about 4 minutes on 2 cores)
    python benchmarks/bench_compile.py --quick      # toy sizes, backend aot_eager (no C++ compile)
    python benchmarks/overlap.py --sections compile --device cuda   # the same table as a section, on a GPU
"""

import argparse
import copy
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from torch import nn

import bench_common as bc
from ignite_tbptt import create_supervised_tbptt_trainer

CASES = [("gru", 20, 20, "recompute"), ("gru", 20, 40, "recompute"), ("gru", 20, 40, "retain"),
         ("lstm", 20, 20, "recompute")]
HIDDEN = {"gru": 64, "lstm": 256}


def contenders(kind: str, k1: int, k2: int, overlap: str, hidden: int, x, y, backend: str) -> Dict[str, Callable]:
    base = bc.make_model(kind, x.shape[-1], hidden, x.device)

    def contender(factory, compiled: bool, **kw) -> Callable[[], Callable[[], Any]]:
        model = copy.deepcopy(base)
        run_model = torch.compile(model, backend=backend) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def setup():
            trainer = factory(run_model, optimizer, nn.MSELoss(), tbtt_step=k1, **kw)
            return lambda: trainer.run([(x, y)]) and None

        return setup

    mode = {} if k1 == k2 else {"k2": k2, "overlap": overlap}
    out = {
        "ignite_tbptt, eager": contender(create_supervised_tbptt_trainer, False, **mode),
        "ignite_tbptt, compiled": contender(create_supervised_tbptt_trainer, True, **mode),
    }
    if k1 == k2:
        out["ignite trainer, compiled"] = contender(ignite_trainer, True)
    return out


def run_case(case, device: torch.device, T: int, batch: int, rounds: int, backend: str, hidden: int) -> List[List[str]]:
    kind, k1, k2, overlap = case
    hidden = hidden or HIDDEN[kind]
    sync = bc.synchronizer(device)
    x, y = bc.make_data(T, batch, 16, device)
    setups = contenders(kind, k1, k2, overlap, hidden, x, y, backend)
    first: Dict[str, float] = {}
    for name, setup in setups.items():
        run = setup()
        sync()
        start = time.perf_counter()
        run()
        sync()
        first[name] = time.perf_counter() - start
    times = bc.interleaved(setups, rounds, sync)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    eager = "ignite_tbptt, eager"
    label = bc.model_label(kind, hidden) + (f", {overlap}" if k1 != k2 else "")
    return [
        [label, k1, k2, name, f"{max(0.0, first[name] - best[name]):.1f}", f"{best[name]:.4f}",
         f"{best[name] / best[eager]:.2f}", f"{median[name] / median[eager]:.2f}"]
        for name in times
    ]


def table(device: torch.device, quick: bool, rounds: int, backend: str) -> str:
    T, batch, hidden = (16, 2, 8) if quick else (400, 32, None)
    cases = CASES[:1] + CASES[2:3] if quick else CASES
    rows = [row for case in cases for row in run_case(case, device, T, batch, rounds, backend, hidden)]
    return (
        f"Compiled models ({backend}): {bc.describe_device(device)}{bc.load_note()}; T = {T}, batch {batch}; "
        f"first batch less the steady state as compile s; fastest of {rounds} interleaved rounds; ratios against "
        "the eager trainer\n\n"
        + bc.markdown_table(["model", "k1", "k2", "contender", "compile s", "s/batch", "ratio", "ratio of medians"],
                            rows)
    )


def section(args) -> str:
    """The ``compile`` section of ``overlap.py`` (inductor; aot_eager with ``--quick``)."""
    return table(args.device, args.quick, 1 if args.quick else 5, "aot_eager" if args.quick else "inductor")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor, --quick aot_eager)")
    bc.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    bc.resolve_malloc(args)
    rounds = args.rounds or (1 if args.quick else 5)
    print(table(args.device, args.quick, rounds, args.backend or ("aot_eager" if args.quick else "inductor")))


if __name__ == "__main__":
    main()
