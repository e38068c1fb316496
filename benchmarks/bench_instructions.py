"""Instructions: the work each contender of the speed table does, counted exactly by valgrind's callgrind.

Wall time on a shared 2-core machine moves by 5 to 15% from one round to the next, more than the 3 to 5% the
trainer's overhead is allowed. An instruction count does not move: the same run counts the same instructions,
whatever else the machine does. It measures work, not speed: it is blind to cache misses and waiting, so a
change that frees memory later (and runs slower for it) can leave the count unchanged. The two tables
answer different questions; together they say whether a gap in time is work the trainer adds.

Every case runs in one process under ``valgrind --tool=callgrind``, one thread, with the same contenders as
the speed table (the compute floor aside). Each contender runs once to warm up, then once counted, on a
fresh copy of the model. Cases run in parallel, one per CPU: counts do not depend on the load. Only the
step-wise GRUCell cases are counted: there the trainer's Python work weighs most, while a fused LSTM(256)
spends its instructions in the same matrix kernels for every contender and runs 50 times slower under
valgrind, several minutes per contender.

    python benchmarks/bench_instructions.py                 # about 11 minutes on 2 cores
    python benchmarks/overlap.py --sections instructions    # the same table
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch

import bench_common as bc
import bench_speed

HEADER = ["model", "k1", "k2", "contender", "instructions", "ratio"]
CASES = [case for case in bench_speed.FULL_CASES if case[0] == "gru"]


def count_case(case: Tuple[str, int, int], T: int, batch: int, n_in: int, hidden: int, out: str) -> None:
    """In the valgrind process: count every contender of ``case``, one callgrind dump each, in table order."""
    torch.set_num_threads(1)
    contenders = bench_speed.case_contenders(torch.device("cpu"), T, batch, n_in, case, hidden, lambda: None)
    del contenders[bc.FLOOR]  # times parts of a run on its own: nothing to count
    with open(out, "w") as names:
        for name, setup in contenders.items():
            setup()()  # warm-up: first-call costs (allocator, dispatcher caches) are not the contender's
            run = setup()
            torch._C._valgrind_toggle()  # callgrind's client requests, as torch.utils.benchmark uses them
            run()
            torch._C._valgrind_toggle_and_dump_stats()  # one dump per contender; callgrind zeroes the counts
            names.write(name + "\n")


def dump_total(path: str) -> int:
    """The instruction count of one callgrind dump (its ``totals:`` or ``summary:`` line)."""
    with open(path) as f:
        for line in f:
            match = re.match(r"(?:totals|summary):\s*(\d+)", line)
            if match:
                return int(match.group(1))
    raise ValueError(f"no instruction total in {path}")


def run_case(case: Tuple[str, int, int], T: int, batch: int, n_in: int, hidden: int) -> List[List[str]]:
    """The table rows of one case, counted in a valgrind process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        names, base = os.path.join(tmp, "names"), os.path.join(tmp, "callgrind.out")
        numbers = map(str, (*case, T, batch, n_in, hidden))
        worker = [sys.executable, os.path.abspath(__file__), "--worker", *numbers, names]
        command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={base}", *worker]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        with open(names) as f:
            contenders = f.read().splitlines()
        counts = [dump_total(f"{base}.{i}") for i in range(1, len(contenders) + 1)]
    label = bc.model_label(case[0], hidden)
    return [
        [label, case[1], case[2], name, f"{n:,}", f"{n / counts[0]:.3f}"] for name, n in zip(contenders, counts)
    ]


def run(
    cases: Sequence[Tuple[str, int, int]], T: int, batch: int, n_in: int, hidden: dict, jobs: int
) -> List[List[str]]:
    """The rows of every case, ``jobs`` valgrind processes at a time."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_case, case, T, batch, n_in, hidden[case[0]]) for case in cases]
        return [row for future in futures for row in future.result()]


def section(args) -> str:
    if shutil.which("valgrind") is None:
        return "Instructions: skipped, valgrind is not installed."
    cases = getattr(args, "cases", None) or (bench_speed.QUICK_CASES if args.quick else CASES)
    hidden = bench_speed.hidden_sizes(args.quick)
    T = args.instructions_T
    rows = run(cases, T, args.batch, args.n_in, hidden, os.cpu_count() or 1)
    title = (
        f"Instructions (callgrind, exact): CPU, 1 torch thread, torch {torch.__version__}; T = {T}, batch "
        f"{args.batch}, {args.n_in} input features; one counted run after a warm-up; ratio against the first row "
        "of each group"
    )
    return title + "\n\n" + bc.markdown_table(HEADER, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instructions-T", type=int, default=None,
                        help="time steps per batch for instruction counts (default 48, --quick 16)")


def resolve(args) -> None:
    if args.instructions_T is None:
        args.instructions_T = 16 if args.quick else 48


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind, *numbers, out = argv[1:]
        k1, k2, T, batch, n_in, hidden = map(int, numbers)
        count_case((kind, k1, k2), T, batch, n_in, hidden, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-in", type=int, default=16, help="input features")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32, --quick 2)")
    parser.add_argument("--cases", type=bench_speed.parse_cases, default=None,
                        help="model:k1:k2, comma-separated (default: the GRUCell cases of the speed table)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 32)
    resolve(args)
    print(section(args))


if __name__ == "__main__":
    main()
