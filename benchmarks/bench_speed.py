"""Speed: the trainer against hand-written loops and Ignite's trainer, and against the compute floor.

All contenders of a case run in this one process in interleaved rounds (A B C A B C ...), each on a fresh copy
of the same model and on the same batch; the table reports the median seconds per batch over the rounds.

- ``k1 == k2``: a hand-written loop, Ignite's trainer and ``ignite_tbptt``.
- ``k2 > k1``: a hand-written recompute loop, a hand-written retain loop, and both overlap modes.

Every case also times the compute floor of TBPTT(k1, k2): ``forward + (k2 / k1) * backward`` over the batch,
the forward (chunked by ``k1``) and the backward timed separately. ``x floor`` is a contender's time over it.
"""

import argparse
from typing import Dict, List, Sequence, Tuple

import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from torch import nn

import bench_common as bc
from ignite_tbptt import create_supervised_tbptt_trainer

# (model kind, k1, k2) in table order
FULL_CASES = [("lstm", 20, 20), ("gru", 20, 20), ("lstm", 20, 40), ("gru", 20, 40), ("lstm", 5, 40), ("gru", 5, 40)]
QUICK_CASES = [("lstm", 4, 4), ("gru", 4, 8)]
HIDDEN = {"lstm": 256, "gru": 64}


def contenders_for(fresh, loss_fn, x, y, k1: int, k2: int, sync) -> Dict[str, object]:
    def engine(factory, **kw):
        model, opt = fresh()
        trainer = factory(model, opt, loss_fn, tbtt_step=k1, **kw)
        return lambda: trainer.run([(x, y)])

    def loop(fn):
        model, opt = fresh()
        return lambda: fn(model, opt, loss_fn, x, y, k1, k2)

    def floor():
        model, _ = fresh()
        return lambda: (lambda f, b: f + (k2 / k1) * b)(*bc.floor_parts(model, loss_fn, x, y, k1, sync))

    if k2 == k1:
        contenders = {
            "hand-written loop": loop(bc.hand_written),
            "ignite trainer": engine(ignite_trainer),
            "ignite_tbptt": engine(create_supervised_tbptt_trainer),
        }
    else:
        contenders = {
            "hand-written recompute": loop(bc.hand_written_recompute),
            "hand-written retain": loop(bc.hand_written_retain),
            "ignite_tbptt recompute": engine(create_supervised_tbptt_trainer, k2=k2, overlap="recompute"),
            "ignite_tbptt retain": engine(create_supervised_tbptt_trainer, k2=k2, overlap="retain"),
        }
    contenders[bc.FLOOR] = floor()
    return contenders


def run(
    device: torch.device, T: int, batch: int, n_in: int, rounds: int, cases: Sequence[Tuple[str, int, int]],
    hidden: Dict[str, int],
) -> List[List[str]]:
    """Table rows: model, k1, k2, contender, s/batch, ratio to the group's first row, ratio to the floor."""
    sync = bc.synchronizer(device)
    x, y = bc.make_data(T, batch, n_in, device)
    loss_fn = nn.MSELoss()
    rows = []
    for kind, k1, k2 in cases:
        base = bc.make_model(kind, n_in, hidden[kind], device)
        contenders = contenders_for(bc.fresh_copies(base), loss_fn, x, y, k1, k2, sync)
        result = bc.interleaved(contenders, rounds, sync)
        floor = result.pop(bc.FLOOR)
        first = next(iter(result.values()))
        label = bc.model_label(kind, hidden[kind])
        for name, seconds in result.items():
            rows.append([label, k1, k2, name, f"{seconds:.4f}", f"{seconds / first:.2f}", f"{seconds / floor:.2f}"])
        rows.append([label, k1, k2, "floor: fwd + (k2/k1) bwd", f"{floor:.4f}", f"{floor / first:.2f}", "1.00"])
    return rows


HEADER = ["model", "k1", "k2", "contender", "s/batch", "ratio", "x floor"]


def section(args) -> str:
    cases = QUICK_CASES if args.quick else FULL_CASES
    hidden = {k: 16 for k in HIDDEN} if args.quick else HIDDEN
    rows = run(args.device, args.T, args.batch, args.n_in, args.rounds, cases, hidden)
    title = (
        f"Speed: {bc.describe_device(args.device)}; T = {args.T}, batch {args.batch}, {args.n_in} input "
        f"features; median of {args.rounds} interleaved rounds; ratio against the first row of each group; "
        "x floor against the compute floor, forward + (k2/k1) x backward over the batch (chunked by k1, each "
        "part timed on its own)"
    )
    return title + "\n\n" + bc.markdown_table(HEADER, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 1)")
    parser.add_argument("--T", type=int, default=None, help="time steps per batch (default 400, --quick 16)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32, --quick 2)")


def resolve(args) -> None:
    defaults = {"rounds": (7, 1), "T": (400, 16), "batch": (32, 2)}
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
