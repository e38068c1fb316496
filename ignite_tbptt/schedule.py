"""Pure scheduling for TBPTT(k1, k2): chunks, backprop windows and segment cuts as plain integers.

Nothing here knows about torch; the random draws (:class:`RandomLength`, :class:`ARTBP`) are made here too,
from seeded ``random.Random`` generators whose state the trainer saves. Positions are time steps in *stream*
coordinates: a chunk or a segment ``(start, stop]`` covers the steps ``start + 1 .. stop``, so its length is
``stop - start``. See ``docs/contract.md`` for the definitions this module implements:

- chunk ``c`` is ``(s_c, t_c]``, with ``t_c = s_c + k1`` and a shorter last chunk;
- its update differentiates the window ``(w_c, t_c]``, ``w_c = max(0, s_c - (k2 - k1))``; position 0 is
  where the stream (and its hidden state) started afresh;
- with ``k2=ARTBP(p)``, ``w_c`` is the last random truncation at or before ``s_c`` (:func:`truncate`).

Example:
    >>> [tuple(c)[:4] for c in plan_chunks(length=10, k1=3, k2=5)]
    [(0, 0, 3, 0), (1, 3, 6, 1), (2, 6, 9, 4), (3, 9, 10, 7)]
"""

import math
import numbers
import random
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "ARTBP", "BatchPlan", "Chunk", "RandomLength", "Reach", "Truncations", "adaptive_plan", "batch_plan", "check_positive_int",
    "check_steps", "checkpoint_cuts", "cross_boundary", "plan_batch", "plan_chunks", "later_window_starts", "segment_spans",
    "truncate",
    "window_starts_after",
]


class Chunk(NamedTuple):
    """One update of TBPTT: its chunk ``(start, stop]`` and the start of its backprop window.

    ``index`` counts the chunks of one batch from 0. Positions are in stream coordinates. ``factor`` is the
    compensation of unbiased truncation (:class:`ARTBP`) at the chunk's start: a backward pass that crosses that
    position multiplies the state gradient by it. It is 1.0 wherever nothing is compensated.
    """

    #: The chunk's number in its batch, from 0.
    index: int
    #: The stream position before the chunk's first step.
    start: int
    #: The stream position of the chunk's last step; the chunk is ``(start, stop]``.
    stop: int
    #: Where the chunk's backprop window starts; its loss is backpropagated through ``(window_start, stop]``.
    window_start: int
    #: The state gradient's compensation at ``start`` (unbiased truncation); 1.0 where nothing is compensated.
    factor: float = 1.0

    @property
    def length(self) -> int:
        """Number of time steps in the chunk (the weight of its loss in the batch mean)."""
        return self.stop - self.start


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1, else a ``TypeError`` or ``ValueError`` that names ``name``.

    >>> check_positive_int("seq_len", 0)
    Traceback (most recent call last):
    ...
    ValueError: seq_len must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_steps(k1: int, k2: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``1 <= k1 <= k2`` are integers.

    >>> check_steps(3, 2)
    Traceback (most recent call last):
    ...
    ValueError: k2 (2) must be >= tbtt_step (3): each update backpropagates at least through its own chunk
    """
    for name, value in (("tbtt_step", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int):
            other = " or ARTBP(p) (random truncation) or AdaptiveK2(delta) (adaptive)" if name == "k2" else ""
            raise TypeError(f"{name} must be an int{other}, got {type(value).__name__} ({value!r})")
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
    [Chunk(index=0, start=6, stop=8, window_start=5, factor=1.0), Chunk(index=1, start=8, stop=10, window_start=7, factor=1.0)]
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


def window_starts_after(chunk: Chunk, later_chunk_starts: Iterable[int], overlap: int) -> List[int]:
    """The window starts, before ``chunk.stop``, of the chunks after ``chunk`` that start at ``later_chunk_starts``.

    >>> window_starts_after(Chunk(0, 0, 3, 0), [3, 9, 14], overlap=2)
    [1]
    """
    if not overlap:
        return []
    return sorted({max(0, s - overlap) for s in later_chunk_starts if s > chunk.start and s - overlap < chunk.stop})


def _restore_rng(rng: random.Random, saved: Any) -> None:
    """Set ``rng`` to a saved ``getstate()``, whose inner tuple a checkpoint may have turned into a list."""
    version, internal, gauss_next = saved
    rng.setstate((version, tuple(internal), gauss_next))


class RandomLength:
    """Random chunk lengths, AWD-LSTM's rule (Merity et al. 2017): ``tbtt_step=RandomLength(bptt)``.

    Each chunk's length is drawn afresh: ``base = bptt`` with probability ``p_full`` (0.95), else ``bptt / 2``;
    ``length = max(min_length, int(normal(base, std)))`` with ``std = 5`` and ``min_length = 5``, and at most
    ``max_length`` where given. The trainer scales each update's learning rate by ``length / bptt`` (docs/contract.md,
    "Random chunk lengths"). The draws follow ``seed`` and their state is part of the trainer's ``state_dict()``,
    so a resumed run draws the lengths the uninterrupted one would have. The trainer draws from its own copy.

    Args:
        bptt: the base length, in steps (>= ``min_length``).
        p_full: the probability of drawing around ``bptt`` rather than ``bptt / 2``.
        std: the standard deviation of the normal draw, in steps.
        min_length: the shortest chunk, in steps.
        max_length: the longest chunk, in steps (``None``: no bound).
        seed: seeds the draws.

    >>> lengths = RandomLength(70, seed=1)
    >>> draws = [lengths.next() for _ in range(2000)]
    >>> 66 < sum(draws) / len(draws) < 70, min(draws) >= 5
    (True, True)
    """

    def __init__(
        self, bptt: int, p_full: float = 0.95, std: float = 5.0, min_length: int = 5,
        max_length: Optional[int] = None, seed: int = 0,
    ) -> None:
        for name, value in (("bptt", bptt), ("min_length", min_length), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"RandomLength: {name} must be an int, got {type(value).__name__} ({value!r})")
        if bptt < 1:
            raise ValueError(f"RandomLength: bptt must be >= 1, got {bptt}")
        if min_length < 1:
            raise ValueError(f"RandomLength: min_length must be >= 1, got {min_length}")
        if bptt < min_length:
            raise ValueError(
                f"RandomLength: bptt={bptt} is below min_length={min_length}: every chunk would be at least "
                f"{min_length} steps and each update's learning rate scaled by length / bptt >= {min_length / bptt:g}; "
                f"pass bptt >= {min_length}, or a smaller min_length"
            )
        if not (isinstance(p_full, (int, float)) and 0 <= p_full <= 1):
            raise ValueError(f"RandomLength: p_full must be a probability in [0, 1], got {p_full!r}")
        if not (isinstance(std, (int, float)) and std >= 0 and math.isfinite(std)):
            raise ValueError(f"RandomLength: std must be a finite number >= 0, got {std!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < min_length):
            raise ValueError(f"RandomLength: max_length must be an int >= min_length ({min_length}), got {max_length!r}")
        self.bptt, self.p_full, self.std = bptt, float(p_full), float(std)
        self.min_length, self.max_length, self.seed = min_length, max_length, seed
        self._rng = random.Random(seed)
        self._ahead: Deque[int] = deque()  # drawn by peek(), not yet used

    def __repr__(self) -> str:
        return (f"RandomLength(bptt={self.bptt}, p_full={self.p_full}, std={self.std}, min_length={self.min_length}, "
                f"max_length={self.max_length}, seed={self.seed})")

    def _draw(self) -> int:
        base = self.bptt if self._rng.random() < self.p_full else self.bptt / 2
        length = max(self.min_length, int(self._rng.gauss(base, self.std)))
        return length if self.max_length is None else min(length, self.max_length)

    def next(self) -> int:
        """The next chunk's length."""
        return self._ahead.popleft() if self._ahead else self._draw()

    def peek(self, count: int) -> List[int]:
        """The next ``count`` lengths, without using them up."""
        while len(self._ahead) < count:
            self._ahead.append(self._draw())
        return list(self._ahead)[:count]

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self._rng.getstate(), "ahead": list(self._ahead)}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        _restore_rng(self._rng, saved["rng"])
        self._ahead = deque(saved["ahead"])


class ARTBP:
    """Unbiased truncation (Tallec & Ollivier 2017, "Unbiasing Truncated Backpropagation Through Time"):
    ``k2=ARTBP(p)``.

    At every chunk boundary the backprop window is truncated with probability ``p``: a float, or a function
    ``p(length)`` of the current window's length in chunks (the chunks since the last truncation). Update ``c``
    backpropagates its chunk's loss back to the last truncation before it, and wherever that backward pass crosses
    a boundary at which no truncation happened, the state gradient is multiplied by ``1 / (1 - p)`` there. For
    fixed parameters the expected gradient is then the gradient of the chunk's loss through the whole stream (docs/contract.md,
    "Unbiased truncation"). A constant ``p`` gives windows of ``1 / p`` chunks on average, geometrically
    distributed.

    ``cap`` bounds the window to its last ``cap`` chunks (memory is then bounded by ``cap`` chunks). The truncation
    draws do not change; an update only stops its backward pass ``cap`` chunks back. The expected gradient is then
    exactly TBPTT's with a window of ``cap`` chunks (``k2 = cap * k1``): unbiased for every influence that reaches
    less than ``cap`` chunks back, and missing all that reaches further. ``None``: no cap.

    The draws follow ``seed`` (the trainer draws from its own copy, the same on every process), one uniform number
    per boundary, and their state is part of the trainer's ``state_dict()``, so a resumed run truncates where the
    uninterrupted one would have. A fresh stream starts with a truncation; a per-sample reset stops that sample's
    gradient whatever is drawn (a truncation with probability 1), so nothing is compensated there.

    Args:
        p: the truncation probability in ``[0, 1)``, or a function of the window's length in chunks giving it.
        cap: the most chunks one backward pass crosses (``None``: no cap).
        seed: seeds the draws.

    >>> artbp = ARTBP(0.25, seed=1)
    >>> chunks = truncate(plan_chunks(40, 2, 2), artbp, None, stream=False)[0]
    >>> [(c.start, c.window_start) for c in chunks[:4]], chunks[2].factor
    ([(0, 0), (2, 2), (4, 2), (6, 2)], 1.3333333333333333)
    """

    def __init__(self, p: Union[float, Callable[[int], float]], cap: Optional[int] = None, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"ARTBP: seed must be an int, got {type(seed).__name__} ({seed!r})")
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, int):
                raise TypeError(f"ARTBP: cap must be an int or None, got {type(cap).__name__} ({cap!r})")
            if cap < 1:
                raise ValueError(f"ARTBP: cap must be >= 1 (a window holds at least its own chunk), got {cap}")
        if not callable(p) and (isinstance(p, bool) or not isinstance(p, numbers.Real)):
            raise TypeError(f"ARTBP: p must be a float or a function of the window length, got {type(p).__name__}")
        self.p, self.cap, self.seed = p, cap, seed
        self.probability(1)  # a bad p fails here, before anything trains
        self._rng = random.Random(seed)
        self._ahead: Optional[float] = None  # drawn by peek(), not yet used

    def __repr__(self) -> str:
        return f"ARTBP(p={self.p!r}, cap={self.cap}, seed={self.seed})"

    def probability(self, length: int) -> float:
        """The truncation probability at a boundary where the window holds ``length`` chunks."""
        p = self.p(length) if callable(self.p) else self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            where = f"p({length}) returned" if callable(self.p) else "p must be a probability in [0, 1), got"
            raise ValueError(
                f"ARTBP: {where} {p!r}; a truncation probability must lie in [0, 1) (at 1 the compensation "
                "1 / (1 - p) is infinite: bound the window with cap instead)"
            )
        return float(p)

    def draw(self) -> float:
        """The next boundary's uniform number."""
        if self._ahead is None:
            return self._rng.random()
        u, self._ahead = self._ahead, None
        return u

    def peek(self) -> float:
        """The next boundary's uniform number, without using it up."""
        if self._ahead is None:
            self._ahead = self._rng.random()
        return self._ahead

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self._rng.getstate(), "ahead": self._ahead}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        _restore_rng(self._rng, saved["rng"])
        self._ahead = saved["ahead"]


class Truncations(NamedTuple):
    """Where a stream stands in its random truncations: ``run`` chunks since the last truncation (the chunk that
    starts there included), and the start positions of the chunks the current window holds, oldest first (only
    the truncation point without a cap; the last ``cap`` chunks' with one)."""

    run: int
    starts: Tuple[int, ...]


def cross_boundary(
    before: Optional[Truncations], position: int, u: float, artbp: ARTBP
) -> Tuple[Truncations, float]:
    """The truncations after a chunk starting at ``position`` (``u``: its uniform draw), and its compensation.

    ``before is None``: a fresh stream starts here, which is a truncation (no draw is used).

    >>> cross_boundary(Truncations(2, (4,)), 8, u=0.9, artbp=ARTBP(0.5))
    (Truncations(run=3, starts=(4,)), 2.0)
    """
    if before is None:
        return Truncations(1, (position,)), 1.0
    p = artbp.probability(before.run)
    if u < p:
        return Truncations(1, (position,)), 1.0
    starts = before.starts if artbp.cap is None else (before.starts + (position,))[-artbp.cap:]
    return Truncations(before.run + 1, starts), 1.0 / (1.0 - p)


def truncate(
    chunks: List[Chunk], artbp: ARTBP, before: Optional[Truncations], stream: bool
) -> Tuple[List[Chunk], Callable[[Chunk], List[int]], Truncations]:
    """``chunks`` with the windows and compensations of random truncation, a function giving a chunk's later window
    starts (as :func:`later_window_starts`), and the truncations after the last chunk.

    Every chunk start is a boundary and uses one draw (a fresh stream's first start uses none). With ``stream`` the
    next batch starts a chunk at the batch's end: its draw is peeked here, so that the last chunk knows whether a
    later window reaches back into it.
    """
    out, state = [], before
    for chunk in chunks:
        state, factor = cross_boundary(state, chunk.start, u=artbp.draw() if state is not None else 0.0, artbp=artbp)
        out.append(chunk._replace(window_start=state.starts[0], factor=factor))
    following = [c.window_start for c in out[1:]]
    if stream:
        following.append(cross_boundary(state, out[-1].stop, artbp.peek(), artbp)[0].starts[0])
    later = {c.index: [w] for c, w in zip(out, following) if w < c.stop}
    return out, lambda c: later.get(c.index, []), state


Steps = Union[int, RandomLength]
Window = Union[int, ARTBP]


def bptt_of(tbtt_step: Steps) -> int:
    """The nominal chunk length: ``tbtt_step``, or a :class:`RandomLength`'s ``bptt``."""
    return tbtt_step.bptt if isinstance(tbtt_step, RandomLength) else tbtt_step


def batch_plan(
    length: int, offset: int, tbtt_step: Steps, k2: Window, stream: bool, truncations: Optional[Truncations] = None,
) -> Tuple[List[Chunk], Callable[[Chunk], List[int]], Optional[Truncations]]:
    """The chunks of a batch of ``length`` steps starting at stream position ``offset``, a function giving a
    chunk's later window starts (:func:`later_window_starts`), computed chunk by chunk, and with ``k2=ARTBP(...)``
    the stream's truncations after the batch (``truncations``: before it; ``None`` for a fresh stream).

    Fixed chunks lie on the ``k1`` grid from ``offset``. Random lengths are drawn chunk after chunk; the batch's
    end cuts the last chunk, and with ``stream`` the next batch starts a new chunk, whose length (and those of
    the chunks after it, as far as a window can reach back) is drawn ahead here. Random truncations are drawn at
    every chunk start (:func:`truncate`).

    >>> chunks, later, _ = batch_plan(6, 0, 3, 4, stream=True)
    >>> [(tuple(c), later(c)) for c in chunks]
    [((0, 0, 3, 0, 1.0), [2]), ((1, 3, 6, 2, 1.0), [5])]
    """
    if isinstance(k2, ARTBP):
        chunks, _ = _fixed_window_plan(length, offset, tbtt_step, bptt_of(tbtt_step), stream=False)
        return truncate(chunks, k2, truncations, stream)
    return (*_fixed_window_plan(length, offset, tbtt_step, k2, stream), None)


def _fixed_window_plan(
    length: int, offset: int, tbtt_step: Steps, k2: int, stream: bool
) -> Tuple[List[Chunk], Callable[[Chunk], List[int]]]:
    """:func:`batch_plan` for a window of ``k2`` steps."""
    if not isinstance(tbtt_step, RandomLength):
        chunks = plan_chunks(length, tbtt_step, k2, offset)
        return chunks, lambda c: later_window_starts(c, offset + length, tbtt_step, k2, stream)
    if length < 1:
        raise ValueError(f"a batch needs at least one time step, got {length}")
    overlap, stop, chunks = k2 - tbtt_step.bptt, offset + length, []
    start = offset
    while start < stop:
        end = min(start + tbtt_step.next(), stop)  # a batch's end cuts a chunk
        chunks.append(Chunk(len(chunks), start, end, max(0, start - overlap)))
        start = end
    starts = [c.start for c in chunks[1:]]
    if stream and overlap:  # the next batch's chunks whose windows may reach back into this one
        starts.append(stop)
        ahead = 0
        while starts[-1] < stop + overlap:
            ahead += 1
            starts.append(stop + sum(tbtt_step.peek(ahead)))
    return chunks, lambda c: window_starts_after(c, starts, overlap)


class Reach(NamedTuple):
    """How far the windows of a batch reach back under a window that changes between batches (``AdaptiveK2``).

    ``overlap``: the steps before its chunk that every window of the batch reaches back at least (``k2 - k1``);
    ``next_overlap``: the next batch's, known when this batch is planned; ``floor``: the earliest position a window
    of this batch may start at, where the previous batch kept what its windows need (0 for a fresh stream).
    """

    overlap: int
    next_overlap: int
    floor: int = 0


def adaptive_plan(
    length: int, offset: int, tbtt_step: Steps, reach: Reach, stream: bool
) -> Tuple[List[Chunk], Callable[[Chunk], List[int]], int]:
    """The chunks of a batch whose window changes between batches, their later window starts, and the floor of the
    next batch (the earliest position its windows may start at: what this batch's plan keeps for them).

    A window changes only at a batch boundary, and the plan of a batch provides for the next batch's windows, so
    both overlaps are known here. Chunk ``c`` starting at ``s`` gets the window start

        ``w = max(floor, min(s - overlap, ahead))``,  ``ahead = max(offset, stop - next_overlap)`` (``stream``)

    clipped at 0: every window reaches back at least ``overlap`` steps (down to ``floor``), and where the next batch
    reaches further back, the last chunks of this batch start their windows no later than its first does. So window
    starts never decrease from one update to the next, as under a fixed ``k2``, and both overlap modes keep one
    stream of states or graphs. ``ahead`` never reaches before this batch: the next batch's windows stop at its
    start (``floor``), so a window reaches back at most one batch before its own.

    >>> chunks, later, floor = adaptive_plan(8, 8, 2, Reach(overlap=1, next_overlap=5, floor=7), stream=True)
    >>> [(c.start, c.window_start) for c in chunks], [later(c) for c in chunks], floor
    ([(8, 7), (10, 9), (12, 11), (14, 11)], [[9], [11], [11, 13], [11, 13, 15]], 11)
    """
    chunks = _fixed_window_plan(length, offset, tbtt_step, bptt_of(tbtt_step), stream=False)[0]
    stop = offset + length
    ahead = max(offset, stop - reach.next_overlap) if stream else stop
    chunks = [c._replace(window_start=max(0, reach.floor, min(c.start - reach.overlap, ahead))) for c in chunks]
    future = [(c.start, c.window_start) for c in chunks[1:]]
    next_floor = max(0, ahead)
    if stream:  # the next batch's chunks whose windows reach back into this one
        future += [(s, max(next_floor, s - reach.next_overlap)) for s in _starts_after(stop, tbtt_step, reach.next_overlap)]
    return chunks, lambda c: sorted({w for s, w in future if s > c.start and w < c.stop}), next_floor


def _starts_after(stop: int, tbtt_step: Steps, overlap: int) -> List[int]:
    """The starts of the next batch's chunks, from ``stop``, up to the last whose window of ``overlap`` steps
    reaches back before ``stop`` (random lengths drawn ahead, as :func:`_fixed_window_plan` does)."""
    if not isinstance(tbtt_step, RandomLength):
        return list(range(stop, stop + overlap, tbtt_step))
    starts, ahead = [stop], 0
    while starts[-1] < stop + overlap:
        ahead += 1
        starts.append(stop + sum(tbtt_step.peek(ahead)))
    return starts[:-1] if len(starts) > 1 else []


class BatchPlan(NamedTuple):
    """One batch's plan: what the overlap modes, ``ARTBP`` and ``AdaptiveK2`` read of the schedule.

    ``chunks``: the batch's updates in order, each with its window start and compensation. ``later_of(chunk)``: the
    window starts of later updates (of this batch and, on a carried stream, of the next one as planned) that fall
    before the chunk's end: where its forward pass is cut and where the window keeps a state. ``k2``: the batch's
    window in steps (``None`` under ``ARTBP``, whose windows are random). ``truncations`` (``ARTBP``) and ``reach``
    (a window set per batch): what the batch leaves the next batch's plan, ``None`` where unused.

    >>> plan = plan_batch(6, 0, 3, 4, stream=False)
    >>> [(c.start, c.window_start, plan.later_of(c)) for c in plan.chunks], plan.k2
    ([(0, 0, [2]), (3, 2, [])], 4)
    """

    chunks: List[Chunk]
    later_of: Callable[[Chunk], List[int]]
    k2: Optional[int]
    truncations: Optional[Truncations] = None
    reach: Optional[Reach] = None


def plan_batch(
    length: int, offset: int, tbtt_step: Steps, k2: Union[Window, Reach], stream: bool,
    truncations: Optional[Truncations] = None,
) -> BatchPlan:
    """The plan of a batch of ``length`` steps from stream position ``offset``: windows of ``k2`` steps, random
    truncation (``k2=ARTBP(...)``, continuing ``truncations``; ``None``: a fresh stream) or, for a window set per
    batch, a :class:`Reach` (:func:`adaptive_plan`). ``stream``: the next batch continues the stream."""
    if isinstance(k2, Reach):
        chunks, later_of, floor = adaptive_plan(length, offset, tbtt_step, k2, stream)
        return BatchPlan(chunks, later_of, bptt_of(tbtt_step) + k2.overlap, reach=Reach(k2.next_overlap, k2.next_overlap, floor))
    chunks, later_of, after = batch_plan(length, offset, tbtt_step, k2, stream, truncations)
    return BatchPlan(chunks, later_of, None if isinstance(k2, ARTBP) else k2, truncations=after)


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
