"""Where every step of an epoch goes: the document order, each row's span of the stream, resets and masks.

An epoch lays the documents, in its order, end to end and cuts the stream into rows of equal length
(:class:`~ignite_tbptt.StreamBatches` describes the layout). This module works that out from the documents'
lengths alone, never their data, in O(number of documents): the in-memory and the file-backed batches both
place their tokens by it, so that they agree step for step.
"""

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["EpochLayout", "Piece", "epoch_order"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 2654435761 + epoch) % (2**63)  # distinct for every (seed, epoch) with epoch < 2654435761


def epoch_order(n_documents: int, shuffle: bool, seed: int, epoch: int) -> List[int]:
    """The documents' order in ``epoch``: a permutation of ``(seed, epoch)`` with ``shuffle``, else as given.

    >>> epoch_order(4, shuffle=False, seed=0, epoch=3)
    [0, 1, 2, 3]
    >>> sorted(epoch_order(4, shuffle=True, seed=0, epoch=3))
    [0, 1, 2, 3]
    """
    if not shuffle:
        return list(range(n_documents))
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n_documents, generator=generator).tolist()


class Piece(NamedTuple):
    """A run of steps of one document that falls into one row: ``length`` steps from ``offset`` in the
    document (its index as given), placed from ``step`` on, counted from the start of the requested range."""

    document: int
    offset: int
    step: int
    length: int


Marks = Tuple[np.ndarray, np.ndarray, np.ndarray]  # batch index (sorted), step in the batch, row


class EpochLayout:
    """One epoch's layout for one process: ``rows`` rows of ``row_length`` steps, starting at global row
    ``first_row`` of the epoch's stream, cut into batches of ``seq_len`` steps.

    ``next_step``: targets are the next step, so a row's ``row_length`` steps give ``row_length - 1`` pairs.

    Example:
        >>> layout = EpochLayout(lengths=[5, 3], order=[1, 0], rows=2, row_length=4, first_row=0, seq_len=3,
        ...                      next_step=True)
        >>> list(layout.pieces(0, 0, 4))  # row 0: all of document 1, then the first step of document 0
        [Piece(document=1, offset=0, step=0, length=3), Piece(document=0, offset=0, step=3, length=1)]
        >>> list(layout.pieces(1, 0, 4))
        [Piece(document=0, offset=1, step=0, length=4)]
        >>> layout.marks("resets", 0), layout.marks("mask", 0)  # (steps, rows) in batch 0
        (([0], [0]), ([2], [0]))
    """

    def __init__(
        self,
        lengths: Sequence[int],
        order: Sequence[int],
        rows: int,
        row_length: int,
        first_row: int,
        seq_len: int,
        next_step: bool,
    ) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.rows, self.row_length, self.seq_len = rows, row_length, seq_len
        self.starts = np.zeros(len(self.order) + 1, dtype=np.int64)  # each document's first stream step, in order
        np.cumsum(np.asarray(lengths, dtype=np.int64)[self.order], out=self.starts[1:])
        self.span = first_row * row_length  # this process' first step in the epoch's stream
        steps = row_length - int(next_step)
        end = self.span + rows * row_length
        inside = self.starts[np.searchsorted(self.starts[:-1], self.span) : np.searchsorted(self.starts[:-1], end)]
        row, step = np.divmod(inside - self.span, row_length)
        # A document starting at step t of a row resets the row before input step t; with next-step targets,
        # the pair at t - 1 (the previous document's last step predicting this one's first) is masked.
        at = step < steps
        self._marks: Dict[str, Marks] = {"resets": self._by_batch(step[at], row[at])}
        if next_step:
            at = step >= 1
            self._marks["mask"] = self._by_batch(step[at] - 1, row[at])

    def _by_batch(self, step: np.ndarray, row: np.ndarray) -> Marks:
        batch, within = np.divmod(step, self.seq_len)
        by = np.argsort(batch, kind="stable")
        return batch[by], within[by], row[by]

    def marks(self, kind: str, batch: int) -> Optional[Tuple[List[int], List[int]]]:
        """The ``(steps, rows)`` of batch ``batch``'s ``"resets"`` or ``"mask"`` marks; ``None`` if it has none."""
        if kind not in self._marks:
            return None
        batches, steps, rows = self._marks[kind]
        lo, hi = np.searchsorted(batches, batch), np.searchsorted(batches, batch, side="right")
        return (steps[lo:hi].tolist(), rows[lo:hi].tolist()) if hi > lo else None

    def pieces(self, row: int, lo: int, hi: int) -> Iterator[Piece]:
        """The document pieces of steps ``[lo, hi)`` of row ``row``, in order; ``step`` counts from ``lo``."""
        base = self.span + row * self.row_length
        position, stop = base + lo, base + hi
        k = int(np.searchsorted(self.starts, position, side="right")) - 1
        while position < stop:
            start, end = int(self.starts[k]), min(int(self.starts[k + 1]), stop)
            yield Piece(int(self.order[k]), position - start, position - base - lo, end - position)
            position, k = end, k + 1
