"""Token corpora on disk: a flat binary file of token ids and its document index, and how to prepare one.

A prepared corpus is a directory of three files:

- ``tokens.bin``: every document's token ids end to end, in the smallest of ``uint8``, ``uint16`` and
  ``int32`` that holds the vocabulary (raw, native byte order, no header);
- ``offsets.npy``: the first token of every document (the first 0), ``int64``, a plain ``.npy`` array;
- ``vocab.json``: the character vocabulary (``"vocab"``, a list whose index is the token id), the
  ``"dtype"``, and the counts ``"vocab_size"``, ``"tokens"`` and ``"documents"``.

:class:`TokenFile` reads such a file with ``os.pread``, one range of tokens at a time:
:meth:`StreamBatches.from_file <ignite_tbptt.StreamBatches.from_file>` builds its batches from it, reading
only the tokens of each batch. Everything read back is read without pickle: raw reads, ``numpy.load(...,
allow_pickle=False)`` and JSON.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["DTYPES", "PreparedCorpus", "TokenFile", "prepare_corpus", "read_corpus", "read_text_file"]

DTYPES = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16), "int32": np.dtype(np.int32)}
CHUNK_TOKENS = 1 << 20  # tokens per read when a whole file is scanned: scans run at constant memory
CHUNK_CHARS = 1 << 20  # characters per read when a text file is prepared

PathLike = Union[str, "os.PathLike[str]"]
Offsets = Union[Sequence[int], np.ndarray, torch.Tensor, PathLike]


def check_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a token file's ``dtype`` name (``"uint8"``, ``"uint16"`` or ``"int32"``).

    >>> check_dtype("uint16")
    dtype('uint16')
    """
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES or isinstance(dtype, bool):
        raise ValueError(f"unknown dtype {dtype!r}: token files are 'uint8', 'uint16' or 'int32'")
    return DTYPES[name]


def _check_index(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _load_offsets(offsets: Offsets) -> np.ndarray:
    if isinstance(offsets, (str, os.PathLike)):
        path = Path(offsets)
        if not path.is_file():
            raise ValueError(f"offsets: no such file: {path}")
        try:
            offsets = np.load(path, allow_pickle=False)
        except Exception as e:  # not a .npy file, or an object array that only pickle could read
            raise ValueError(f"offsets: cannot read {path} as a .npy array without pickle: {e}") from None
    elif isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size == 0:
        raise ValueError(f"offsets must be a non-empty 1-d array of document starts, got shape {offsets.shape}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise TypeError(f"offsets must be integers (the first token of every document), got {offsets.dtype}")
    return offsets.astype(np.int64)


def _check_offsets(offsets: np.ndarray, n_tokens: int, path: str) -> None:
    if offsets[0] != 0:
        raise ValueError(f"offsets must start at 0 (the first document's start), got {offsets[0]}")
    steps = np.diff(offsets)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(
            f"offsets must be strictly increasing (documents of at least one token): offsets[{i}] = {offsets[i]}, "
            f"offsets[{i + 1}] = {offsets[i + 1]}"
        )
    if offsets[-1] >= n_tokens:
        i = int(np.flatnonzero(offsets >= n_tokens)[0])
        raise ValueError(
            f"offsets run past the file: document {i} starts at token {offsets[i]}, but {path} holds {n_tokens} tokens"
        )


class TokenFile:
    """A flat binary file of token ids and its documents, read range by range with ``os.pread``.

    The documents are given by ``offsets`` (the first token of every document, the first 0: a list, an
    array, a tensor, or the path of a ``.npy`` file), by a ``separator`` token id, or by neither (the whole
    file is one document). A separator is dropped: the documents are the runs of tokens between separators,
    and an empty run (a leading or trailing separator, or two in a row) is no document. Finding separators
    scans the file once, in chunks of ``CHUNK_TOKENS`` (2**20) tokens.

    With ``vocab_size``, every token id of the documents is checked to be in ``[0, vocab_size)``, scanning
    the file in chunks: constant memory for any file size. Only ``[start, stop)`` of the file is used (a
    document crossing either end is cut there). Nothing is read until :meth:`read`, which reads only the tokens
    asked for into memory the caller owns: no memory map, so the resident set does not grow with what was read,
    and a file truncated under a running job gives an error instead of killing the process with ``SIGBUS``.
    :meth:`check` says whether the file is still the one indexed (``StreamBatches`` asks after every batch);
    a copy (``pickle``, a ``DataLoader`` worker) reopens the file instead of copying its tokens.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "tokens.bin")
        >>> np.array([5, 6, 7, 0, 8, 9], dtype=np.uint16).tofile(path)
        >>> tokens = TokenFile(path, "uint16", separator=0, vocab_size=10)
        >>> tokens.lengths.tolist(), tokens.read(1, 0, 2).tolist()
        ([3, 2], [8, 9])
        >>> TokenFile(path, "uint16", offsets=[0, 4]).lengths.tolist()
        [4, 2]
    """

    def __init__(
        self,
        path: PathLike,
        dtype: str,
        *,
        offsets: Optional[Offsets] = None,
        separator: Optional[int] = None,
        vocab_size: Optional[int] = None,
        start: int = 0,
        stop: Optional[int] = None,
    ) -> None:
        self.path = os.fspath(path)
        self.dtype = check_dtype(dtype)
        if not os.path.isfile(self.path):
            raise ValueError(f"no such token file: {self.path}")
        size = os.path.getsize(self.path)
        if size == 0:
            raise ValueError(f"token file {self.path} is empty")
        if size % self.dtype.itemsize:
            raise ValueError(
                f"token file {self.path} has {size} bytes, not a multiple of {self.dtype.itemsize} ({self.dtype.name}): "
                "it is truncated, or was written with another dtype"
            )
        self.n_tokens = size // self.dtype.itemsize
        self.start = _check_index("start", start, 0, self.n_tokens - 1)
        self.stop = self.n_tokens if stop is None else _check_index("stop", stop, self.start + 1, self.n_tokens)
        if offsets is not None and separator is not None:
            raise ValueError("give the documents as offsets or by a separator, not both")
        if vocab_size is not None:
            vocab_size = _check_index("vocab_size", vocab_size, 1, 2**31)
        if separator is not None:
            info = np.iinfo(self.dtype)
            separator = _check_index("separator", separator, int(info.min), int(info.max))
        self.separator, self.vocab_size = separator, vocab_size
        if offsets is not None:
            offsets = _load_offsets(offsets)
            _check_offsets(offsets, self.n_tokens, self.path)
            ends = np.append(offsets[1:], self.n_tokens)
            starts, ends = np.maximum(offsets, self.start), np.minimum(ends, self.stop)
        else:
            starts, ends = np.array([self.start]), np.array([self.stop])
        if separator is not None or vocab_size is not None:
            seps = self._scan()
            if separator is not None:
                starts, ends = np.append(self.start, seps + 1), np.append(seps, self.stop)
        keep = ends > starts
        self.starts, self.lengths = starts[keep].astype(np.int64), (ends - starts)[keep].astype(np.int64)
        if len(self.lengths) == 0:
            raise ValueError(f"token file {self.path} holds no document: only separators in [{self.start}, {self.stop})")
        self._identity = _identity(os.stat(self.path))  # the file the index was built from
        self._fd: Optional[int] = None  # opened at the first read

    def _chunks(self) -> Iterator[Tuple[int, np.ndarray]]:
        """``(position, tokens)`` over ``[start, stop)``, read into one reused buffer."""
        buffer = np.empty(min(CHUNK_TOKENS, self.stop - self.start), dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start * self.dtype.itemsize)
            for position in range(self.start, self.stop, len(buffer)):
                n = min(len(buffer), self.stop - position)
                f.readinto(memoryview(buffer[:n]).cast("B"))
                yield position, buffer[:n]

    def _scan(self) -> np.ndarray:
        """The separators' positions, checking the documents' token ids against ``vocab_size`` on the way."""
        found: List[np.ndarray] = []
        for position, chunk in self._chunks():
            if self.separator is not None:
                found.append(np.flatnonzero(chunk == self.separator) + position)
            if self.vocab_size is not None and (chunk.max() >= self.vocab_size or chunk.min() < 0):
                bad = (chunk >= self.vocab_size) | (chunk < 0)
                if self.separator is not None:
                    bad &= chunk != self.separator
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"token file {self.path}: token id {chunk[i]} at position {position + i} is outside the "
                        f"vocabulary [0, {self.vocab_size})"
                    )
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def read(self, document: int, a: int, b: int) -> np.ndarray:
        """Steps ``[a, b)`` of document ``document``: only these tokens are read.

        A read that comes back short (the file was truncated since it was indexed) is a ``ValueError``.
        """
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self.check()  # the file opened is the one indexed
        first, size = int(self.starts[document]) + a, self.dtype.itemsize
        data = os.pread(self._fd, (b - a) * size, first * size)
        if len(data) != (b - a) * size:
            self._changed(f"reading tokens [{first}, {first + b - a}) gave {len(data) // size} of them")
        return np.frombuffer(data, dtype=self.dtype)

    def check(self) -> None:
        """A ``ValueError`` if the open file changed (size, modification time, inode) since it was indexed.

        A file rewritten under a running job, even at the same size, would be read as if it were the one whose
        documents were indexed; ``StreamBatches`` asks after reading every batch, so a batch read while the file
        changed is never trained on.
        """
        if self._fd is not None and _identity(os.fstat(self._fd)) != self._identity:
            self._changed("its size, modification time or inode differ from when it was indexed")

    def _changed(self, how: str) -> None:
        raise ValueError(
            f"token file {self.path} changed under the running job: {how}. Its document index no longer "
            "describes it; rebuild the batches from the new file (or restore the old one)"
        )

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_fd": None}  # a copy opens the file anew (and checks it is the one indexed)

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r}, {self.dtype.name}, {len(self)} document(s), tokens [{self.start}, {self.stop}))"


# ---------------------------------------------------------------------------------------------------------
# Preparing a character-level corpus from text.


def _identity(stat: os.stat_result) -> Tuple[int, int, int]:
    """What tells a changed file: its size, modification time and inode."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class PreparedCorpus(NamedTuple):
    """A prepared corpus directory and what its ``vocab.json`` says."""

    directory: Path
    vocab: List[str]
    dtype: str
    tokens: int
    documents: int

    @property
    def tokens_path(self) -> Path:
        return self.directory / "tokens.bin"

    @property
    def offsets_path(self) -> Path:
        return self.directory / "offsets.npy"


def _not_utf8(path: PathLike, error: UnicodeDecodeError) -> ValueError:
    bad = error.object[error.start : error.start + 1]
    return ValueError(f"{os.fspath(path)} is not UTF-8 text ({error.reason}: byte {bad!r}); convert it to UTF-8 first")


def _check_text_file(path: PathLike) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)} is a directory, not a text file")
    if not os.path.isfile(path):
        raise ValueError(f"no such text file: {os.fspath(path)}")


def read_text_file(path: PathLike) -> str:
    """The text of a UTF-8 file, or a ``ValueError`` that names the file: missing, a directory, or not UTF-8.

    A byte that is not UTF-8 is refused rather than replaced by ``'\\ufffd'``: the model would learn a character
    that the text does not have, and scoring the same file would disagree with training on it.

    Args:
        path: the file.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "latin1.txt")
        >>> _ = open(path, "wb").write("cafés".encode("latin-1"))
        >>> read_text_file(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../latin1.txt is not UTF-8 text (invalid continuation byte: byte b'\\xe9'); convert it to UTF-8 first
    """
    _check_text_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _text_chunks(item: Union[str, PathLike]) -> Iterator[str]:
    """A document's text in chunks: a ``str`` is the text itself, a path-like its UTF-8 file (as the demo reads)."""
    if isinstance(item, str):
        yield item
        return
    with open(item, encoding="utf-8") as f:
        while True:
            try:
                chunk = f.read(CHUNK_CHARS)
            except UnicodeDecodeError as e:
                raise _not_utf8(item, e) from None
            if not chunk:
                return
            yield chunk


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def prepare_corpus(texts_or_paths: Sequence[Union[str, PathLike]], out_dir: PathLike) -> PreparedCorpus:
    """Write a character-level corpus: ``tokens.bin``, ``offsets.npy`` and ``vocab.json`` in ``out_dir``.

    Each item is one document: a ``str`` is the text itself, a path (``pathlib.Path`` or another
    ``os.PathLike``) a UTF-8 text file, read as the demo reads ``--text`` files. The vocabulary is the sorted
    set of characters, as in :func:`ignite_tbptt.demo.encode`; the token ids are stored in the smallest dtype
    that holds them. Files are read twice, in chunks (vocabulary, then ids): memory does not grow with them.

    Args:
        texts_or_paths: the documents, in order: texts (``str``) and paths of UTF-8 files.
        out_dir: the directory to write (created if missing); files of the same names in it are replaced.

    Example:
        >>> import tempfile
        >>> corpus = prepare_corpus(["abba", "cab"], tempfile.mkdtemp())
        >>> corpus.vocab, corpus.dtype, corpus.tokens, corpus.documents
        (['a', 'b', 'c'], 'uint8', 7, 2)
        >>> np.fromfile(corpus.tokens_path, dtype=corpus.dtype).tolist(), np.load(corpus.offsets_path).tolist()
        ([0, 1, 1, 0, 2, 0, 1], [0, 4])
    """
    if isinstance(texts_or_paths, (str, os.PathLike)) or not isinstance(texts_or_paths, Sequence):
        raise TypeError("texts_or_paths must be a list of texts (str) and paths (pathlib.Path), one per document")
    if len(texts_or_paths) == 0:
        raise ValueError("texts_or_paths is empty: give at least one document")
    for item in texts_or_paths:
        if isinstance(item, os.PathLike):
            _check_text_file(item)
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"a document must be a str (its text) or a path, got {type(item).__name__}")
    chars: set = set()
    lengths = []
    for item in texts_or_paths:
        n = 0
        for chunk in _text_chunks(item):
            chars.update(chunk)
            n += len(chunk)
        if n < 2:
            name = os.fspath(item) if isinstance(item, os.PathLike) else f"text {len(lengths)}"
            raise ValueError(f"{name} has {n} character(s): a document needs 2 to give one (input, next) pair")
        lengths.append(n)
    vocab = sorted(chars)
    dtype = next(name for name, d in DTYPES.items() if len(vocab) - 1 <= np.iinfo(d).max)
    points = _code_points("".join(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tokens.bin", "wb") as f:
        for item in texts_or_paths:
            for chunk in _text_chunks(item):
                f.write(np.searchsorted(points, _code_points(chunk)).astype(DTYPES[dtype]).tobytes())
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    np.save(out / "offsets.npy", offsets, allow_pickle=False)
    meta = {"vocab": vocab, "vocab_size": len(vocab), "dtype": dtype, "tokens": int(sum(lengths)),
            "documents": len(lengths)}
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    return PreparedCorpus(out, vocab, dtype, meta["tokens"], meta["documents"])


def read_corpus(directory: PathLike) -> PreparedCorpus:
    """What a prepared corpus directory holds, from its ``vocab.json``; the files are checked to be there and to
    agree with it (the token count and the document count), so that a truncated or mixed corpus is refused.

    Args:
        directory: a directory written by :func:`prepare_corpus`.

    >>> import tempfile
    >>> read_corpus(prepare_corpus(["abba", "cab"], tempfile.mkdtemp()).directory).vocab
    ['a', 'b', 'c']
    """
    directory = Path(directory)
    for name in ("vocab.json", "tokens.bin", "offsets.npy"):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a prepared corpus: no {name} (write one with prepare_corpus)")
    try:
        with open(directory / "vocab.json", encoding="utf-8") as f:
            meta = json.load(f)
        vocab, dtype, tokens, documents = (meta[k] for k in ("vocab", "dtype", "tokens", "documents"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / 'vocab.json'} is not a corpus vocabulary: {e!r}") from None
    if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab) or len(vocab) != meta.get("vocab_size"):
        raise ValueError(f"{directory / 'vocab.json'}: 'vocab' must be a list of vocab_size characters")
    prepared = PreparedCorpus(directory, vocab, check_dtype(dtype).name, int(tokens), int(documents))
    _check_files_agree(prepared)
    return prepared


def _check_files_agree(corpus: PreparedCorpus) -> None:
    """``tokens.bin`` and ``offsets.npy`` hold what ``vocab.json`` says: a file from another corpus, or a truncated
    one, is refused before any batch is read."""
    itemsize = DTYPES[corpus.dtype].itemsize
    size = os.path.getsize(corpus.tokens_path)
    if size != corpus.tokens * itemsize:
        held = f"{size // itemsize:,} {corpus.dtype} tokens" + (f" and {size % itemsize} byte(s)" if size % itemsize else "")
        raise ValueError(
            f"{corpus.directory} is not one corpus: tokens.bin holds {held}, vocab.json says {corpus.tokens:,} "
            "(a truncated file, or files of different corpora; prepare it again)"
        )
    offsets = _load_offsets(corpus.offsets_path)
    if len(offsets) != corpus.documents:
        raise ValueError(
            f"{corpus.directory} is not one corpus: offsets.npy holds {len(offsets):,} document starts, vocab.json says "
            f"{corpus.documents:,} documents (files of different corpora; prepare it again)"
        )
    _check_offsets(offsets, corpus.tokens, os.fspath(corpus.tokens_path))
