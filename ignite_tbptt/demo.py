"""The main job: a character-level LSTM language model trained with TBPTT on a real corpus.

The text is cut into parallel streams fed as consecutive batches with ``carry_state=True``, so the hidden
state flows through the whole corpus. A progress bar advances per chunk with the running loss (with tqdm
installed), and held-out bits per character come from the chunked evaluator after every epoch. The default corpus is the English text of the Python documentation
that ships with CPython (``pydoc_data.topics``); ``--text PATH ...`` trains on your own files instead.
Nothing is downloaded.

Run it with ``python -m ignite_tbptt.demo`` (or the ``ignite-tbptt-demo`` console script)::

    python -m ignite_tbptt.demo --epochs 1 --k1 25 --k2 50 --overlap retain
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Loss
from torch import nn

from ignite_tbptt import (
    ChunkProgressBar,
    TbpttLoss,
    Tbptt_Events,
    create_supervised_tbptt_evaluator,
    create_supervised_tbptt_trainer,
)

LOG2E = 1 / math.log(2)


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> linear decoder, following the ``(y_pred, hidden)`` protocol."""

    def __init__(self, vocab_size: int, hidden_size: int, embedding_size: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size)
        self.decode = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor, hidden: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        out, hidden = self.lstm(self.embed(x), hidden)
        return self.decode(out), hidden


def load_text(paths: Optional[Sequence[str]]) -> str:
    """The user's files joined, or the Python documentation topics shipped with CPython."""
    if not paths:
        from pydoc_data.topics import topics

        return "\n".join(topics[k] for k in sorted(topics))
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"--text: no such file: {p}")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    if len(text) < 1000:
        raise ValueError(f"--text: need at least 1000 characters of text, got {len(text)}")
    return text


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``streams`` parallel streams: shape ``(time, streams)``."""
    length = ids.numel() // streams
    return ids[: length * streams].view(streams, length).t().contiguous()


def sequence_loss(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1))


def stream_batches(data: torch.Tensor, seq_len: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(input, next character)`` batches of ``seq_len`` steps over ``(time, streams)`` data."""
    return [
        (data[s : s + seq_len], data[s + 1 : s + 1 + seq_len])
        for s in range(0, data.shape[0] - seq_len - 1, seq_len)
    ]


def flat_pair(x: torch.Tensor, y: torch.Tensor, y_pred: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1)


def attach_progress(trainer: Engine, every: int, bar: bool) -> None:
    """A per-chunk progress bar if asked and tqdm is installed; otherwise a line every ``every`` chunks."""
    if bar:
        try:
            bar = ChunkProgressBar(persist=True, desc="epoch", mininterval=0.5)
            bar.attach(trainer, output_transform=lambda loss: loss * LOG2E)  # shown in bits per character
            return
        except ModuleNotFoundError:
            pass

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED(every=every))
    def log_chunk(engine: Engine) -> None:
        bits = float(engine.state.output) * LOG2E
        print(f"  chunk {engine.state.time_iteration:6d}  loss {bits:.3f} bits/char")


@torch.no_grad()
def sample(model: nn.Module, vocab: List[str], prompt: str, length: int, device: torch.device) -> str:
    """Greedy-ish sampling (temperature 0.7) from the trained model."""
    model.eval()
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([[index.get(c, 0)] for c in prompt], device=device)
    y_pred, hidden = model(ids)
    out = []
    for _ in range(length):
        probs = torch.softmax(y_pred[-1, 0] / 0.7, dim=-1)
        nxt = torch.multinomial(probs, 1)
        out.append(vocab[nxt.item()])
        y_pred, hidden = model(nxt.view(1, 1), hidden)
    return prompt + "".join(out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m ignite_tbptt.demo")
    parser.add_argument("--text", nargs="+", help="train on these text files instead of the Python docs")
    parser.add_argument("--k1", type=int, default=25, help="time steps per update (tbtt_step)")
    parser.add_argument("--k2", type=int, default=None, help="time steps to backpropagate (default: k1)")
    parser.add_argument("--overlap", choices=["recompute", "retain"], default="recompute")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden size")
    parser.add_argument("--batch-size", type=int, default=32, help="parallel streams")
    parser.add_argument("--seq-len", type=int, default=200, help="time steps per batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args = parser.parse_args(argv)
    for name in ("k1", "epochs", "hidden", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k2 is not None and args.k2 < args.k1:
        parser.error(f"--k2 ({args.k2}) must be >= --k1 ({args.k1})")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {e}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        text = load_text(args.text)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(ids.numel() * 0.95)
    train = batchify(ids[:split], args.batch_size).to(args.device)
    valid = batchify(ids[split:], 8).to(args.device)
    batches = stream_batches(train, args.seq_len)
    if not batches:
        print(f"error: the text is too short for --seq-len {args.seq_len}", file=sys.stderr)
        return 2

    model = CharLSTM(len(vocab), args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, sequence_loss, tbtt_step=args.k1, k2=args.k2, overlap=args.overlap, carry_state=True
    )
    TbpttLoss().attach(trainer, "loss")  # the epoch's training loss, over all its time steps
    evaluator = create_supervised_tbptt_evaluator(
        model, {"loss": Loss(sequence_loss)}, tbtt_step=args.k1 * 4, carry_state=True, output_transform=flat_pair
    )
    valid_batches = stream_batches(valid, args.seq_len)
    print(
        f"corpus: {len(text):,} characters, vocabulary {len(vocab)}; {len(batches)} batches of "
        f"{args.batch_size} x {args.seq_len}; TBPTT(k1={args.k1}, k2={args.k2 or args.k1}, {args.overlap})"
    )
    attach_progress(trainer, every=200, bar=not args.no_progress)
    results = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate(engine: Engine) -> None:
        results["train"] = engine.state.metrics["loss"] * LOG2E
        results["valid"] = evaluator.run(valid_batches).metrics["loss"] * LOG2E
        print(f"epoch {engine.state.epoch}: train {results['train']:.3f}, validation {results['valid']:.3f} bits/char")

    start = time.perf_counter()
    trainer.run(batches, max_epochs=args.epochs)
    elapsed = time.perf_counter() - start
    tokens = sum(y.numel() for _, y in batches) * args.epochs
    print(
        f"result: train {results['train']:.3f} bits/char, validation {results['valid']:.3f} bits/char, "
        f"{elapsed:.0f} s, {tokens / elapsed:,.0f} tokens/s"
    )
    print("sample:", sample(model, vocab, "The ", 160, args.device).replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
