"""Benchmark the TBPTT trainer: speed against hand-written loops, Ignite's trainer and the compute floor; memory.

One command prints every table (markdown):

    python benchmarks/overlap.py                      # CPU: speed, memory, checkpointing (if the trainer has it)
    python benchmarks/overlap.py --quick              # tiny sizes, a few seconds: a smoke test
    python benchmarks/overlap.py --sections speed     # or memory, checkpoint, instructions; comma-separated
    python benchmarks/overlap.py --device cuda        # times with torch.cuda.synchronize, max_memory_allocated
    python benchmarks/overlap.py --threads 1          # one torch thread: steadier on a busy machine
    python benchmarks/overlap.py --malloc default     # leave glibc's allocator as it is (see bench_common)

Sections (each is also a script of its own):

- ``speed`` (``bench_speed.py``): all contenders of a case in one fresh process, interleaved rounds, fresh
  copies of the same model; the fastest round's seconds per batch, ratios (of fastest rounds and of medians)
  against the first row, and the ratio to the compute floor ``forward + (k2 / k1) * backward``.
- ``memory`` (``bench_memory.py``): peak memory of one batch at two sequence lengths, each measurement in a
  fresh process, next to the size of the inputs.
- ``checkpoint`` (``bench_memory.py``): peak memory and time at ``k2 = 2000`` with and without the trainer's
  activation-checkpointing option; skipped when the trainer has none.
- ``instructions`` (``bench_instructions.py``, only when named): the speed table's contenders counted in
  instructions by valgrind's callgrind (GRUCell cases), exact where times are noisy; about 11 minutes, skipped
  without valgrind.
- ``compile`` (``bench_compile.py``, only when named): ``torch.compile`` (inductor) against eager, in the trainer
  and in Ignite's trainer on the same compiled model: compile seconds, steady-state seconds per batch; about 4
  minutes on 2 CPU cores.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import bench_compile  # noqa: E402
import bench_instructions  # noqa: E402
import bench_memory  # noqa: E402
import bench_speed  # noqa: E402

SECTIONS = {
    "speed": bench_speed.section, "memory": bench_memory.section, "checkpoint": bench_memory.checkpoint_section,
    "instructions": bench_instructions.section, "compile": bench_compile.section,
}
DEFAULT_SECTIONS = ["speed", "memory", "checkpoint"]  # instructions, compile: slow, asked for by name


def parse_sections(text: str):
    names = [s for s in text.replace(",", " ").split() if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--sections", type=parse_sections, default=DEFAULT_SECTIONS,
                        help="comma-separated: speed, memory, checkpoint, instructions, compile (default: the first three)")
    parser.add_argument("--n-in", type=int, default=16, help="input features")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, here and in the memory processes (default: torch's; --quick 1)")
    bc.add_malloc_argument(parser)
    bench_speed.add_arguments(parser)
    bench_memory.add_arguments(parser)
    bench_instructions.add_arguments(parser)
    args = parser.parse_args(argv)
    bench_speed.resolve(args)
    bench_memory.resolve(args)
    bench_instructions.resolve(args)
    if args.threads is None and args.quick:
        args.threads = 1  # tiny ops: no use for threads, and a busy machine makes spinning threads very slow
    if args.threads:
        torch.set_num_threads(args.threads)
    bc.resolve_malloc(args)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    command = "python benchmarks/overlap.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(f"`{command}`: {bc.describe_device(args.device)}, allocator {args.malloc}{bc.load_note()}\n", flush=True)
    for name in args.sections:
        start = time.perf_counter()
        print(SECTIONS[name](args), flush=True)
        print(f"\n({name}: {time.perf_counter() - start:.0f} s{bc.load_note()})\n", flush=True)


if __name__ == "__main__":
    main()
