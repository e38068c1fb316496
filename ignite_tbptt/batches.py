"""Batches and their chunks: the checks on a batch, its chunk slices, and each chunk's gates and loss weight.

Both factories, the trainer and the evaluator, read their batches through these functions, so a batch means
the same to both: ``(x, y)`` or ``(x, y, sequence_info)`` sharing a time axis ``dim``.
"""

import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ignite_tbptt.schedule import Chunk
from ignite_tbptt.sequences import Gate, SequenceInfo, chunk_gates, parse_sequence_info

__all__ = ["NothingToTrain", "batch_chunks", "batch_size_of", "checked_loss", "chunk_sequence", "split_batch"]


def batch_size_of(x: torch.Tensor, dim: int) -> int:
    """The batch size of ``x`` in Ignite's layout: axis 1 for ``dim=0``, axis 0 otherwise (1 if unbatched)."""
    return x.shape[1 if dim == 0 else 0] if x.dim() > 1 else 1


def split_batch(batch: Any, dim: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[SequenceInfo], int]:
    """Check a batch ``(x, y)`` or ``(x, y, sequence_info)`` sharing a time axis ``dim``; return it and ``T``.

    ``sequence_info`` is a dict with ``"lengths"``, ``"mask"`` and/or ``"resets"`` (see
    :mod:`ignite_tbptt.sequences`). Raises ``TypeError`` or ``ValueError`` naming the problem, before anything
    runs.

    >>> split_batch((torch.zeros(5, 2), torch.zeros(4, 2)), dim=0)
    Traceback (most recent call last):
    ...
    ValueError: x and y must have the same length along the time axis dim=0, got 5 and 4
    """
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) not in (2, 3):
        kind = f"a sequence of length {len(batch)}" if isinstance(batch, Sequence) else type(batch).__name__
        raise TypeError(f"a batch must be an (x, y) pair or an (x, y, sequence_info) triple, got {kind}")
    x, y = batch[0], batch[1]
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor with a time axis, got {type(t).__name__}")
        if not -t.dim() <= dim < t.dim():
            raise ValueError(f"time axis dim={dim} is out of range for {name} with shape {tuple(t.shape)}")
    if x.shape[dim] != y.shape[dim]:
        raise ValueError(
            f"x and y must have the same length along the time axis dim={dim}, got {x.shape[dim]} and {y.shape[dim]}"
        )
    if x.shape[dim] == 0:
        raise ValueError(f"x and y have no time steps along dim={dim}")
    if x.dim() > 1 and y.dim() > 1 and batch_size_of(x, dim) != batch_size_of(y, dim):
        raise ValueError(
            f"x and y must have the same batch size, got {batch_size_of(x, dim)} and {batch_size_of(y, dim)} (shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}, time along dim={dim}): a loss would broadcast y across the samples"
        )
    info = parse_sequence_info(batch[2], x, dim) if len(batch) == 3 else None
    return x, y, info, x.shape[dim]


def batch_chunks(
    chunks: List[Chunk], later_of: Callable[[Chunk], List[int]], x: torch.Tensor, y: torch.Tensor, offset: int,
    dim: int,
) -> Iterator[Tuple[Chunk, List[int], slice, torch.Tensor, torch.Tensor]]:
    """Each chunk of a batch (:func:`~ignite_tbptt.schedule.batch_plan`) with its later window starts, its rows in
    the batch and its slices of ``x``, ``y``.

    The slices are made one chunk at a time (not by one ``split``): ``T / k1`` views made up front take memory
    that grows with ``T``, about 1 KiB each.
    """
    for chunk in chunks:
        rows = slice(chunk.start - offset, chunk.stop - offset)
        yield chunk, later_of(chunk), rows, x.narrow(dim, rows.start, chunk.length), y.narrow(dim, rows.start, chunk.length)


def chunk_sequence(
    info: Optional[SequenceInfo], rows: slice, chunk: Chunk, x: torch.Tensor, dim: int
) -> Tuple[List[Gate], Optional[torch.Tensor], int]:
    """A chunk's gates, the mask of its scored pairs in the layout of ``x`` (``None``: all of them) and its loss weight.

    A pair is scored where it is valid and past the burn-in. The weight is the number of (step, sample) pairs
    the chunk's loss averages over.
    """
    gated = info is not None and info.gated
    gates = chunk_gates(info, rows, chunk.start, x.device) if gated else [Gate(chunk.start, None, None)]
    scored = None if info is None else info.scored
    if scored is None:
        return gates, None, chunk.length * batch_size_of(x, dim)
    scored = scored[rows]
    weight = int(scored.sum())  # a host tensor: no device sync
    if weight == scored.numel():  # nothing masked: the chunk is passed as it is
        return gates, None, weight
    return gates, (scored if dim == 0 else scored.t()).to(x.device), weight


def checked_loss(loss: Any) -> torch.Tensor:
    """``loss_fn``'s value, if it is a one-element tensor; else a ``TypeError`` that names ``loss_fn``.

    A float, a tuple or a vector would fail later inside the backward pass or the weighting with an error that
    does not say where it came from.

    >>> checked_loss((torch.tensor(1.0), 2))
    Traceback (most recent call last):
    ...
    TypeError: loss_fn(y_pred, y) must return a scalar tensor, got tuple
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn(y_pred, y) must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise TypeError(f"loss_fn(y_pred, y) must return a scalar tensor, got shape {tuple(loss.shape)} (reduce it)")
    return loss


class NothingToTrain:
    """Says once per trainer that a batch had no valid (step, sample) pair, instead of a silent ``nan``.

    Such a batch (every step padding, or an empty batch axis) makes no update and its output is ``nan``. Burn-in
    is not reported here: a batch of warm-up steps only builds the state, as it should (the trainer says it
    when a whole epoch scored nothing).
    """

    def __init__(self) -> None:
        self.warned = False

    def check(self, x: torch.Tensor, info: Optional[SequenceInfo], dim: int, iteration: int) -> None:
        """Warn at the first batch ``x`` (with sequence information ``info``) that has no valid pair."""
        if self.warned:
            return
        empty = batch_size_of(x, dim) == 0 or (info is not None and info.valid is not None and not bool(info.valid.any()))
        if not empty:
            return
        self.warned = True
        warnings.warn(
            f"batch {iteration} (x of shape {tuple(x.shape)}, time along dim={dim}) has no valid (step, sample) "
            "pair: every step is padding or masked, or the batch axis is empty. No update was made and its "
            "output is nan. Later such batches are not reported",
            stacklevel=3,
        )
