"""Pure scheduling for TBPTT(k1, k2): chunks, backprop windows and segment cuts as plain integers.

Nothing here knows about torch. Positions are time steps in *stream* coordinates: a chunk or a segment
``(start, stop]`` covers the steps ``start + 1 .. stop``, so its length is ``stop - start``. See
``SPEC.md`` for the definitions this module implements:

- chunk ``c`` is ``(s_c, t_c]``, with ``t_c = s_c + k1`` and a shorter last chunk;
- its update differentiates the window ``(w_c, t_c]``, ``w_c = max(0, s_c - (k2 - k1))``; position 0 is
  where the stream (and its hidden state) started afresh.

Example:
    >>> [tuple(c) for c in plan_chunks(length=10, k1=3, k2=5)]
    [(0, 0, 3, 0), (1, 3, 6, 1), (2, 6, 9, 4), (3, 9, 10, 7)]
"""

from typing import Iterable, List, NamedTuple, Tuple

__all__ = ["Chunk", "check_steps", "checkpoint_cuts", "plan_chunks", "later_window_starts", "segment_spans"]


class Chunk(NamedTuple):
    """One update of TBPTT: its chunk ``(start, stop]`` and the start of its backprop window.

    ``index`` counts the chunks of one batch from 0. Positions are in stream coordinates.
    """

    index: int
    start: int
    stop: int
    window_start: int

    @property
    def length(self) -> int:
        """Number of time steps in the chunk (the weight of its loss in the batch mean)."""
        return self.stop - self.start


def check_steps(k1: int, k2: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``1 <= k1 <= k2`` are integers.

    >>> check_steps(3, 2)
    Traceback (most recent call last):
    ...
    ValueError: k2 (2) must be >= tbtt_step (3): each update backpropagates at least through its own chunk
    """
    for name, value in (("tbtt_step", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if k1 < 1:
        raise ValueError(f"tbtt_step must be >= 1, got {k1}")
    if k2 < k1:
        raise ValueError(
            f"k2 ({k2}) must be >= tbtt_step ({k1}): each update backpropagates at least through its own chunk"
        )


def plan_chunks(length: int, k1: int, k2: int, offset: int = 0) -> List[Chunk]:
    """Split ``length`` steps that start at stream position ``offset`` into the updates of TBPTT(k1, k2).

    Chunks are ``k1`` long except a shorter last one. A window never reaches before position 0.

    >>> plan_chunks(length=4, k1=2, k2=3, offset=6)
    [Chunk(index=0, start=6, stop=8, window_start=5), Chunk(index=1, start=8, stop=10, window_start=7)]
    """
    check_steps(k1, k2)
    if length < 1:
        raise ValueError(f"a batch needs at least one time step, got {length}")
    overlap = k2 - k1
    stop = offset + length
    starts = range(offset, stop, k1)
    return [Chunk(i, s, min(s + k1, stop), max(0, s - overlap)) for i, s in enumerate(starts)]


def later_window_starts(chunk: Chunk, batch_stop: int, k1: int, k2: int, stream: bool) -> List[int]:
    """Window starts of the updates after ``chunk`` that fall before ``chunk.stop``, in increasing order.

    These are the positions where the forward pass of ``chunk``'s update must keep a state (``recompute``)
    or start a new retained segment (``retain``). The later chunks of the batch start every ``k1`` steps
    up to ``batch_stop``. With ``stream=True`` the next batch continues the stream from ``batch_stop`` on
    the same grid, so its windows may reach back into this batch.

    >>> later_window_starts(Chunk(0, 0, 3, 0), batch_stop=10, k1=3, k2=5, stream=False)
    [1]
    >>> later_window_starts(Chunk(3, 9, 10, 7), batch_stop=10, k1=3, k2=5, stream=True)
    [8]
    """
    overlap = k2 - k1
    if not overlap:
        return []  # every window is its own chunk: none reaches back
    limit = chunk.stop + overlap  # a chunk starting here or later has its window start at or past chunk.stop
    starts: Iterable[int] = range(chunk.start + k1, min(batch_stop, limit), k1)
    if stream:
        starts = list(starts) + list(range(batch_stop, limit, k1))
    return sorted({max(0, s - overlap) for s in starts})


def segment_spans(start: int, stop: int, cuts: Iterable[int]) -> List[Tuple[int, int]]:
    """Split ``(start, stop]`` at every cut strictly inside it.

    >>> segment_spans(4, 9, cuts=[6, 2, 9, 6])
    [(4, 6), (6, 9)]
    """
    inner = sorted({c for c in cuts if start < c < stop})
    bounds = [start, *inner, stop]
    return list(zip(bounds[:-1], bounds[1:]))


def checkpoint_cuts(start: int, stop: int, every: int) -> List[int]:
    """Stream positions strictly inside ``(start, stop)`` that are multiples of ``every`` (``0``: none).

    Cutting a window there gives activation-checkpointed segments of at most ``every`` steps on a fixed grid,
    so a re-run of the same steps cuts them the same way.

    >>> checkpoint_cuts(3, 14, every=4)
    [4, 8, 12]
    """
    if not every:
        return []
    return list(range((start // every + 1) * every, stop, every))
