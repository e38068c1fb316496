"""The main job: a character-level LSTM language model trained with TBPTT on a real corpus.

The text streams through :class:`~ignite_tbptt.StreamBatches` into parallel rows fed as consecutive batches
with ``carry_state=True``, so the hidden state flows through the whole corpus. A progress bar advances per
chunk with the running loss (with tqdm installed), and held-out bits per character come from the chunked
evaluator after every epoch. The default corpus is the English text of the Python documentation that ships
with CPython (``pydoc_data.topics``), as one document; ``--text PATH ...`` trains on your own files instead,
each file a document (the state resets where a file starts). Nothing is downloaded.

For corpora larger than memory, ``prepare`` writes the files once as a token file with its document index
(:func:`ignite_tbptt.corpus.prepare_corpus`), and ``--corpus DIR`` trains from it, reading every batch from
the file (:meth:`StreamBatches.from_file <ignite_tbptt.StreamBatches.from_file>`). The held-out part is the
same as with ``--text``: the last 5% of the stream, cut at that position, a piece under 2 characters dropped;
it is read from the file too. The subcommands (``prepare``, ``score``, ``sample``) are in ``COMMANDS``; a command line that
does not start with one trains.

``--nproc N`` trains on ``N`` processes through ``ignite.distributed`` (gloo on the CPU, nccl on GPUs), each
on ``batch-size / N`` of the rows; the same script runs under ``torchrun --nproc_per_node N``.

Run it with ``python -m ignite_tbptt.demo`` (or the ``ignite-tbptt-demo`` console script)::

    python -m ignite_tbptt.demo --epochs 1 --k1 25 --k2 50 --overlap retain
    python -m ignite_tbptt.demo --nproc 2
    python -m ignite_tbptt.demo --artbp 0.5 --artbp-cap 8
    python -m ignite_tbptt.demo prepare --text a.txt b.txt --out corpus/
    python -m ignite_tbptt.demo --corpus corpus/ --shuffle

``--save PATH`` writes one file with the weights, the vocabulary and the model's sizes, read back safely
(``torch.load(..., weights_only=True)``) by two subcommands::

    python -m ignite_tbptt.demo --save model.pt
    python -m ignite_tbptt.demo score --load model.pt --text FILE...
    python -m ignite_tbptt.demo sample --load model.pt --prompt "The " --length 300 --temperature 0.7 --seed 1
"""

import argparse
import collections
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Loss
from torch import nn

from ignite_tbptt import (
    ARTBP,
    ChunkProgressBar,
    RandomLength,
    StreamBatches,
    TbpttLoss,
    Tbptt_Events,
    create_supervised_tbptt_evaluator,
    create_supervised_tbptt_trainer,
)
from ignite_tbptt.corpus import PreparedCorpus, prepare_corpus, read_corpus

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


def load_documents(paths: Optional[Sequence[str]]) -> List[str]:
    """The user's files, one document each, or the Python documentation topics shipped with CPython as one."""
    if not paths:
        from pydoc_data.topics import topics

        return ["\n".join(topics[k] for k in sorted(topics))]
    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"--text: no such file: {p}")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    total = sum(len(d) for d in docs)
    if total < 1000:
        raise ValueError(f"--text: need at least 1000 characters of text, got {total}")
    return docs


class Corpus(NamedTuple):
    """The encoded documents, split by position in the stream into training and held-out parts."""

    vocab: List[str]
    train: List[torch.Tensor]
    valid: List[torch.Tensor]

    @property
    def characters(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.valid))

    @property
    def documents(self) -> int:
        return len(self.train)


class FileCorpus(NamedTuple):
    """A prepared corpus on disk, split by position in the stream: training tokens ``[0, stop)`` of its token
    file, held-out tokens ``[start, end)``, as :func:`split_stream` cuts the documents."""

    vocab: List[str]
    prepared: PreparedCorpus
    stop: int
    start: int
    characters: int
    documents: int


def split_stream(docs: List[torch.Tensor], at: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The documents before stream position ``at`` and those after it; a piece under 2 tokens is dropped."""
    before, after, start = [], [], 0
    for doc in docs:
        cut = min(max(at - start, 0), len(doc))
        before.append(doc[:cut])
        after.append(doc[cut:])
        start += len(doc)
    return [p for p in before if len(p) >= 2], [p for p in after if len(p) >= 2]


def encode(texts: List[str], held_out: float = 0.05) -> Corpus:
    """Character ids of the documents; the last ``held_out`` of the stream is the validation text."""
    vocab = sorted(set().union(*texts))
    index = {c: i for i, c in enumerate(vocab)}
    docs = [torch.tensor([index[c] for c in text], dtype=torch.long) for text in texts]
    train, valid = split_stream(docs, int(sum(len(d) for d in docs) * (1 - held_out)))
    return Corpus(vocab, train, valid)


def split_file(prepared: PreparedCorpus, held_out: float = 0.05) -> FileCorpus:
    """The split of :func:`encode` for a prepared corpus: the last ``held_out`` of the stream is held out, the
    document there cut at that position, and a piece under 2 tokens dropped (as :func:`split_stream` does).

    Only the document index is read, not the tokens.
    """
    offsets = np.load(prepared.offsets_path, allow_pickle=False)
    total = prepared.tokens
    at = int(total * (1 - held_out))
    k = int(np.searchsorted(offsets, at, side="right")) - 1  # the document holding stream position `at`
    first, end = int(offsets[k]), int(offsets[k + 1]) if k + 1 < len(offsets) else total
    stop = at if at - first >= 2 else first  # the piece of document k before `at`, kept if 2 tokens or more
    start = at if end - at >= 2 else end  # and the piece after it
    documents = k + int(stop > first)
    return FileCorpus(prepared.vocab, prepared, stop, start, stop + total - start, documents)


def sequence_loss(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1))


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


#: What a file saved by ``--save`` holds, and its format tag.
SAVED_FORMAT = "ignite_tbptt.demo.CharLSTM/1"


def save_model(path: str, model: CharLSTM, vocab: List[str]) -> None:
    """One file from which :func:`load_model` rebuilds the model: its weights, vocabulary and sizes.

    It holds tensors, strings and ints only, so ``torch.load(..., weights_only=True)`` reads it: loading a file
    received from someone else runs none of its code.
    """
    settings = {"vocab_size": model.embed.num_embeddings, "hidden_size": model.lstm.hidden_size,
                "embedding_size": model.embed.embedding_dim}
    torch.save({"format": SAVED_FORMAT, "vocab": list(vocab), "settings": settings,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_model(path: str, device: torch.device = torch.device("cpu")) -> Tuple[CharLSTM, List[str]]:
    """The model and vocabulary saved by :func:`save_model`, in eval mode, or a ``ValueError`` saying why not.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> save_model(path, CharLSTM(3, 8), ["a", "b", "c"])
    >>> model, vocab = load_model(path)
    >>> vocab, model.lstm.hidden_size
    (['a', 'b', 'c'], 8)
    """
    if not Path(path).is_file():
        raise ValueError(f"--load: no such file: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file of another kind, or one that would need unpickling arbitrary objects
        raise ValueError(f"--load: {path} is not a model saved by --save ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(saved, dict) or saved.get("format") != SAVED_FORMAT:
        raise ValueError(f"--load: {path} is not a model saved by --save (format {SAVED_FORMAT!r})")
    settings, vocab = saved["settings"], saved["vocab"]
    if len(vocab) != settings["vocab_size"]:
        raise ValueError(f"--load: {path} has a vocabulary of {len(vocab)} for a model of {settings['vocab_size']}")
    model = CharLSTM(settings["vocab_size"], settings["hidden_size"], settings["embedding_size"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), vocab


def encode_text(text: str, vocab: List[str], skip_unknown: bool = False) -> torch.Tensor:
    """``text`` as character ids of ``vocab``. A character outside the vocabulary is a ``ValueError`` that names
    it, or, with ``skip_unknown``, left out (never silently replaced by another character).

    >>> encode_text("abba", ["a", "b"]).tolist()
    [0, 1, 1, 0]
    >>> encode_text("abc", ["a", "b"])
    Traceback (most recent call last):
    ...
    ValueError: 1 character(s) of the text are not in the model's vocabulary of 2: 'c' (1x); pass --skip-unknown to leave them out
    """
    index = {c: i for i, c in enumerate(vocab)}
    unknown = collections.Counter(c for c in text if c not in index)
    if unknown and not skip_unknown:
        listed = ", ".join(f"{c!r} ({n}x)" for c, n in unknown.most_common(10))
        raise ValueError(
            f"{sum(unknown.values())} character(s) of the text are not in the model's vocabulary of {len(vocab)}: "
            f"{listed}{', ...' if len(unknown) > 10 else ''}; pass --skip-unknown to leave them out"
        )
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def read_text(
    model: nn.Module, ids: torch.Tensor, chunk: int = 200, scored: bool = True
) -> Tuple[Optional[float], torch.Tensor, Any]:
    """Read the text ``ids`` with ``model``, the state carried across it: its bits per character (``None`` for a
    single character, or unless ``scored``), the logits of the character after it, and the state after its last
    character.

    The chunked evaluator predicts every character from those before it, holding one chunk of ``chunk`` steps
    at a time; its carried state (``evaluator.carried_state.hidden``) then reads the last character. Unscored,
    it has no metric, whose result Ignite would gather from every process of a distributed run.
    """
    bits, hidden, device = None, None, next(model.parameters()).device
    ids = ids.to(device)
    if len(ids) >= 2:
        metrics = {"nll": Loss(sequence_loss)} if scored else {}
        evaluator = create_supervised_tbptt_evaluator(model, metrics, tbtt_step=chunk, carry_state=True,
                                                      output_transform=flat_pair)
        state = evaluator.run([(ids[:-1].view(-1, 1), ids[1:].view(-1, 1))])
        bits = state.metrics["nll"] * LOG2E if scored else None
        hidden = evaluator.carried_state.hidden
    model.eval()
    with torch.no_grad():
        last = ids[-1:].view(1, 1)
        y_pred, hidden = model(last) if hidden is None else model(last, hidden)
    return bits, y_pred[-1, 0], hidden


@torch.no_grad()
def sample(
    model: nn.Module, vocab: List[str], prompt: str, length: int, temperature: float = 1.0, seed: int = 0,
    skip_unknown: bool = False,
) -> str:
    """``prompt`` and ``length`` characters sampled after it, the state carried from the prompt.

    Each character is drawn from the softmax of the model's logits divided by ``temperature``, by a generator
    seeded with ``seed``: the same seed gives the same text.

    >>> model, vocab = CharLSTM(2, 8), ["a", "b"]
    >>> text = sample(model, vocab, "ab", 5, temperature=0.8, seed=1)
    >>> len(text), text == sample(model, vocab, "ab", 5, temperature=0.8, seed=1)
    (7, True)
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if length < 0:
        raise ValueError(f"--length must be >= 0, got {length}")
    ids = encode_text(prompt, vocab, skip_unknown)
    if len(ids) == 0:
        raise ValueError("--prompt needs at least one character of the model's vocabulary")
    _, logits, hidden = read_text(model, ids, scored=False)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(vocab[nxt.item()])
        y_pred, hidden = model(nxt.view(1, 1), hidden)
        logits = y_pred[-1, 0]
    return prompt + "".join(out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], prog="python -m ignite_tbptt.demo",
        epilog="subcommands: " + "; ".join(f"python -m ignite_tbptt.demo {name} ... ({text})"
                                           for name, (_, text) in COMMANDS.items()),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", help="train on these text files (one document each) instead of the Python docs")
    source.add_argument("--corpus", metavar="DIR", help="train on a corpus written by the prepare subcommand, read batch by batch")
    parser.add_argument("--k1", type=int, default=25, help="time steps per update (tbtt_step)")
    parser.add_argument("--k2", type=int, default=None, help="time steps to backpropagate (default: k1)")
    parser.add_argument("--bptt-random", action="store_true",
                        help="AWD-LSTM's random chunk lengths around --k1 (RandomLength), the rate scaled by length")
    parser.add_argument("--artbp", type=float, metavar="P", default=None,
                        help="unbiased truncation instead of --k2: truncate at each chunk boundary with probability P (ARTBP)")
    parser.add_argument("--artbp-cap", type=int, metavar="C", default=None,
                        help="with --artbp: backpropagate at most C chunks (default: no cap)")
    parser.add_argument("--overlap", choices=["recompute", "retain"], default="recompute")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden size")
    parser.add_argument("--batch-size", type=int, default=32, help="parallel streams, over all processes")
    parser.add_argument("--seq-len", type=int, default=200, help="time steps per batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--shuffle", action="store_true", help="reorder the documents every epoch")
    parser.add_argument("--nproc", type=int, default=1, help="processes to train on (ignite.distributed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (with --nproc, one GPU per process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="PATH",
                        help="save the trained model here: weights, vocabulary and sizes in one file, for score and sample")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args = parser.parse_args(argv)
    for name in ("k1", "epochs", "hidden", "batch_size", "seq_len", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k2 is not None and args.k2 < args.k1:
        parser.error(f"--k2 ({args.k2}) must be >= --k1 ({args.k1})")
    if args.artbp is not None and args.k2 is not None:
        parser.error("give --k2 (a fixed window) or --artbp (random truncation), not both")
    if args.artbp_cap is not None and args.artbp is None:
        parser.error("--artbp-cap needs --artbp")
    try:
        args.window = args.k2 if args.artbp is None else ARTBP(args.artbp, cap=args.artbp_cap, seed=args.seed)
    except ValueError as e:
        parser.error(f"--artbp: {e}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.nproc > 1 and launched_by_torchrun():
        parser.error("--nproc starts processes itself; under torchrun leave it out and use --nproc_per_node")
    if args.batch_size % world_size(args):
        parser.error(f"--batch-size ({args.batch_size}) must be divisible by the number of processes ({world_size(args)})")
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {e}")
    return args


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def world_size(args: argparse.Namespace) -> int:
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else args.nproc


def validation_rows(world: int) -> int:
    """Eight validation streams, or the nearest count that every process can share equally."""
    return world * max(1, 8 // world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batches(corpus: Union[Corpus, FileCorpus], args: argparse.Namespace, device: torch.device,
                 rank: Optional[int] = None, world: Optional[int] = None, check: bool = False) -> Tuple[StreamBatches, StreamBatches]:
    """The training and held-out batches; ``rank`` and ``world`` default to ``idist``'s. ``check`` checks
    a file corpus' token ids against its vocabulary (a pass over the file, once before training)."""
    valid_rows = validation_rows(idist.get_world_size() if world is None else world)
    shard = dict(rank=rank, world_size=world)
    if isinstance(corpus, FileCorpus):
        prepared = corpus.prepared
        common = dict(dtype=prepared.dtype, offsets=prepared.offsets_path, **shard)
        vocab_size = len(corpus.vocab) if check else None
        return (
            StreamBatches.from_file(prepared.tokens_path, args.batch_size, args.seq_len, stop=corpus.stop,
                                    shuffle=args.shuffle, seed=args.seed, vocab_size=vocab_size, **common),
            StreamBatches.from_file(prepared.tokens_path, valid_rows, args.seq_len, start=corpus.start, **common),
        )
    on_device = lambda docs: [d.to(device) for d in docs]  # noqa: E731
    return (
        StreamBatches(on_device(corpus.train), args.batch_size, args.seq_len, shuffle=args.shuffle, seed=args.seed,
                      **shard),
        StreamBatches(on_device(corpus.valid), valid_rows, args.seq_len, **shard),
    )


def train(local_rank: int, args: argparse.Namespace, corpus: Union[Corpus, FileCorpus]) -> None:
    """One process' part of the run: its rows of every batch, gradients averaged across processes."""
    world, first = idist.get_world_size(), idist.get_rank() == 0
    device = idist.device() if args.device.type == "cuda" and world > 1 else args.device
    say = print if first else (lambda *a, **k: None)
    if device.type == "cpu" and world > 1 and idist.get_nproc_per_node() > 1:
        # Processes sharing a machine share its cores: more threads than cores make every one of them wait.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // idist.get_nproc_per_node()))
    torch.manual_seed(args.seed)  # the same initial model on every process
    batches, valid_batches = make_batches(corpus, args, device)
    model = CharLSTM(len(corpus.vocab), args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    tbtt_step = RandomLength(args.k1, seed=args.seed) if args.bptt_random else args.k1
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, sequence_loss, tbtt_step=tbtt_step, k2=args.window, overlap=args.overlap, carry_state=True,
        device=device,
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: batches.set_epoch(engine.state.epoch - 1))
    TbpttLoss().attach(trainer, "loss")  # the epoch's training loss, over all its time steps and processes
    evaluator = create_supervised_tbptt_evaluator(
        model, {"loss": Loss(sequence_loss)}, tbtt_step=args.k1 * 4, carry_state=True, output_transform=flat_pair,
        device=device,
    )
    say(
        f"corpus: {corpus.characters:,} characters in {corpus.documents} document(s), vocabulary {len(corpus.vocab)}; {len(batches)} batches of "
        f"{args.batch_size} x {args.seq_len}"
        f"{f' on {world} processes' if world > 1 else ''}; TBPTT(k1={args.k1}{' random' if args.bptt_random else ''}, "
        f"k2={args.window or args.k1}, {args.overlap})"
    )
    if first:
        attach_progress(trainer, every=200, bar=not args.no_progress)
    results = {}

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate(engine: Engine) -> None:
        results["train"] = engine.state.metrics["loss"] * LOG2E
        results["valid"] = evaluator.run(valid_batches).metrics["loss"] * LOG2E
        say(f"epoch {engine.state.epoch}: train {results['train']:.3f}, validation {results['valid']:.3f} bits/char")

    start = time.perf_counter()
    trainer.run(batches, max_epochs=args.epochs)
    elapsed = time.perf_counter() - start
    tokens = batches.steps * args.batch_size * args.epochs
    say(
        f"result: train {results['train']:.3f} bits/char, validation {results['valid']:.3f} bits/char, "
        f"{elapsed:.0f} s, {tokens / elapsed:,.0f} tokens/s"
    )
    if first:
        prompt = "The " if set("The ") <= set(corpus.vocab) else corpus.vocab[0]  # characters the model knows
        print("sample:", sample(model, corpus.vocab, prompt, 160, temperature=0.7, seed=args.seed).replace("\n", " "))
        if args.save:
            save_model(args.save, model, corpus.vocab)
            say(f"saved: {args.save} (python -m ignite_tbptt.demo score --load {args.save} --text FILE)")


def score_main(argv: Sequence[str]) -> int:
    """``score --load PATH --text FILE...``: the bits per character of each file, the state carried across it."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo score", description=score_main.__doc__)
    parser.add_argument("--load", required=True, metavar="PATH", help="a model saved by --save")
    parser.add_argument("--text", required=True, nargs="+", metavar="FILE", help="text files, each scored on its own")
    parser.add_argument("--skip-unknown", action="store_true", help="leave out characters outside the vocabulary")
    parser.add_argument("--chunk", type=int, default=200, help="time steps held at once")
    args = parser.parse_args(argv)
    model, vocab = load_model(args.load)
    total_bits, total_chars = 0.0, 0
    for path in args.text:
        if not Path(path).is_file():
            raise ValueError(f"--text: no such file: {path}")
        ids = encode_text(Path(path).read_text(encoding="utf-8"), vocab, args.skip_unknown)
        bits = read_text(model, ids, args.chunk)[0]
        if bits is None:
            raise ValueError(f"--text: {path} has fewer than 2 characters to score")
        print(f"{path}: {bits:.3f} bits/char over {len(ids) - 1:,} characters")
        total_bits, total_chars = total_bits + bits * (len(ids) - 1), total_chars + len(ids) - 1
    if len(args.text) > 1:
        print(f"all: {total_bits / total_chars:.3f} bits/char over {total_chars:,} characters")
    return 0


def sample_main(argv: Sequence[str]) -> int:
    """``sample --load PATH --prompt TEXT --length N --temperature T --seed S``: a continuation of the prompt."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo sample", description=sample_main.__doc__)
    parser.add_argument("--load", required=True, metavar="PATH", help="a model saved by --save")
    parser.add_argument("--prompt", required=True, help="the text to continue; the state is carried from it")
    parser.add_argument("--length", type=int, default=200, help="characters to sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits; lower is more conservative")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    parser.add_argument("--skip-unknown", action="store_true", help="leave out prompt characters outside the vocabulary")
    args = parser.parse_args(argv)
    model, vocab = load_model(args.load)
    print(sample(model, vocab, args.prompt, args.length, args.temperature, args.seed, args.skip_unknown))
    return 0


def prepare(argv: Sequence[str]) -> int:
    """``prepare --text FILE... --out DIR``: write a corpus for ``--corpus DIR`` (:func:`~ignite_tbptt.corpus.prepare_corpus`)."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo prepare", description=COMMANDS["prepare"][1])
    parser.add_argument("--text", nargs="+", required=True, help="text files, one document each (UTF-8)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the corpus directory (created if missing)")
    args = parser.parse_args(argv)
    try:
        corpus = prepare_corpus([Path(p) for p in args.text], args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {args.out}: {corpus.tokens:,} characters in {corpus.documents} document(s), "
          f"vocabulary {len(corpus.vocab)}, {corpus.dtype} tokens")
    return 0


# name -> (function of the rest of the command line, returning the exit code; its one-line description)
COMMANDS: Dict[str, Tuple[Callable[[Sequence[str]], int], str]] = {
    "prepare": (prepare, "write text files as a token file, its document index and vocabulary, for --corpus"),
    "score": (score_main, "the bits per character of text files under a model saved by --save"),
    "sample": (sample_main, "a continuation of a prompt sampled from a model saved by --save"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]][0](argv[1:])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = parse_args(argv)
    try:
        world = world_size(args)
        if args.corpus is not None:
            corpus: Union[Corpus, FileCorpus] = split_file(read_corpus(args.corpus))
        else:
            corpus = encode(load_documents(args.text))
        make_batches(corpus, args, torch.device("cpu"), rank=0, world=world, check=True)  # bad input fails here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    if args.nproc > 1:
        with idist.Parallel(backend=backend, nproc_per_node=args.nproc, master_port=free_port()) as parallel:
            parallel.run(train, args, corpus)
    elif launched_by_torchrun():
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(train, args, corpus)
    else:
        train(0, args, corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
