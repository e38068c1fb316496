"""The main job: a character-level LSTM language model trained with TBPTT on a real corpus.

The text streams through :class:`~ignite_tbptt.StreamBatches` into parallel rows fed as consecutive batches
with ``carry_state=True``, so the hidden state flows through the whole corpus. A progress bar advances per
chunk with the running loss (with tqdm installed), and held-out bits per character (and perplexity) come from
the chunked evaluator after every epoch. The default corpus is the English text of the Python documentation
that ships with CPython (``pydoc_data.topics``), as one document; ``--text PATH ...`` trains on your own UTF-8
files instead, each file a document (the state resets where a file starts). Nothing is downloaded.

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
    python -m ignite_tbptt.demo --corpus corpus/ --shuffle --schedule cosine --warmup 100 --clip 1.0

``--save PATH`` writes one file with the weights, the vocabulary and the model's sizes, read back safely
(``torch.load(..., weights_only=True)``) by two subcommands. It is checked before training starts, written at
every epoch's end (to a temporary file, then renamed) and on Ctrl-C, with what ``--resume PATH`` needs to
continue the run; the model with the best validation so far goes to ``PATH`` with ``.best`` before its suffix,
and the loss curve to ``.loss.png`` (with matplotlib installed). Nothing is overwritten without ``--force``::

    python -m ignite_tbptt.demo --save model.pt
    python -m ignite_tbptt.demo --resume model.pt --epochs 8
    python -m ignite_tbptt.demo score --load model.best.pt --text FILE...
    python -m ignite_tbptt.demo sample --load model.pt --prompt "The " --length 300 --temperature 0.7 --top-k 20
"""

import argparse
import collections
import math
import os
import pickle
import re
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
from ignite_tbptt.corpus import PreparedCorpus, prepare_corpus, read_corpus, read_text_file

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
    docs = [read_text_file_for("--text", p) for p in paths]
    total = sum(len(d) for d in docs)
    if total < 1000:
        raise ValueError(f"--text: need at least 1000 characters of text, got {total}")
    return docs


def read_text_file_for(option: str, path: str) -> str:
    """:func:`~ignite_tbptt.corpus.read_text_file`, its error prefixed with the option that named the file."""
    try:
        return read_text_file(path)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


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
SETTINGS = ("vocab_size", "hidden_size", "embedding_size")


def model_record(model: CharLSTM, vocab: List[str]) -> Dict[str, Any]:
    """What :func:`load_model` rebuilds the model from: its weights, vocabulary and sizes, tagged with the format."""
    settings = {"vocab_size": model.embed.num_embeddings, "hidden_size": model.lstm.hidden_size,
                "embedding_size": model.embed.embedding_dim}
    return {"format": SAVED_FORMAT, "vocab": list(vocab), "settings": settings,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def write_atomically(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it to ``path``: an interrupted write leaves the
    previous file whole, never a truncated one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_model(path: Union[str, Path], model: CharLSTM, vocab: List[str], **extra: Any) -> None:
    """One file from which :func:`load_model` rebuilds the model: its weights, vocabulary and sizes.

    It holds tensors, strings and numbers only, so ``torch.load(..., weights_only=True)`` reads it: loading a
    file received from someone else runs none of its code. ``extra`` entries (the training state that
    ``--resume`` continues from, the validation result) are saved beside the model.
    """
    write_atomically(path, lambda temporary: torch.save({**model_record(model, vocab), **extra}, temporary))


def read_saved(path: str, option: str = "--load") -> Dict[str, Any]:
    """The record in a file written by :func:`save_model`, read without unpickling any object, or a
    ``ValueError`` that names the option, the file and the problem."""
    if Path(path).is_dir():
        raise ValueError(f"{option}: {path} is a directory, not a file saved by --save")
    if not Path(path).is_file():
        raise ValueError(f"{option}: no such file: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a Python object ({found.group(1)})" if found else "Python objects other than tensors"
        raise ValueError(f"{option}: {path} is refused: it holds {what}, which only unpickling could rebuild, and "
                         "unpickling a file can run its code; --save writes tensors, strings and numbers only") from None
    except Exception as e:  # not a file that torch.save wrote: text, a truncated or an empty file
        raise ValueError(f"{option}: {path} is not a file saved by --save (torch.load: {type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != SAVED_FORMAT:
        raise ValueError(f"{option}: {path} is not a model saved by --save (format {SAVED_FORMAT!r})")
    settings, vocab = saved.get("settings"), saved.get("vocab")
    if not isinstance(settings, dict) or any(not isinstance(settings.get(k), int) or settings[k] < 1 for k in SETTINGS):
        raise ValueError(f"{option}: {path} lacks the model's settings: {', '.join(SETTINGS)} (positive ints)")
    if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab) or not isinstance(saved.get("state_dict"), dict):
        raise ValueError(f"{option}: {path} lacks the model's vocabulary (a list of characters) or weights")
    if len(vocab) != settings["vocab_size"]:
        raise ValueError(f"{option}: {path} has a vocabulary of {len(vocab)} for a model of {settings['vocab_size']}")
    return saved


def model_from(saved: Dict[str, Any], path: str, option: str = "--load") -> CharLSTM:
    """The model of a record read by :func:`read_saved`, or a ``ValueError`` where its weights disagree with its settings."""
    settings = saved["settings"]
    model = CharLSTM(settings["vocab_size"], settings["hidden_size"], settings["embedding_size"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:  # missing or unexpected weights, or shapes of another size
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{option}: {path}: the weights disagree with the settings {settings}: "
                         f"{problems[0] if problems else e}") from None
    return model


def load_model(path: str, device: torch.device = torch.device("cpu")) -> Tuple[CharLSTM, List[str]]:
    """The model and vocabulary saved by :func:`save_model`, in eval mode, or a ``ValueError`` saying why not.

    Args:
        path: a file written by ``--save`` (or :func:`save_model`).
        device: where the model goes.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> save_model(path, CharLSTM(3, 8), ["a", "b", "c"])
        >>> model, vocab = load_model(path)
        >>> vocab, model.lstm.hidden_size
        (['a', 'b', 'c'], 8)
    """
    saved = read_saved(path)
    return model_from(saved, path).to(device).eval(), saved["vocab"]


class SavePaths(NamedTuple):
    """The files that ``--save PATH`` writes: the latest model with its training state, the best model by
    validation, and the loss curve."""

    latest: Path
    best: Path
    curve: Path

    @classmethod
    def of(cls, path: str) -> "SavePaths":
        latest = Path(path)
        return cls(latest, latest.with_name(f"{latest.stem}.best{latest.suffix or '.pt'}"),
                   latest.with_name(f"{latest.stem}.loss.png"))


def check_writable(option: str, path: Path, force: bool, ours: Sequence[Path] = ()) -> None:
    """Before any work: ``path`` can be written, and overwrites a file only with ``--force`` (or where it is one of
    ``ours``, the files of the run being resumed). A ``ValueError`` names the option, the path and the problem."""
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a directory; give a file name, such as {path / 'model.pt'}")
    if not path.parent.is_dir():
        raise ValueError(f"{option}: no such directory: {path.parent} (for {path})")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{option}: cannot write in {path.parent}")
    if path.exists() and not force and path.resolve() not in {p.resolve() for p in ours}:
        raise ValueError(f"{option}: {path} exists; pass --force to overwrite it")


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
    skip_unknown: bool = False, top_k: Optional[int] = None,
) -> str:
    """``prompt`` and ``length`` characters sampled after it, the state carried from the prompt.

    Each character is drawn from the softmax of the model's logits divided by ``temperature``, by a generator
    seeded with ``seed``: the same seed gives the same text.

    Args:
        model: a :class:`CharLSTM` (or any model of the ``(y_pred, hidden)`` protocol over character ids).
        vocab: the characters of the ids, in order.
        prompt: the text to continue; every character must be in ``vocab`` (see ``skip_unknown``).
        length: characters to sample.
        temperature: divides the logits: below 1 the likelier characters gain, above 1 the others do.
        seed: seeds the generator of the draws.
        skip_unknown: leave the prompt's characters outside ``vocab`` out instead of refusing them.
        top_k: draw from the ``top_k`` likeliest characters only (all if ``None``).

    Example:
        >>> model, vocab = CharLSTM(2, 8), ["a", "b"]
        >>> text = sample(model, vocab, "ab", 5, temperature=0.8, seed=1)
        >>> len(text), text == sample(model, vocab, "ab", 5, temperature=0.8, seed=1)
        (7, True)
        >>> set(sample(model, vocab, "ab", 20, top_k=1)[2:]) <= set(vocab)  # always the likeliest one
        True
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if length < 0:
        raise ValueError(f"--length must be >= 0, got {length}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    ids = encode_text(prompt, vocab, skip_unknown)
    if len(ids) == 0:
        raise ValueError("--prompt needs at least one character of the model's vocabulary")
    _, logits, hidden = read_text(model, ids, scored=False)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    out = []
    for _ in range(length):
        logits = logits.double() / temperature
        if top_k is not None and top_k < len(logits):
            logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -math.inf)
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        out.append(vocab[nxt.item()])
        y_pred, hidden = model(nxt.view(1, 1), hidden)
        logits = y_pred[-1, 0]
    return prompt + "".join(out)


class HelpWithDefaults(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


#: The options that ``--resume`` takes from the command line; every other setting is the saved run's.
RESUME_OPTIONS = ("--resume", "--epochs", "--save", "--force", "--no-progress", "--device", "--nproc")
#: The settings of a run that ``--resume`` restores (the data, the model, TBPTT, the optimizer and its schedule).
RUN_SETTINGS = ("text", "corpus", "k1", "k2", "bptt_random", "artbp", "artbp_cap", "overlap", "hidden", "batch_size",
                "seq_len", "lr", "schedule", "warmup", "clip", "shuffle", "seed")


def run_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings ``--resume`` restores, file paths made absolute (a run may resume from another directory)."""
    settings = {name: getattr(args, name) for name in RUN_SETTINGS + ("epochs",)}
    settings["text"] = None if args.text is None else [os.path.abspath(t) for t in args.text]
    settings["corpus"] = None if args.corpus is None else os.path.abspath(args.corpus)
    return settings


def apply_resume(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Take the run's settings from the file ``--resume`` names, refusing options that would change them."""
    given = sorted({token.split("=")[0] for token in argv if token.startswith("--")} - set(RESUME_OPTIONS))
    if given:
        raise ValueError(f"--resume continues the saved run with its own settings: leave out {', '.join(given)} "
                         f"(only {', '.join(RESUME_OPTIONS[1:])} apply)")
    saved = read_saved(args.resume, "--resume")
    training = saved.get("training")
    if not isinstance(training, dict) or not isinstance(training.get("settings"), dict):
        raise ValueError(f"--resume: {args.resume} holds a model but no training state (a .best file?); "
                         "resume from the file --save wrote")
    epochs = args.epochs if "--epochs" in {token.split("=")[0] for token in argv} else None
    vars(args).update(training["settings"])
    args.epochs = epochs or training["settings"].get("epochs", args.epochs)  # the saved run's, unless given
    args.resumed = saved
    if args.save is None:
        args.save = args.resume


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], prog="python -m ignite_tbptt.demo", formatter_class=HelpWithDefaults,
        epilog="subcommands: " + "; ".join(f"python -m ignite_tbptt.demo {name} ... ({text})"
                                           for name, (_, text) in COMMANDS.items()),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", help="train on these UTF-8 text files (one document each) instead of the Python docs")
    source.add_argument("--corpus", metavar="DIR", help="train on a corpus written by the prepare subcommand, read batch by batch")
    parser.add_argument("--k1", type=int, default=25, help="time steps per update (tbtt_step)")
    parser.add_argument("--k2", type=int, default=None, help="time steps to backpropagate (default: k1)")
    parser.add_argument("--bptt-random", action="store_true",
                        help="AWD-LSTM's random chunk lengths around --k1 (RandomLength), the rate scaled by length")
    parser.add_argument("--artbp", type=float, metavar="P", default=None,
                        help="unbiased truncation instead of --k2: truncate at each chunk boundary with probability P (ARTBP)")
    parser.add_argument("--artbp-cap", type=int, metavar="C", default=None,
                        help="with --artbp: backpropagate at most C chunks (default: no cap)")
    parser.add_argument("--overlap", choices=["recompute", "retain"], default="recompute",
                        help="how the steps shared by consecutive windows are backpropagated, when --k2 > --k1")
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (with --resume: in all, those done included; the saved run's if left out)")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden size")
    parser.add_argument("--batch-size", type=int, default=32, help="parallel streams, over all processes")
    parser.add_argument("--seq-len", type=int, default=200, help="time steps per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (the peak, with a schedule)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="the learning rate over the run: constant, or a cosine decay to lr / 10 by the last batch")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="batches over which the learning rate rises linearly to --lr")
    parser.add_argument("--clip", type=float, default=None, metavar="NORM",
                        help="clip the gradient's norm to NORM before each update")
    parser.add_argument("--shuffle", action="store_true", help="reorder the documents every epoch")
    parser.add_argument("--nproc", type=int, default=1, help="processes to train on (ignite.distributed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (with --nproc, one GPU per process)")
    parser.add_argument("--seed", type=int, default=0, help="the initial weights, the shuffle and the random draws")
    parser.add_argument("--save", metavar="PATH",
                        help="save the model here at every epoch's end and on Ctrl-C, for score, sample and --resume; "
                             "the best by validation goes to PATH with .best before its suffix")
    parser.add_argument("--resume", metavar="PATH", help="continue the run saved in PATH, with its settings, to its --epochs (or to those given)")
    parser.add_argument("--force", action="store_true", help="let --save overwrite existing files")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args = parser.parse_args(argv)
    args.resumed = None
    if args.resume is not None:
        try:
            apply_resume(args, argv)
        except ValueError as e:
            parser.error(str(e))
    for name in ("k1", "epochs", "hidden", "batch_size", "seq_len", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.clip is not None and not args.clip > 0:
        parser.error(f"--clip must be > 0, got {args.clip}")
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


def learning_rate(args: argparse.Namespace, batches_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of batch ``i`` (from 0) of the run: ``--lr``, or a cosine decay from it to ``--lr / 10``
    at the last batch of ``--epochs``, after a linear rise over the first ``--warmup`` batches.

    It depends on the batch count alone, so a resumed run (whose trainer restores the count) continues it.

    >>> rate = learning_rate(argparse.Namespace(lr=1.0, warmup=2, schedule="cosine", epochs=1), 5)
    >>> [round(rate(i), 3) for i in range(5)]
    [0.5, 0.868, 0.55, 0.232, 0.1]
    """
    last = max(1, args.epochs * batches_per_epoch - 1)

    def rate(i: int) -> float:
        warm = min(1.0, (i + 1) / args.warmup) if args.warmup else 1.0
        if args.schedule == "constant":
            return args.lr * warm
        return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, i / last))))

    return rate


def write_loss_curve(path: Path, history: Dict[str, Any], batches_per_epoch: int) -> bool:
    """The loss curve as a PNG (written to a temporary file, then renamed): every batch's training loss and each
    epoch's validation, in bits per character. ``False`` where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend or window is chosen for the user
    except ModuleNotFoundError:
        return False
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    batch_bits = history["batch_bits"]
    axes.plot([(i + 1) / batches_per_epoch for i in range(len(batch_bits))], batch_bits, lw=0.8, label="training batch")
    epochs = range(1, len(history["valid_bits"]) + 1)
    axes.plot(epochs, history["valid_bits"], "o-", label="validation")
    axes.set(xlabel="epoch", ylabel="bits per character", title="loss curve")
    axes.legend()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    return True


class Interrupted(Exception):
    """Ctrl-C stopped training; the message says what was saved."""


def train(local_rank: int, args: argparse.Namespace, corpus: Union[Corpus, FileCorpus]) -> None:
    """One process' part of the run: its rows of every batch, gradients averaged across processes.

    With ``--save``, the first process saves the model and its training state at every epoch's end, the best
    model by validation, the loss curve, and on Ctrl-C (on one process) the state there.
    """
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
        device=device, clip_grad_norm=args.clip,
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: batches.set_epoch(engine.state.epoch - 1))
    rate = learning_rate(args, len(batches))

    @trainer.on(Events.ITERATION_STARTED)
    def set_learning_rate(engine: Engine) -> None:
        for group in optimizer.param_groups:
            group["lr"] = rate(engine.state.iteration - 1)

    TbpttLoss().attach(trainer, "loss")  # the epoch's training loss, over all its time steps and processes
    evaluator = create_supervised_tbptt_evaluator(
        model, {"loss": Loss(sequence_loss)}, tbtt_step=args.k1 * 4, carry_state=True, output_transform=flat_pair,
        device=device,
    )
    history: Dict[str, Any] = {"batch_bits": [], "train_bits": [], "valid_bits": [], "best_valid": math.inf}
    if args.resumed is not None:
        training = args.resumed["training"]
        model.load_state_dict(args.resumed["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
        trainer.load_state_dict(training["trainer"])
        history.update(training["history"])
    done = trainer.state.iteration
    say(
        f"corpus: {corpus.characters:,} characters in {corpus.documents} document(s), vocabulary {len(corpus.vocab)}; {len(batches)} batches of "
        f"{args.batch_size} x {args.seq_len}"
        f"{f' on {world} processes' if world > 1 else ''}; TBPTT(k1={args.k1}{' random' if args.bptt_random else ''}, "
        f"k2={args.window or args.k1}, {args.overlap})"
        + (f"; resumed after {done // len(batches)} epoch(s) and {done % len(batches)} batch(es)" if done else "")
    )
    if first:
        attach_progress(trainer, every=200, bar=not args.no_progress)
    paths = SavePaths.of(args.save) if args.save and first else None

    def save(engine: Engine) -> None:
        training = {"settings": run_settings(args), "trainer": engine.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history}
        save_model(paths.latest, model, corpus.vocab, training=training)

    @trainer.on(Events.ITERATION_COMPLETED)
    def record_loss(engine: Engine) -> None:
        history["batch_bits"].append(float(engine.state.output) * LOG2E)

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate(engine: Engine) -> None:
        train_bits = engine.state.metrics["loss"] * LOG2E
        valid_bits = evaluator.run(valid_batches).metrics["loss"] * LOG2E
        history["train_bits"].append(train_bits)
        history["valid_bits"].append(valid_bits)
        best = valid_bits < history["best_valid"]
        history["best_valid"] = min(valid_bits, history["best_valid"])
        say(f"epoch {engine.state.epoch}: train {train_bits:.3f}, validation {valid_bits:.3f} bits/char "
            f"(perplexity {2 ** valid_bits:.2f}){', the best so far' if best else ''}")
        if paths is not None:
            if best:
                save_model(paths.best, model, corpus.vocab, epoch=engine.state.epoch, validation_bits=valid_bits)
            save(engine)
            if not write_loss_curve(paths.curve, history, len(batches)) and engine.state.epoch == 1 + done // len(batches):
                say("loss curve: not written, matplotlib is not installed")

    start = time.perf_counter()
    # Ctrl-C gets one message, ours below: not Ignite's "Engine run is terminating due to exception: " line too.
    # (Engine loggers are shared by class, so the filter goes when the run ends.)
    not_on_ctrl_c = lambda record: sys.exc_info()[0] is not KeyboardInterrupt  # noqa: E731
    trainer.logger.addFilter(not_on_ctrl_c)
    try:
        trainer.run(batches, max_epochs=args.epochs)
    except KeyboardInterrupt:
        at = f"{trainer.state.epoch} epoch(s) and {trainer.state.iteration % len(batches)} batch(es)"
        if paths is not None and world == 1:
            save(trainer)
            raise Interrupted(f"saved {paths.latest} after {at}; continue with --resume {paths.latest}") from None
        if paths is not None:
            raise Interrupted(f"{paths.latest} holds the last completed epoch; continue with --resume {paths.latest}") from None
        raise Interrupted("nothing saved (no --save)") from None
    finally:
        trainer.logger.removeFilter(not_on_ctrl_c)
    elapsed = time.perf_counter() - start
    tokens = (trainer.state.iteration - done) * batches.steps * args.batch_size / len(batches)
    say(
        f"result: train {history['train_bits'][-1]:.3f} bits/char, validation {history['valid_bits'][-1]:.3f} bits/char "
        f"(perplexity {2 ** history['valid_bits'][-1]:.2f}), {elapsed:.0f} s, {tokens / elapsed:,.0f} tokens/s"
    )
    if first:
        prompt = "The " if set("The ") <= set(corpus.vocab) else corpus.vocab[0]  # characters the model knows
        print("sample:", sample(model, corpus.vocab, prompt, 160, temperature=0.7, seed=args.seed).replace("\n", " "))
        if paths is not None:
            say(f"saved: {paths.latest}, the best by validation {paths.best} "
                f"(python -m ignite_tbptt.demo score --load {paths.best} --text FILE)")


def score_main(argv: Sequence[str]) -> int:
    """``score --load PATH --text FILE...``: the bits per character of each file, the state carried across it."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo score", description=COMMANDS["score"][1],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--load", required=True, metavar="PATH", help="a model saved by --save")
    parser.add_argument("--text", required=True, nargs="+", metavar="FILE", help="UTF-8 text files, each scored on its own")
    parser.add_argument("--skip-unknown", action="store_true", help="leave out characters outside the vocabulary")
    parser.add_argument("--chunk", type=int, default=200, help="time steps held at once")
    args = parser.parse_args(argv)
    model, vocab = load_model(args.load)
    total_bits, total_chars = 0.0, 0
    for path in args.text:
        ids = encode_text(read_text_file_for("--text", path), vocab, args.skip_unknown)
        if len(ids) < 2:
            raise ValueError(f"--text: {path} has {len(ids)} character(s) to read: scoring needs 2 or more")
        bits = read_text(model, ids, args.chunk)[0]
        print(f"{path}: {bits:.3f} bits/char (perplexity {2 ** bits:.2f}) over {len(ids) - 1:,} characters")
        total_bits, total_chars = total_bits + bits * (len(ids) - 1), total_chars + len(ids) - 1
    if len(args.text) > 1:
        print(f"all: {total_bits / total_chars:.3f} bits/char (perplexity {2 ** (total_bits / total_chars):.2f}) "
              f"over {total_chars:,} characters")
    return 0


def sample_main(argv: Sequence[str]) -> int:
    """``sample --load PATH --prompt TEXT``: continuations of the prompt, one per ``--num-samples``."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo sample", description=COMMANDS["sample"][1],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--load", required=True, metavar="PATH", help="a model saved by --save")
    parser.add_argument("--prompt", required=True, help="the text to continue; the state is carried from it")
    parser.add_argument("--length", type=int, default=200, help="characters to sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits; lower is more conservative")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="draw from the K likeliest characters only")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="continuations, the n-th drawn with seed + n - 1")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    parser.add_argument("--skip-unknown", action="store_true", help="leave out prompt characters outside the vocabulary")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, vocab = load_model(args.load)
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1} (seed {args.seed + n})")
        print(sample(model, vocab, args.prompt, args.length, args.temperature, args.seed + n, args.skip_unknown, args.top_k))
    return 0


def prepare(argv: Sequence[str]) -> int:
    """``prepare --text FILE... --out DIR``: write a corpus for ``--corpus DIR``."""
    parser = argparse.ArgumentParser(prog="python -m ignite_tbptt.demo prepare", description=COMMANDS["prepare"][1])
    parser.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one document each")
    parser.add_argument("--out", required=True, metavar="DIR", help="the corpus directory (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite the corpus already in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a directory")
    existing = [name for name in ("tokens.bin", "offsets.npy", "vocab.json") if (out / name).exists()]
    if existing and not args.force:
        raise ValueError(f"--out: {out} already holds a corpus ({', '.join(existing)}); pass --force to overwrite it")
    try:
        corpus = prepare_corpus([Path(p) for p in args.text], out)
    except OSError as e:
        raise ValueError(f"--out: {e}") from None
    print(f"prepared {args.out}: {corpus.tokens:,} characters in {corpus.documents} document(s), "
          f"vocabulary {len(corpus.vocab)}, {corpus.dtype} tokens")
    return 0


# name -> (function of the rest of the command line, returning the exit code; its one-line description)
COMMANDS: Dict[str, Tuple[Callable[[Sequence[str]], int], str]] = {
    "prepare": (prepare, "write text files as a token file, its document index and vocabulary, for --corpus"),
    "score": (score_main, "the bits per character of text files under a model saved by --save"),
    "sample": (sample_main, "a continuation of a prompt sampled from a model saved by --save"),
}


def check_resumable(args: argparse.Namespace, corpus: Union[Corpus, FileCorpus], batches_per_epoch: int) -> None:
    """The saved run continues on this corpus: the same vocabulary and epoch length, epochs left to train."""
    saved, path = args.resumed, args.resume
    model_from(saved, path, "--resume")  # weights that fit the settings
    if saved["vocab"] != list(corpus.vocab):
        raise ValueError(f"--resume: the corpus' vocabulary ({len(corpus.vocab)} characters) is not the saved model's "
                         f"({len(saved['vocab'])}): its text files have changed")
    trainer = saved["training"].get("trainer", {})
    if trainer.get("epoch_length") != batches_per_epoch:
        raise ValueError(f"--resume: {path} was trained on {trainer.get('epoch_length')} batches per epoch, the corpus "
                         f"now gives {batches_per_epoch}: its text files have changed")
    done = trainer.get("iteration", 0) / batches_per_epoch
    if done >= args.epochs:
        raise ValueError(f"--resume: {path} has trained {done:g} epoch(s) already; pass --epochs above {done:g}")


def check_outputs(args: argparse.Namespace) -> None:
    """Every file ``--save`` will write can be written, and overwrites only with ``--force`` or its own run's files."""
    if args.save is None:
        return
    ours = SavePaths.of(args.resume) if args.resume is not None else ()
    check_writable("--save", Path(args.save), args.force, ours)  # a directory first: it has no .best sibling
    for path in SavePaths.of(args.save)[1:]:
        check_writable("--save", path, args.force, ours)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]][0](argv[1:])
        args = parse_args(argv)
        world = world_size(args)
        check_outputs(args)  # before any work, so that a bad --save never costs a run
        if args.corpus is not None:
            corpus: Union[Corpus, FileCorpus] = split_file(read_corpus(args.corpus))
        else:
            corpus = encode(load_documents(args.text))
        batches, _ = make_batches(corpus, args, torch.device("cpu"), rank=0, world=world, check=True)  # bad input fails here
        if args.resumed is not None:
            check_resumable(args, corpus, len(batches))
        backend = "nccl" if args.device.type == "cuda" else "gloo"
        if args.nproc > 1:
            with idist.Parallel(backend=backend, nproc_per_node=args.nproc, master_port=free_port()) as parallel:
                parallel.run(train, args, corpus)
        elif launched_by_torchrun():
            with idist.Parallel(backend=backend) as parallel:
                parallel.run(train, args, corpus)
        else:
            train(0, args, corpus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
