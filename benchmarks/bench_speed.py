"""Speed: the trainer against hand-written loops and Ignite's trainer, and against the compute floor.

All contenders of a case run in one fresh process in interleaved rounds (A B C A B C ...), each on a fresh copy
of the same model set up anew every round, on the same batch; the table reports the fastest round's seconds per batch
and the ratios of the fastest rounds and of the medians.

- ``k1 == k2``: a hand-written loop, Ignite's trainer and ``ignite_tbptt``, also with ``skip_nonfinite=True``
  (its one host read per update).
- ``k2 > k1``: a hand-written recompute loop, a hand-written retain loop, and both overlap modes: ``recompute`` by
  default (which finds out that these models do not depend on where the stream is cut, and merges a window's
  calls), forced to merge (``merge_calls=True``, one call per window as the hand-written loop) and forced to keep
  the forward pass's calls (``merge_calls=False``, one per chunk).
- In both, the first contender a second time (``..., again``): the spread of identical code, the noise floor.

Every case also times the compute floor of TBPTT(k1, k2): ``forward + (k2 / k1) * backward`` over the batch,
the forward (chunked by ``k1``) and the backward timed separately. ``x floor`` is a contender's time over it.
"""

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from torch import nn

import bench_common as bc
from ignite_tbptt import create_supervised_tbptt_trainer

# (model kind, k1, k2) in table order
# k1 = 2 is where the two model kinds part ways: a fused kernel runs many steps per call, so re-running a window
# of k2 steps in one call (recompute) beats backpropagating k2 / k1 tiny retained segments one call each.
FULL_CASES = [
    ("lstm", 20, 20), ("gru", 20, 20), ("lstm", 20, 40), ("gru", 20, 40), ("lstm", 5, 40), ("gru", 5, 40),
    ("lstm", 2, 40), ("gru", 2, 40),
]
QUICK_CASES = [("lstm", 4, 4), ("gru", 4, 8)]
HIDDEN = {"lstm": 256, "gru": 64}


def contenders_for(fresh, loss_fn, x, y, k1: int, k2: int, sync) -> Dict[str, Callable[[], Callable[[], Any]]]:
    """Each contender as a setup function: it builds a fresh model (and trainer) and returns the run to time.

    Every round sets each contender up afresh, so no contender keeps one memory layout of its model for the
    whole case: a layout that happens to be slow (one moved a contender by 5 to 10% for a whole process) is
    one round among several instead of all of them.
    """

    def engine(factory, **kw):
        def setup():
            model, opt = fresh()
            trainer = factory(model, opt, loss_fn, tbtt_step=k1, **kw)
            return lambda: trainer.run([(x, y)])

        return setup

    def loop(fn):
        def setup():
            model, opt = fresh()
            return lambda: fn(model, opt, loss_fn, x, y, k1, k2)

        return setup

    def floor():
        model, _ = fresh()
        return lambda: (lambda f, b: f + (k2 / k1) * b)(*bc.floor_parts(model, loss_fn, x, y, k1, sync))

    if k2 == k1:
        contenders = {
            "hand-written loop": loop(bc.hand_written),
            "ignite trainer": engine(ignite_trainer),
            "ignite_tbptt": engine(create_supervised_tbptt_trainer),
            "ignite_tbptt skip_nonfinite": engine(create_supervised_tbptt_trainer, skip_nonfinite=True),
        }
    else:
        contenders = {
            "hand-written recompute": loop(bc.hand_written_recompute),
            "hand-written retain": loop(bc.hand_written_retain),
            "ignite_tbptt recompute": engine(create_supervised_tbptt_trainer, k2=k2, overlap="recompute"),
            "ignite_tbptt recompute, merge_calls=True": engine(
                create_supervised_tbptt_trainer, k2=k2, overlap="recompute", merge_calls=True),
            "ignite_tbptt recompute, merge_calls=False": engine(
                create_supervised_tbptt_trainer, k2=k2, overlap="recompute", merge_calls=False),
            "ignite_tbptt retain": engine(create_supervised_tbptt_trainer, k2=k2, overlap="retain"),
        }
    # The first contender once more: how far identical code moves between two places in the rounds. A ratio
    # no further from 1 than this one's is noise, not a difference.
    first = next(iter(contenders))
    contenders[f"{first}, again"] = contenders[first]
    contenders[bc.FLOOR] = floor
    return contenders


def case_contenders(
    device: torch.device, T: int, batch: int, n_in: int, case: Tuple[str, int, int], hidden: int, sync
) -> Dict[str, Callable[[], Callable[[], Any]]]:
    """The contenders of one case (:func:`contenders_for`) on its batch and copies of its model."""
    kind, k1, k2 = case
    x, y = bc.make_data(T, batch, n_in, device)
    base = bc.make_model(kind, n_in, hidden, device)
    return contenders_for(bc.fresh_copies(base), nn.MSELoss(), x, y, k1, k2, sync)


def hidden_sizes(quick: bool) -> Dict[str, int]:
    """Hidden size per model kind: the table's, or toy sizes for ``--quick``."""
    return {k: 16 for k in HIDDEN} if quick else HIDDEN


def run_case(
    device: torch.device, T: int, batch: int, n_in: int, rounds: int, case: Tuple[str, int, int], hidden: int,
    malloc: str, threads: Optional[int],
) -> List[List[str]]:
    """The table rows of one case: model, k1, k2, contender, fastest round's s/batch, its ratio to the first row,
    the ratio of the medians, and the ratio to the compute floor."""
    bc.set_malloc(malloc)
    if threads:
        torch.set_num_threads(threads)
    kind, k1, k2 = case
    sync = bc.synchronizer(device)
    times = bc.interleaved(case_contenders(device, T, batch, n_in, case, hidden, sync), rounds, sync)
    # The fastest round is the contender's own cost: other processes and unlucky memory layouts only ever add
    # time. The ratio of medians is there to show that the ranking does not hang on one lucky round.
    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    first = next(iter(times))
    label = bc.model_label(kind, hidden)
    rows = []
    for name in times:
        contender = "floor: fwd + (k2/k1) bwd" if name == bc.FLOOR else name
        rows.append([
            label, k1, k2, contender, f"{best[name]:.4f}", f"{best[name] / best[first]:.2f}",
            f"{median[name] / median[first]:.2f}", f"{best[name] / best[bc.FLOOR]:.2f}",
        ])
    return rows


def run(
    device: torch.device, T: int, batch: int, n_in: int, rounds: int, cases: Sequence[Tuple[str, int, int]],
    hidden: Dict[str, int], malloc: str = "default", threads: Optional[int] = None,
) -> List[List[str]]:
    """The rows of every case, each case measured in a fresh process.

    In one long-lived process each case would run on a heap shaped by the cases before it, which moved a
    contender's time by up to 15% from one case order to another; a fresh process gives every case the same
    start.
    """
    rows: List[List[str]] = []
    for case in cases:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            args = (device, T, batch, n_in, rounds, case, hidden[case[0]], malloc, threads)
            rows += pool.submit(run_case, *args).result()
    return rows


HEADER = ["model", "k1", "k2", "contender", "s/batch", "ratio", "ratio of medians", "x floor"]


def section(args) -> str:
    cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    hidden = hidden_sizes(args.quick)
    rows = run(args.device, args.T, args.batch, args.n_in, args.rounds, cases, hidden, args.malloc,
               getattr(args, "threads", None))
    title = (
        f"Speed: {bc.describe_device(args.device)}; T = {args.T}, batch {args.batch}, {args.n_in} input "
        f"features; fastest of {args.rounds} interleaved rounds; ratio against the first row of each group; "
        "x floor against the compute floor, forward + (k2/k1) x backward over the batch (chunked by k1, each "
        "part timed on its own)"
    )
    return title + "\n\n" + bc.markdown_table(HEADER, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11, --quick 1)")
    parser.add_argument("--T", type=int, default=None, help="time steps per batch (default 400, --quick 16)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32, --quick 2)")
    parser.add_argument("--cases", type=parse_cases, default=None,
                        help="speed cases as model:k1:k2, comma-separated, e.g. gru:2:40,lstm:20:20 (default: all)")


def parse_cases(text: str) -> List[Tuple[str, int, int]]:
    """``"gru:2:40,lstm:20:20"`` -> ``[("gru", 2, 40), ("lstm", 20, 20)]``."""
    cases = []
    for item in text.replace(",", " ").split():
        kind, *steps = item.split(":")
        if kind not in HIDDEN or len(steps) != 2 or not all(v.isdigit() and int(v) > 0 for v in steps):
            raise argparse.ArgumentTypeError(f"bad case {item!r}: expected model:k1:k2 with model in {sorted(HIDDEN)}")
        k1, k2 = map(int, steps)
        if k2 < k1:
            raise argparse.ArgumentTypeError(f"bad case {item!r}: k2 must be >= k1")
        cases.append((kind, k1, k2))
    return cases


def resolve(args) -> None:
    defaults = {"rounds": (11, 1), "T": (400, 16), "batch": (32, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--n-in", type=int, default=16, help="input features")
    bc.add_malloc_argument(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    resolve(args)
    bc.resolve_malloc(args)
    print(section(args))


if __name__ == "__main__":
    main()
