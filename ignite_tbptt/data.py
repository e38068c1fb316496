"""Stream batching: documents laid end to end in aligned rows, so that carried state meets the data it expects.

Training with ``carry_state=True`` is right only when row ``i`` of batch ``n + 1`` continues row ``i`` of batch
``n``. :class:`StreamBatches` builds that layout (the one of PyTorch's word-language-model example and of
fastai's ``LMDataLoader``), reshuffles whole documents between epochs, shards the rows across processes, and
marks every batch with its stream position, so that a trainer carrying state can tell when a batch does not
continue its stream.

This module knows nothing of the trainer: it yields ``(x, y, sequence_info)`` batches in the format that
:mod:`ignite_tbptt.sequences` describes. Where every step goes is :mod:`ignite_tbptt.layout`'s work, from the
documents' lengths alone; this module fills the batches, from tensors in memory or, through
:meth:`StreamBatches.from_file`, from a token file (:mod:`ignite_tbptt.corpus`).
"""

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import ignite.distributed as idist
import numpy as np
import torch

from ignite_tbptt.corpus import Offsets, PathLike, TokenFile
from ignite_tbptt.layout import EpochLayout, epoch_order
from ignite_tbptt.schedule import check_positive_int

__all__ = ["StreamBatches"]

Data = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Tuple[torch.Tensor, torch.Tensor]]]


Cut = Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]]  # (first step, steps) -> a batch's (x, y)


class _Epoch(NamedTuple):
    """One epoch of this process: its layout, and the batches' inputs and targets by first step and length."""

    epoch: int
    layout: EpochLayout
    cut: Cut


def _check_tensor(item: Any, what: str) -> torch.Tensor:
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{what} must be a tensor with time on axis 0, got {type(item).__name__}")
    if item.dim() == 0:
        raise ValueError(f"{what} must have a time axis (axis 0), got a 0-d tensor")
    return item


def _documents(data: Data) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
    """The documents' inputs and, for ``(x, y)`` pairs, their targets (``None``: the next step is the target)."""
    if isinstance(data, torch.Tensor):
        return [_check_tensor(data, "data")], None
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"data must be a tensor, a list of tensors or a list of (x, y) pairs, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: give at least one document")
    paired = not isinstance(data[0], torch.Tensor)
    xs, ys = [], []
    for i, item in enumerate(data):
        if not paired:
            xs.append(_check_tensor(item, f"document {i}"))
            continue
        if isinstance(item, torch.Tensor) or not (isinstance(item, Sequence) and len(item) == 2):
            raise TypeError(f"document {i} must be an (x, y) pair like document 0, got {type(item).__name__}")
        x, y = (_check_tensor(t, f"{name} of document {i}") for t, name in zip(item, ("x", "y")))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y of document {i} must have the same length, got {x.shape[0]} and {y.shape[0]}")
        xs.append(x)
        ys.append(y)
    for name, docs in (("x", xs), ("y", ys)):
        for i, doc in enumerate(docs):
            if doc.shape[1:] != docs[0].shape[1:] or doc.dtype != docs[0].dtype or doc.device != docs[0].device:
                raise ValueError(
                    f"{name} of document {i} has shape {tuple(doc.shape[1:])}, {doc.dtype} on {doc.device} after its "
                    f"time axis; document 0 has {tuple(docs[0].shape[1:])}, {docs[0].dtype} on {docs[0].device}"
                )
    return xs, (ys if paired else None)


def _check_vocabulary(docs: List[torch.Tensor], vocab_size: Any) -> None:
    """Every id of the token documents ``docs`` in ``[0, vocab_size)``, or an error naming the first one that is not.

    Checked when the batches are made, as :class:`~ignite_tbptt.corpus.TokenFile` checks a token file: an id out of
    range would otherwise fail inside the model's embedding, many updates into the run.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    for i, doc in enumerate(docs):
        if doc.is_floating_point() or doc.is_complex() or doc.dtype == torch.bool:
            raise TypeError(f"vocab_size checks token ids, but document {i} holds {doc.dtype}")
        bad = (doc < 0) | (doc >= vocab_size)
        if bool(bad.any()):
            step = int(bad.flatten().nonzero()[0])
            raise ValueError(
                f"document {i} holds token id {int(doc.flatten()[step])} (element {step}), outside the vocabulary "
                f"[0, {vocab_size})"
            )


Read = Callable[[int, int, int], Any]  # (document, a, b) -> the document's steps [a, b)


def _fill(out: Any, layout: EpochLayout, lo: int, hi: int, read: Read, batch_first: bool) -> Any:
    """Copy steps ``[lo, hi)`` of every row into ``out`` (a tensor or an array in batch layout, its time axis
    starting at ``lo``), one document piece at a time."""
    for row in range(layout.rows):
        for doc, offset, step, length in layout.pieces(row, lo, hi):
            steps = slice(step, step + length)
            out[(row, steps) if batch_first else (steps, row)] = read(doc, offset, offset + length)
    return out


class _InMemory:
    """Documents as tensors: an epoch copies this process' rows once, and every batch is a view of the copy."""

    def __init__(self, data: Data) -> None:
        self.inputs, self.targets = _documents(data)
        self.next_step = self.targets is None
        self.lengths = [len(d) for d in self.inputs]

    def epoch(self, layout: EpochLayout, batch_first: bool) -> Cut:
        def copy(docs: List[torch.Tensor]) -> torch.Tensor:
            first, n = docs[0], layout.row_length
            out = first.new_empty(((layout.rows, n) if batch_first else (n, layout.rows)) + tuple(first.shape[1:]))
            return _fill(out, layout, 0, n, lambda d, a, b: docs[d][a:b], batch_first)

        x = copy(self.inputs)
        y = x if self.next_step else copy(self.targets)
        axis, shift = (1 if batch_first else 0), int(self.next_step)  # next step: inputs 0 .. n - 2, targets 1 .. n - 1
        return lambda start, length: (x.narrow(axis, start, length), y.narrow(axis, start + shift, length))


class _FromFile:
    """Token documents in a file: every batch reads its own steps (``+ 1`` for the targets), then checks that the
    file did not change."""

    next_step = True

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens
        self.lengths = tokens.lengths

    def epoch(self, layout: EpochLayout, batch_first: bool) -> Cut:
        axis = 1 if batch_first else 0

        def cut(start: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
            shape = (layout.rows, length + 1) if batch_first else (length + 1, layout.rows)
            out = np.empty(shape, dtype=np.int64)
            steps = torch.from_numpy(_fill(out, layout, start, start + length + 1, self.tokens.read, batch_first))
            self.tokens.check()  # the batch was read from the file that was indexed
            return steps.narrow(axis, 0, length), steps.narrow(axis, 1, length)

        return cut


class StreamBatches:
    """Batches of aligned streams for TBPTT with carried state: rows continue from one batch to the next.

    The documents, in the epoch's order, are laid end to end and cut into ``batch_size`` rows of equal length
    (at most ``batch_size - 1`` trailing steps are dropped). Every batch holds the next ``seq_len`` steps of
    every row, so row ``i`` of one batch continues row ``i`` of the batch before it: train with
    ``carry_state=True``. Where a document starts inside a row, the batch carries a per-sample reset there
    (sequence info ``"resets"``); for next-step targets, the one pair that would predict a document's first
    step from the previous document's last is masked (``"mask"``), not scored.

    Each batch is ``(x, y, info)``: ``x`` and ``y`` are ``(seq_len, rows, ...)`` (``(rows, seq_len, ...)``
    with ``batch_first=True``; the last batch may be shorter), and ``info`` holds ``"position"``, the batch's
    first step in its rows, and ``"dim"``, its time axis (the trainer and the evaluator refuse a batch laid out
    along another axis than their ``dim``), with ``"resets"`` and ``"mask"`` where the batch needs them. A trainer or
    evaluator with ``carry_state=True`` checks the position and raises an error for a batch that does not
    continue its stream: a skipped, repeated or reordered batch.

    ``data`` is one tensor with time on axis 0 (one stream: tokens, or a multivariate series), a list of such
    tensors (documents), whose targets are the next step, or a list of ``(x, y)`` pairs of equal length
    (sequences with aligned targets). For a single stream the batches equal the word-language-model
    example's ``batchify`` and ``get_batch``.

    ``shuffle=True`` reorders whole documents, never the steps inside one; the order depends only on
    ``(seed, epoch)``. Call :meth:`set_epoch` at every epoch start, as for a ``DistributedSampler``::

        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: batches.set_epoch(engine.state.epoch - 1))

    Under ``ignite.distributed``, ``batch_size`` is the global batch, as in ``idist.auto_dataloader``: each of
    the ``world_size`` processes gets ``batch_size // world_size`` disjoint rows (rank ``r`` the ``r``-th
    block), the processes together cover exactly the rows of one process, and every process yields the same
    number of batches.

    The documents are kept as given; an epoch builds one reordered copy of this process' rows, and every batch
    is a view of it. For corpora larger than memory, :meth:`from_file` reads each batch from a token file.

    Args:
        data: a tensor, a list of tensors, or a list of ``(x, y)`` pairs; time on axis 0 (or a
            :class:`~ignite_tbptt.corpus.TokenFile`, as :meth:`from_file` gives it).
        batch_size: the number of rows (streams) over all processes.
        seq_len: time steps per batch.
        batch_first: batches ``(rows, seq_len, ...)`` for a trainer with ``dim=1``; else ``(seq_len, rows, ...)``.
        shuffle: reorder the documents every epoch.
        seed: the seed of the document order.
        rank, world_size: this process and the number of processes; ``None`` takes ``idist``'s.
        vocab_size: token data only: check that every id of the documents' inputs is in ``[0, vocab_size)``
            (a ``ValueError`` naming the document and the id), as :meth:`from_file` checks a file.

    Example:
        >>> import torch
        >>> tokens = torch.arange(26)
        >>> batches = StreamBatches(tokens, batch_size=2, seq_len=4)
        >>> len(batches)  # 13 tokens per row: 12 (input, next) pairs in batches of 4
        3
        >>> x, y, info = next(iter(batches))
        >>> x.t().tolist(), y.t().tolist()
        ([[0, 1, 2, 3], [13, 14, 15, 16]], [[1, 2, 3, 4], [14, 15, 16, 17]])
        >>> docs = [torch.arange(5), torch.arange(100, 103)]
        >>> x, y, info = next(iter(StreamBatches(docs, batch_size=1, seq_len=7)))
        >>> x.flatten().tolist(), info["resets"].flatten().nonzero().flatten().tolist()
        ([0, 1, 2, 3, 4, 100, 101], [0, 5])
        >>> info["mask"].flatten().tolist()  # 4 -> 100 crosses two documents
        [True, True, True, True, False, True, True]
    """

    def __init__(
        self,
        data: Data,
        batch_size: int,
        seq_len: int,
        *,
        batch_first: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ) -> None:
        self.global_batch_size = check_positive_int("batch_size", batch_size)
        self.seq_len = check_positive_int("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.world_size = check_positive_int("world_size", idist.get_world_size() if world_size is None else world_size)
        self.rank = idist.get_rank() if rank is None else rank
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {self.rank!r}")
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size ({batch_size}) is the global batch and must be divisible by the world size "
                f"({self.world_size}), so that every process gets the same number of rows"
            )
        self._source: Union[_InMemory, _FromFile] = _FromFile(data) if isinstance(data, TokenFile) else _InMemory(data)
        if vocab_size is not None and isinstance(self._source, _InMemory):  # a TokenFile checks its own
            _check_vocabulary(self._source.inputs, vocab_size)
        self.next_step = self._source.next_step
        lengths = np.asarray(self._source.lengths, dtype=np.int64)
        shortest = int(lengths.min())
        if self.next_step and shortest < 2:
            raise ValueError(
                f"document {int(np.argmin(lengths))} has {shortest} step(s): it needs 2 to give one (input, next step) pair"
            )
        if shortest < 1:
            raise ValueError(f"document {int(np.argmin(lengths))} is empty")
        total = int(lengths.sum())
        self.row_length = total // batch_size
        if self.row_length < 1 + self.next_step:
            raise ValueError(
                f"{total} steps cannot fill {batch_size} rows of at least {1 + self.next_step} steps: "
                "give more data or a smaller batch_size"
            )
        self.dropped = total - self.row_length * batch_size
        self.steps = self.row_length - self.next_step  # time steps of (input, target) pairs per row
        self.batch_size = batch_size // self.world_size  # this process' rows
        self.batch_first, self.shuffle, self.seed = bool(batch_first), bool(shuffle), seed
        self.epoch = 0
        self._epoch: Optional[_Epoch] = None

    @classmethod
    def from_file(
        cls,
        path: PathLike,
        batch_size: int,
        seq_len: int,
        *,
        dtype: str,
        offsets: Optional[Offsets] = None,
        separator: Optional[int] = None,
        vocab_size: Optional[int] = None,
        start: int = 0,
        stop: Optional[int] = None,
        batch_first: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> "StreamBatches":
        """Batches of token documents in a flat binary file, read batch by batch: for corpora larger than memory.

        The file holds token ids of ``dtype`` (``"uint8"``, ``"uint16"`` or ``"int32"``) end to end, read
        with ``os.pread``, batch by batch. The documents are given by ``offsets``, the first token of each
        (the first 0: a list, an array, a tensor, or a ``.npy`` file's path), or by a ``separator`` token id,
        which is dropped (the documents are the runs between separators), or the file is one document. With
        ``vocab_size`` every token id is checked to be in ``[0, vocab_size)``, reading the file in chunks;
        ``start`` and ``stop`` use only that range of the file's tokens (a held-out part stays out). See
        :class:`~ignite_tbptt.corpus.TokenFile`, which checks the file, the offsets and the ids.

        The batches equal those of ``StreamBatches(documents, ...)`` built in memory from the same documents
        as ``int64`` tensors, element for element and with the same sequence information; everything else
        (shuffling, sharding, ``set_epoch``, ``len()``) is as there. An epoch is laid out from the documents'
        lengths alone, without reading a token, and each batch reads only its own ``rows x (seq_len + 1)``
        tokens: memory holds the document index (O(documents)) and the batches alive, never the corpus.

        Example:
            >>> import tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "tokens.bin")
            >>> np.arange(26, dtype=np.uint8).tofile(path)
            >>> x, y, info = next(iter(StreamBatches.from_file(path, 2, 4, dtype="uint8", offsets=[0, 13])))
            >>> x.t().tolist(), y.t().tolist(), x.dtype
            ([[0, 1, 2, 3], [13, 14, 15, 16]], [[1, 2, 3, 4], [14, 15, 16, 17]], torch.int64)
        """
        tokens = TokenFile(path, dtype, offsets=offsets, separator=separator, vocab_size=vocab_size, start=start,
                           stop=stop)
        return cls(tokens, batch_size, seq_len, batch_first=batch_first, shuffle=shuffle, seed=seed, rank=rank,
                   world_size=world_size)

    def __len__(self) -> int:
        """The number of batches per epoch, the same in every epoch and on every process."""
        return -(-self.steps // self.seq_len)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the next iteration lays out (the document order of ``(seed, epoch)``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def order(self, epoch: int) -> List[int]:
        """The documents' order in ``epoch``: a permutation of ``(seed, epoch)`` with ``shuffle``, else as given."""
        return epoch_order(len(self._source.lengths), self.shuffle, self.seed, epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]]:
        epoch = self._epoch_of(self.epoch)
        time_axis = 1 if self.batch_first else 0
        for index, start in enumerate(range(0, self.steps, self.seq_len)):
            length = min(self.seq_len, self.steps - start)
            info: Dict[str, Any] = {"position": start, "dim": time_axis}
            for key in ("resets", "mask"):
                marks = epoch.layout.marks(key, index)
                if marks is not None:
                    info[key] = self._marks(marks, length, flag=key == "resets")
            yield (*epoch.cut(start, length), info)

    def _epoch_of(self, epoch: int) -> _Epoch:
        """This process' layout for ``epoch``, built at most once per epoch (once in all without ``shuffle``)."""
        if self._epoch is not None and (self._epoch.epoch == epoch or not self.shuffle):
            return self._epoch
        self._epoch = None  # free the previous epoch's copy before building the next
        layout = EpochLayout(self._source.lengths, self.order(epoch), self.batch_size, self.row_length,
                             self.rank * self.batch_size, self.seq_len, self.next_step)
        self._epoch = _Epoch(epoch, layout, self._source.epoch(layout, self.batch_first))
        return self._epoch

    def _marks(self, marks: Tuple[List[int], List[int]], length: int, flag: bool) -> torch.Tensor:
        """A ``(length, rows)`` bool tensor (transposed for ``batch_first``): ``flag`` at ``marks``, else not."""
        out = torch.full((length, self.batch_size), not flag, dtype=torch.bool)
        out[marks] = flag
        return out.t() if self.batch_first else out

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_epoch": None}  # a copy lays out its epoch anew

    def __repr__(self) -> str:
        return (
            f"StreamBatches({len(self._source.lengths)} document(s), {self.batch_size} of {self.global_batch_size} "
            f"rows (rank {self.rank} of {self.world_size}) x {self.steps} steps, seq_len={self.seq_len}, "
            f"{len(self)} batches, shuffle={self.shuffle})"
        )
