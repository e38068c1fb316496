"""Stream batching: documents laid end to end in aligned rows, so that carried state meets the data it expects.

Training with ``carry_state=True`` is right only when row ``i`` of batch ``n + 1`` continues row ``i`` of batch
``n``. :class:`StreamBatches` builds that layout (the one of PyTorch's word-language-model example and of
fastai's ``LMDataLoader``), reshuffles whole documents between epochs, shards the rows across processes, and
marks every batch with its stream position, so that a trainer carrying state can tell when a batch does not
continue its stream.

This module knows nothing of the trainer: it yields ``(x, y, sequence_info)`` batches in the format that
:mod:`ignite_tbptt.sequences` describes.
"""

from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import ignite.distributed as idist
import torch

from ignite_tbptt.schedule import check_positive_int

__all__ = ["StreamBatches"]

Data = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Tuple[torch.Tensor, torch.Tensor]]]


Marks = Dict[int, List[Tuple[int, int]]]  # per batch index: the (step in batch, row) of each mark


class _Layout(NamedTuple):
    """One epoch's rows for this process: inputs and targets in batch layout, and each batch's resets and masked
    pairs (:meth:`StreamBatches._boundaries`), worked out once per layout."""

    epoch: int
    x: torch.Tensor
    y: torch.Tensor
    resets: Marks
    masks: Marks


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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 2654435761 + epoch) % (2**63)  # distinct for every (seed, epoch) with epoch < 2654435761


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
    is a view of it.

    Args:
        data: a tensor, a list of tensors, or a list of ``(x, y)`` pairs; time on axis 0.
        batch_size: the number of rows (streams) over all processes.
        seq_len: time steps per batch.
        batch_first: batches ``(rows, seq_len, ...)`` for a trainer with ``dim=1``; else ``(seq_len, rows, ...)``.
        shuffle: reorder the documents every epoch.
        seed: the seed of the document order.
        rank, world_size: this process and the number of processes; ``None`` takes ``idist``'s.

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
        self.inputs, self.targets = _documents(data)
        self.next_step = self.targets is None
        shortest = min(len(d) for d in self.inputs)
        if self.next_step and shortest < 2:
            index = [len(d) for d in self.inputs].index(shortest)
            raise ValueError(f"document {index} has {shortest} step(s): it needs 2 to give one (input, next step) pair")
        if shortest < 1:
            raise ValueError(f"document {[len(d) for d in self.inputs].index(0)} is empty")
        total = sum(len(d) for d in self.inputs)
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
        self._layout: Optional[_Layout] = None

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
        if not self.shuffle:
            return list(range(len(self.inputs)))
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.inputs), generator=generator).tolist()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]]:
        layout = self._layout_of(self.epoch)
        time_axis = 1 if self.batch_first else 0
        for index, start in enumerate(range(0, self.steps, self.seq_len)):
            length = min(self.seq_len, self.steps - start)
            info: Dict[str, Any] = {"position": start, "dim": time_axis}
            for key, marks in (("resets", layout.resets), ("mask", layout.masks)):
                if index in marks:
                    info[key] = self._marks(marks[index], length, flag=key == "resets")
            yield layout.x.narrow(time_axis, start, length), layout.y.narrow(time_axis, start, length), info

    def _layout_of(self, epoch: int) -> _Layout:
        """This process' rows for ``epoch``, built at most once per epoch (once in all without ``shuffle``)."""
        if self._layout is not None and (self._layout.epoch == epoch or not self.shuffle):
            return self._layout
        self._layout = None  # free the previous epoch's copy before building the next
        order = self.order(epoch)
        lengths = [len(self.inputs[i]) for i in order]
        doc_starts = torch.tensor([0] + lengths).cumsum(0).tolist()
        span = self.rank * self.batch_size * self.row_length  # this process' first step in the epoch's stream
        x = self._fill(self.inputs, order, doc_starts, span)
        y = x if self.next_step else self._fill(self.targets, order, doc_starts, span)
        starts: List[List[int]] = [[] for _ in range(self.batch_size)]
        for s in doc_starts[:-1]:
            if span <= s < span + self.batch_size * self.row_length:
                row, step = divmod(s - span, self.row_length)
                starts[row].append(step)
        axis = 1 if self.batch_first else 0
        if self.next_step:  # inputs are steps 0 .. n - 2 of a row, targets steps 1 .. n - 1
            x, y = x.narrow(axis, 0, self.steps), y.narrow(axis, 1, self.steps)
        self._layout = _Layout(epoch, x, y, *self._boundaries(starts))
        return self._layout

    def _fill(self, docs: List[torch.Tensor], order: List[int], doc_starts: List[int], span: int) -> torch.Tensor:
        """Copy this process' rows, the stream steps from ``span`` on, into one tensor in batch layout.

        One pass over the documents, copying each piece of a document that falls into one row.
        """
        n, first = self.row_length, docs[0]
        shape = (self.batch_size, n) if self.batch_first else (n, self.batch_size)
        out = first.new_empty(shape + tuple(first.shape[1:]))
        stop = span + self.batch_size * n
        for k, doc_index in enumerate(order):
            lo, hi = max(doc_starts[k], span), min(doc_starts[k + 1], stop)
            while lo < hi:
                row, step = divmod(lo - span, n)
                cut = min(hi, lo - step + n)  # the end of the document or of the row
                target = out[row] if self.batch_first else out[:, row]
                target[step : step + cut - lo].copy_(docs[doc_index][lo - doc_starts[k] : cut - doc_starts[k]])
                lo = cut
        return out

    def _boundaries(self, starts: List[List[int]]) -> Tuple[Marks, Marks]:
        """Per batch index, the (step in batch, row) of its resets, and of its masked pairs (next-step targets).

        A document starting at step ``t`` of a row resets that row before input step ``t``; with next-step
        targets, the pair at ``t - 1`` (the previous document's last step predicting this one's first) is masked.
        """
        resets: Marks = {}
        masks: Marks = {}
        for j, row_starts in enumerate(starts):
            for t in row_starts:
                if t < self.steps:
                    resets.setdefault(t // self.seq_len, []).append((t % self.seq_len, j))
                if self.next_step and t >= 1:
                    masks.setdefault((t - 1) // self.seq_len, []).append(((t - 1) % self.seq_len, j))
        return resets, masks

    def _marks(self, marks: List[Tuple[int, int]], length: int, flag: bool) -> torch.Tensor:
        """A ``(length, rows)`` bool tensor (transposed for ``batch_first``): ``flag`` at ``marks``, else not."""
        out = torch.full((length, self.batch_size), not flag, dtype=torch.bool)
        steps, rows = zip(*marks)
        out[list(steps), list(rows)] = flag
        return out.t() if self.batch_first else out

    def __repr__(self) -> str:
        return (
            f"StreamBatches({len(self.inputs)} document(s), {self.batch_size} of {self.global_batch_size} rows "
            f"(rank {self.rank} of {self.world_size}) x {self.steps} steps, seq_len={self.seq_len}, "
            f"{len(self)} batches, shuffle={self.shuffle})"
        )
