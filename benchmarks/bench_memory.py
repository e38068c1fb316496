"""Memory: peak memory of one training batch, each measurement in a fresh process.

A child process builds the model and the trainer, trains one chunk of one sample (to load code and kernels),
resets its peak memory to the current one and reads it (``before``), creates the inputs, trains one batch of
``T`` steps and reads the peak again. Comparing two lengths ``T`` shows what grows with the sequence: for a
trainer whose memory is bounded by the window, only the inputs.

On the CPU the peak is the peak resident memory: ``VmHWM`` on Linux, reset through ``/proc/self/clear_refs``
(``ru_maxrss`` elsewhere). Memory is measured with glibc's mmap threshold fixed at its default, 128 KiB
(``bench_common.set_malloc("mmap")``): glibc otherwise raises it as large blocks are freed, serves later large
tensors from a heap that is not returned to the system, and the resident peak wanders by tens of MiB from one
process to the next. Fixed, large tensors are mapped and unmapped and the peak follows the live tensors; they
also run slower, so times come from separate runs under ``--malloc``. On CUDA the peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

``--child JSON`` runs one measurement and prints its result as one JSON line; the rest is the parent.
"""

import argparse
import gc
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

import bench_common as bc

ROOT = bc.ROOT


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` on Linux, else ``ru_maxrss``.

    On Linux ``ru_maxrss`` is no use here: ``exec`` carries the peak of the process that spawned the child
    into it (the parent holds torch and the benchmark's models, hundreds of MiB), so a small child reports
    the parent's peak. ``VmHWM`` is the peak of the child's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> None:
    """Lower the peak to the current resident memory, where Linux allows it (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement, in this (fresh) process."""
    bc.set_malloc(cfg["malloc"])
    from ignite_tbptt import ARTBP, create_supervised_tbptt_trainer

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    vocab = cfg.get("vocab")  # a word-level language model over this many words, else an LSTM regression
    if vocab:
        torch.manual_seed(0)
        model = bc.WordLM(vocab, cfg["n_in"], cfg["hidden"]).to(device)
        data = lambda T, batch: bc.make_tokens(T, batch, vocab, device)  # noqa: E731
    else:
        model = bc.make_model("lstm", cfg["n_in"], cfg["hidden"], device)
        data = lambda T, batch: bc.make_data(T, batch, cfg["n_in"], device)  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = bc.lm_loss if vocab else nn.MSELoss()
    if cfg["who"] == "hand-written loop":
        step = lambda x, y: bc.hand_written(model, optimizer, loss_fn, x, y, cfg["k1"])  # noqa: E731
    else:
        k2 = ARTBP(**cfg["artbp"]) if cfg.get("artbp") else cfg["k2"]  # random truncation (bench_artbp)
        trainer = create_supervised_tbptt_trainer(
            model, optimizer, loss_fn, tbtt_step=cfg["k1"], k2=k2, overlap=cfg["overlap"], **cfg["extra"]
        )
        step = lambda x, y: trainer.run([(x, y)])  # noqa: E731
    step(*data(cfg["k1"], 1))  # warm-up: load code and kernels, allocate little
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        gc.collect()
        _reset_peak_rss()
        before = _peak_rss_bytes()
    x, y = data(cfg["T"], cfg["batch"])
    times = []
    for _ in range(cfg.get("repeats", 1)):  # timing runs: the fastest batch, as in the speed section
        start = time.perf_counter()
        step(x, y)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return dict(cfg, before=before, peak=peak, inputs=bc.nbytes(x, y), seconds=seconds)


def measure(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Run :func:`child` for ``cfg`` in a fresh Python process and return its result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {cfg} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(configs: Sequence[Dict[str, Any]], jobs: int) -> List[Dict[str, Any]]:
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(measure, configs))


def _mib(n: float) -> str:
    return f"{n / bc.MIB:.1f}"


def describe(cfg: Dict[str, Any]) -> List[Any]:
    overlap = "-" if cfg["who"] != "ignite_tbptt" else cfg["overlap"]
    extra = "".join(f", {k}={v}" for k, v in cfg["extra"].items())
    return [cfg["who"] + extra, cfg["k1"], cfg["k2"], overlap]


def tables(results: Sequence[Dict[str, Any]], lengths: Sequence[int], cuda: bool) -> str:
    peak_name = "peak allocated" if cuda else "peak RSS"
    rows = []
    for r in results:
        rows.append(describe(r) + [
            r["T"], _mib(r["inputs"]), _mib(r["before"]), _mib(r["peak"]),
            _mib(r["peak"] - r["before"] - r["inputs"]),
        ])
    header = ["run", "k1", "k2", "overlap", "T", "inputs MiB", "before inputs MiB", f"{peak_name} MiB",
              "peak - before - inputs MiB"]
    out = bc.markdown_table(header, rows)
    short, long = min(lengths), max(lengths)
    if short != long:
        growth = []
        by_key = {(tuple(describe(r)), r["T"]): r for r in results}
        for key in dict.fromkeys(tuple(describe(r)) for r in results):
            a, b = by_key.get((key, short)), by_key.get((key, long))
            if a and b:
                d_in, d_peak = b["inputs"] - a["inputs"], b["peak"] - a["peak"]
                growth.append(list(key) + [_mib(d_in), _mib(d_peak), _mib(d_peak - d_in)])
        header = ["run", "k1", "k2", "overlap", "inputs growth MiB", f"{peak_name} growth MiB",
                  "growth beyond inputs MiB"]
        out += f"\n\nGrowth from T = {short:,} to T = {long:,}:\n\n" + bc.markdown_table(header, growth)
    return out


def memory_configs(args) -> List[Dict[str, Any]]:
    common = dict(device=str(args.device), hidden=args.mem_hidden, batch=args.mem_batch, n_in=args.n_in, extra={},
                  threads=getattr(args, "threads", None), malloc="mmap")
    if args.quick:
        runs = [("ignite_tbptt", 4, 8, "retain")]
    else:
        runs = [("hand-written loop", 20, 20, "-"), ("ignite_tbptt", 20, 20, "recompute"),
                ("ignite_tbptt", 20, 100, "recompute"), ("ignite_tbptt", 20, 100, "retain")]
    return [dict(common, who=who, k1=k1, k2=k2, overlap=overlap, T=T)
            for who, k1, k2, overlap in runs for T in args.mem_T]


def section(args) -> str:
    results = measure_all(memory_configs(args), args.jobs)
    title = (
        f"Memory: {bc.describe_device(args.device)}; LSTM({args.mem_hidden}) fused, batch {args.mem_batch}, "
        f"{args.n_in} input features, one batch per fresh process; `before inputs` is the memory after imports, "
        "model, trainer and a one-chunk warm-up, before the inputs exist; glibc's mmap threshold fixed at 128 KiB"
    )
    return title + "\n\n" + tables(results, args.mem_T, args.device.type == "cuda") + "\n\n" + vocabulary_table(args)


def vocabulary_table(args) -> str:
    """A word-level language model whose embedding and decoder dwarf its LSTM: the overlap modes' peaks.

    ``retain`` keeps, for every retained chunk, what its state path's graph saved: the LSTM's parameter
    versions and activations, not the embedding's or the decoder's.
    """
    vocab, embed, hidden, k1, k2, T, batch = (500, 16, 32, 4, 16, 32, 2) if args.quick else (20000, 256, 512, 10, 80, 200, 8)
    common = dict(device=str(args.device), hidden=hidden, batch=batch, n_in=embed, extra={}, who="ignite_tbptt",
                  k1=k1, k2=k2, T=T, vocab=vocab, threads=getattr(args, "threads", None), malloc="mmap")
    recompute, retain = measure_all([dict(common, overlap=o) for o in ("recompute", "retain")], args.jobs)
    peak = "peak allocated" if args.device.type == "cuda" else "peak RSS"
    rows = [[r["overlap"], _mib(r["before"]), _mib(r["peak"]), f"{r['peak'] / recompute['peak']:.2f}"]
            for r in (recompute, retain)]
    return (
        f"A large vocabulary: embedding {vocab:,} x {embed}, LSTM({embed}, {hidden}), decoder {hidden} -> {vocab:,}, "
        f"batch {batch}, k1 = {k1}, k2 = {k2}, T = {T}, one batch per fresh process:\n\n"
        + bc.markdown_table(["overlap", "before inputs MiB", f"{peak} MiB", "against recompute"], rows)
    )


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing inside the window (Gruslys et al. 2016): measured only if the trainer has it.


def checkpoint_option() -> Any:
    """The trainer's checkpointing argument (any parameter whose name contains "checkpoint"), or None."""
    from ignite_tbptt import create_supervised_tbptt_trainer

    names = [n for n in inspect.signature(create_supervised_tbptt_trainer).parameters if "checkpoint" in n]
    return names[0] if names else None


def checkpoint_section(args) -> str:
    name = args.checkpoint_kw.split("=")[0] if args.checkpoint_kw else checkpoint_option()
    if name is None:
        return "Checkpointing inside the window: skipped, the trainer has no checkpointing option."
    # The last three windows are k2 long; recompute runs about 15,000 steps forward and backward.
    k1, k2, T = (4, 16, 24) if args.quick else (200, 2000, 2400)
    if args.checkpoint_kw:
        value = json.loads(args.checkpoint_kw.split("=", 1)[1])
    else:  # checkpoint_every=N: segments of N steps; about sqrt(k2) balances memory and recomputation
        value = round(math.sqrt(k2)) if name == "checkpoint_every" else True
    common = dict(device=str(args.device), hidden=args.mem_hidden, batch=args.mem_batch, n_in=args.n_in,
                  who="ignite_tbptt", k1=k1, k2=k2, T=T, threads=getattr(args, "threads", None))
    modes = ("retain",) if args.quick else ("recompute", "retain")
    configs = [dict(common, overlap=overlap, extra=extra) for overlap in modes for extra in ({}, {name: value})]
    # memory with large tensors mapped on their own, times under --malloc; one at a time where times count
    memory = measure_all([dict(c, malloc="mmap") for c in configs], args.jobs if args.quick else 1)
    timing = measure_all([dict(c, malloc=args.malloc, repeats=1 if args.quick else 3) for c in configs],
                         args.jobs if args.quick else 1)
    rows = []
    for i in range(0, len(configs), 2):
        work = [r["peak"] - r["before"] - r["inputs"] for r in memory[i:i + 2]]
        seconds = [r["seconds"] for r in timing[i:i + 2]]
        ratio = f"{work[0] / work[1]:.2f}" if work[1] > 0 else "-"
        rows.append([configs[i]["overlap"], k1, k2, T, _mib(work[0]), _mib(work[1]), ratio, f"{seconds[0]:.2f}",
                     f"{seconds[1]:.2f}", f"{seconds[1] / seconds[0]:.2f}"])
    header = ["overlap", "k1", "k2", "T", "peak - before - inputs MiB", f"with {name}={value} MiB", "memory ratio",
              "s", f"with {name}={value} s", "time ratio"]
    timing_note = "" if args.quick else ", the fastest of 3 batches in a process of their own"
    title = (
        f"Checkpointing inside the window: LSTM({args.mem_hidden}) fused, batch {args.mem_batch}, one batch per "
        f"fresh process{'' if args.quick else ', one process at a time'}; memory as in the memory section, "
        f"times under --malloc {args.malloc}{timing_note}"
    )
    return title + "\n\n" + bc.markdown_table(header, rows) + "\n\n" + retain_bound_note(args, k1, k2, T)


def retain_bound_note(args, k1: int, k2: int, T: int) -> str:
    """The least time ratio checkpointing can reach with ``retain``, from this model's forward and backward times.

    ``retain`` runs each step forward once and backpropagates it ``r = k2 / k1`` times: ``F + r B``. With
    checkpointing every one of those backward passes first re-runs the forward pass of the segment it reaches,
    since nothing is kept between updates: ``F + r (F + B)``.
    """
    device = args.device
    x, y = bc.make_data(T, args.mem_batch, args.n_in, device)
    model = bc.make_model("lstm", args.n_in, args.mem_hidden, device)
    parts = [bc.floor_parts(model, nn.MSELoss(), x, y, k1, bc.synchronizer(device)) for _ in range(3)]
    f, b = min(p[0] for p in parts), min(p[1] for p in parts)
    r = k2 / k1
    return (
        f"Forward F = {f:.2f} s and backward B = {b:.2f} s over the batch (chunked by k1, fastest of 3): retain "
        f"with checkpointing cannot take less than (F + r (F + B)) / (F + r B) = {(f + r * (f + b)) / (f + r * b):.2f}x "
        f"the time of retain without it, r = k2 / k1 = {r:g}."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem-T", type=bc.parse_ints, default=None,
                        help="sequence lengths for the memory section (default 2000,20000; --quick 100,400)")
    parser.add_argument("--mem-hidden", type=int, default=None, help="LSTM size (default 256, --quick 32)")
    parser.add_argument("--mem-batch", type=int, default=None, help="batch size (default 32, --quick 4)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="measuring processes at once (default 1; 2 with --quick)")
    parser.add_argument("--checkpoint-kw", default=None, metavar="NAME=JSON",
                        help="the trainer's checkpointing argument and value (default: checkpoint_every=sqrt(k2))")


def resolve(args) -> None:
    defaults = {"mem_T": ([2000, 20000], [100, 400]), "mem_hidden": (256, 32), "mem_batch": (32, 4), "jobs": (1, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--n-in", type=int, default=16)
    bc.add_malloc_argument(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    resolve(args)
    if args.malloc is None:
        args.malloc = "default" if args.quick else "heap"  # for the checkpointing times; not for this process
    print(section(args))


if __name__ == "__main__":
    main()
