"""Corpora larger than memory: ``StreamBatches.from_file`` on a generated token file of 1e9 ``uint16`` tokens.

Writes the file (in chunks, never all in memory) with its ``offsets.npy`` of 1e5 documents, then measures, in
this process:

1. the index: ``StreamBatches.from_file`` (loading and checking the offsets) and laying out a shuffled epoch,
   which reads no token;
2. producing batches of 64 x 256 (``+ 1`` target step) from the file, over ``--batches`` shuffled batches, and
   the resident memory meanwhile: the growth of the peak over the baseline taken before building, both as
   ``ru_maxrss`` and (on Linux) as ``VmHWM`` reset through ``/proc/self/clear_refs`` (``ru_maxrss`` can only
   go up, so a peak from before, generating the file or loading torch, hides anything below it);
3. one training step of the main job's model on such a batch (the demo's ``CharLSTM``, hidden 256,
   ``tbtt_step=25``, Adam, ``carry_state=True``), to put the batch's cost in proportion;
4. checking every token id against the vocabulary (``vocab_size=``), a scan of the whole file in chunks.

The file is written just before it is read, so it is read from the page cache: this measures the library's
work, not the disk.

    python benchmarks/bench_corpus.py              # 1e9 tokens, 1e5 documents, 500 batches (about 2 GB of disk)
    python benchmarks/bench_corpus.py --quick      # a tiny file
    python benchmarks/bench_corpus.py --dir /data --keep
"""

import argparse
import itertools
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from ignite.engine import Events

import bench_common as bc
from bench_memory import _peak_rss_bytes, _reset_peak_rss
from ignite_tbptt import StreamBatches, create_supervised_tbptt_trainer
from ignite_tbptt.demo import CharLSTM, sequence_loss

VOCAB = 100  # a character vocabulary's size
CHUNK = 1 << 24  # tokens written at a time


def write_corpus(directory: str, tokens: int, documents: int, seed: int = 0) -> Tuple[str, str]:
    """``tokens.bin`` of random ``uint16`` ids and ``offsets.npy`` of ``documents`` random starts (even
    positions: every document at least 2 tokens), written a chunk at a time."""
    rng = np.random.default_rng(seed)
    starts = np.unique(rng.integers(1, tokens // 2, size=documents - 1)) * 2
    offsets = np.concatenate([[0], starts]).astype(np.int64)
    tokens_path, offsets_path = os.path.join(directory, "tokens.bin"), os.path.join(directory, "offsets.npy")
    with open(tokens_path, "wb") as f:
        for start in range(0, tokens, CHUNK):
            f.write(rng.integers(0, VOCAB, size=min(CHUNK, tokens - start), dtype=np.uint16).tobytes())
    np.save(offsets_path, offsets)
    return tokens_path, offsets_path


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure(args, tokens_path: str, offsets_path: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = CharLSTM(VOCAB, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    out: Dict[str, Any] = {}
    _reset_peak_rss()
    base_max, base_hwm = max_rss_bytes(), _peak_rss_bytes()

    start = time.perf_counter()
    batches = StreamBatches.from_file(tokens_path, args.batch_size, args.seq_len, dtype="uint16",
                                      offsets=offsets_path, shuffle=True, seed=0)
    out["index_s"] = time.perf_counter() - start
    batches.set_epoch(1)
    start = time.perf_counter()
    batches._epoch_of(1)  # the epoch's layout alone: order, row spans, resets and masks
    out["epoch_s"] = time.perf_counter() - start
    out["documents"], out["n_batches"] = len(batches._source.lengths), len(batches)

    times: List[float] = []
    iterator = iter(batches)
    for _ in range(min(args.batches, len(batches))):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    out["batch_s"], out["batch_max_s"], out["batches"] = statistics.median(times), max(times), len(times)
    out["rss_max_mb"] = (max_rss_bytes() - base_max) / bc.MIB
    out["rss_hwm_mb"] = (_peak_rss_bytes() - base_hwm) / bc.MIB
    del iterator, batches

    # One training step of the main job on batches of this file (one warm-up step, then the fastest of the rest).
    train = StreamBatches.from_file(tokens_path, args.batch_size, args.seq_len, dtype="uint16", offsets=offsets_path,
                                    shuffle=True, seed=0)
    trainer = create_supervised_tbptt_trainer(model, optimizer, sequence_loss, tbtt_step=args.k1, carry_state=True)
    steps: List[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: steps.append(time.perf_counter()))
    trainer.run(list(itertools.islice(train, args.steps + 1)))
    steps.append(time.perf_counter())
    out["step_s"] = min(b - a for a, b in zip(steps[1:-1], steps[2:]))

    _reset_peak_rss()
    base_hwm = _peak_rss_bytes()
    start = time.perf_counter()
    StreamBatches.from_file(tokens_path, args.batch_size, args.seq_len, dtype="uint16", offsets=offsets_path,
                            vocab_size=VOCAB)
    out["check_s"] = time.perf_counter() - start
    out["check_hwm_mb"] = (_peak_rss_bytes() - base_hwm) / bc.MIB
    return out


def table(args, m: Dict[str, Any]) -> str:
    ratio = m["batch_s"] / m["step_s"]
    verdict = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = [
        ["index: `from_file` (offsets loaded and checked)", f"{m['index_s']:.3f} s", "", ""],
        ["laying out a shuffled epoch (no token read)", f"{m['epoch_s']:.3f} s", "< 5 s", verdict(m["epoch_s"] < 5)],
        [f"producing a batch of {args.batch_size} x {args.seq_len} (median of {m['batches']})",
         f"{m['batch_s'] * 1e3:.2f} ms (slowest {m['batch_max_s'] * 1e3:.2f} ms)", "", ""],
        [f"one training step, LSTM({args.hidden}) char model, k1 = {args.k1}", f"{m['step_s']:.3f} s", "", ""],
        ["batch / training step", f"{100 * ratio:.3f}%", "< 1%", verdict(ratio < 0.01)],
        [f"peak RSS growth over {m['batches']} batches, `ru_maxrss`", f"{m['rss_max_mb']:.1f} MiB", "< 200 MB",
         verdict(m["rss_max_mb"] < 190)],
        [f"peak RSS growth over {m['batches']} batches, `VmHWM`", f"{m['rss_hwm_mb']:.1f} MiB", "< 200 MB",
         verdict(m["rss_hwm_mb"] < 190)],
        ["checking every token id (`vocab_size=`)", f"{m['check_s']:.2f} s, peak growth {m['check_hwm_mb']:.1f} MiB",
         "", ""],
    ]
    return (
        f"Corpora larger than memory: {args.tokens:,} uint16 tokens ({args.tokens * 2 / 1e9:.2f} GB) in "
        f"{m['documents']:,} documents, {m['n_batches']:,} batches per epoch; {os.cpu_count()} CPUs, "
        f"{bc.describe_device(torch.device('cpu'))}{bc.load_note()}; malloc {args.malloc}\n\n"
        + bc.markdown_table(["measure", "value", "target", "met"], rows)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny file: 1e5 tokens, 100 documents, 5 batches")
    parser.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus files (and reuse them if present)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens in the file (default 1e9)")
    parser.add_argument("--documents", type=int, default=None, help="documents (default 1e5)")
    parser.add_argument("--batches", type=int, default=None, help="batches to produce (default 500)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows (default 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="steps per batch (default 256)")
    parser.add_argument("--hidden", type=int, default=None, help="LSTM hidden size (default 256, the demo's)")
    parser.add_argument("--k1", type=int, default=25, help="tbtt_step of the training step (the demo's default)")
    parser.add_argument("--steps", type=int, default=None, help="training steps timed (default 3)")
    bc.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    quick = {"tokens": 100_000, "documents": 100, "batches": 5, "batch_size": 8, "seq_len": 32, "hidden": 16,
             "steps": 2}
    full = {"tokens": 10**9, "documents": 10**5, "batches": 500, "batch_size": 64, "seq_len": 256, "hidden": 256,
            "steps": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bc.resolve_malloc(args)
    directory = args.dir or tempfile.mkdtemp(prefix="bench_corpus_")
    os.makedirs(directory, exist_ok=True)
    try:
        tokens_path, offsets_path = os.path.join(directory, "tokens.bin"), os.path.join(directory, "offsets.npy")
        reuse = args.keep and os.path.isfile(offsets_path) and os.path.getsize(tokens_path) == 2 * args.tokens
        if not reuse:
            start = time.perf_counter()
            write_corpus(directory, args.tokens, args.documents)
            print(f"wrote {tokens_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        print(table(args, measure(args, tokens_path, offsets_path)))
    finally:
        if not args.keep:
            for name in ("tokens.bin", "offsets.npy"):
                if os.path.exists(os.path.join(directory, name)):
                    os.remove(os.path.join(directory, name))
            if args.dir is None:
                shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
