"""Sequences inside a batch: which steps of each sample count, and where a sample starts a new sequence.

A batch may carry a third element, a dict of per-sample sequence information, next to ``(x, y)``:

- ``"lengths"``: an integer tensor ``(B,)``: sample ``i`` has ``lengths[i]`` valid steps at the start of the
  batch, the rest is padding;
- ``"mask"``: a boolean tensor in the layout of ``x``'s first two axes (``(T, B)`` for ``dim=0``, ``(B, T)``
  for ``dim=1``): which steps are valid;
- ``"resets"``: a boolean tensor ``(B,)`` (sample ``i`` starts a new sequence at the batch's first step) or
  in the layout of the mask (sample ``i`` starts a new sequence at that step: documents concatenated into
  streams);
- ``"position"``: an int, the batch's first step in its stream (:class:`~ignite_tbptt.data.StreamBatches` sets
  it). With ``carry_state=True`` a batch must start where the previous one stopped, or the trainer raises an
  error instead of carrying the state across unrelated steps;
- ``"dim"``: the batch's time axis, as it was laid out (:class:`~ignite_tbptt.data.StreamBatches` sets it): a
  trainer or evaluator whose ``dim`` differs raises an error instead of swapping time and samples.

What the trainer and the evaluator make of it:

- a reset starts sample ``i`` afresh before that step (zeros, or the model's ``reset_hidden``; see
  :mod:`ignite_tbptt.state`) and leaves the other samples alone;
- a padded step adds nothing to the loss or to the gradient, and a sample's state does not change over its
  padded steps: the model runs over them, and its state for that sample is put back afterwards;
- a chunk's loss is one ``loss_fn`` call over the chunk's valid (step, sample) pairs, gathered along the time
  axis with a batch of one (:func:`masked_pair`), so that ``loss_fn`` sees a chunk's rank and layout: with a
  mean-reducing loss, the mean over the valid pairs. A chunk without a valid step makes no update.

Internally the information becomes :class:`Gate` change points at stream positions: the windows cut the
forward pass there, so that the validity of every sample is constant over each model call. The masks are
read on the host (keep them on the CPU); a batch without this information costs nothing.
"""

from typing import Any, List, Mapping, NamedTuple, Optional, Tuple

import torch

from ignite_tbptt.state import StateProtocol

__all__ = [
    "BurnIn", "Gate", "GateTrack", "SequenceInfo", "burn_in_marks", "chunk_gates", "clear_padding", "masked_pair",
    "parse_sequence_info",
    "run_gated",
]

SEQUENCE_KEYS = ("lengths", "mask", "resets", "position", "dim")


class Gate(NamedTuple):
    """What holds from stream position ``position`` on (steps ``position + 1`` and later, to the next gate).

    ``keep``: ``(B,)`` bool, ``False`` where that sample's state is zeroed before step ``position + 1``;
    ``None`` for no reset. ``valid``: ``(B,)`` bool, which samples' steps count; ``None`` for all.
    ``cut``: ``(B,)`` bool, ``True`` where that sample's state is held constant from here on (no gradient
    flows back past it: the end of a burn-in); ``None`` for none. ``frozen``: every sample is in burn-in or
    padding, so the span runs without a graph.
    """

    position: int
    keep: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]
    cut: Optional[torch.Tensor] = None
    frozen: bool = False

    @property
    def trivial(self) -> bool:
        """Whether the gate changes nothing at its own position."""
        return self.keep is None and self.cut is None

    @property
    def idle(self) -> bool:
        """Whether the gate changes nothing at all, at its position or over its span."""
        return self.trivial and self.valid is None and not self.frozen


class SequenceInfo(NamedTuple):
    """A batch's sequence information in time-major layout ``(T, B)``, on the host; ``None`` where absent.

    ``position`` is the batch's first step in its stream, where the batch says so. ``warm`` marks the burn-in
    steps (:func:`burn_in_marks`) and ``cut`` the steps before which a sample's burn-in has just ended.
    """

    valid: Optional[torch.Tensor]
    resets: Optional[torch.Tensor]
    position: Optional[int] = None
    warm: Optional[torch.Tensor] = None
    cut: Optional[torch.Tensor] = None

    @property
    def gated(self) -> bool:
        """Whether some step is padding, a reset or burn-in, so that the forward pass is cut at change points."""
        return self.valid is not None or self.resets is not None or self.warm is not None

    @property
    def scored(self) -> Optional[torch.Tensor]:
        """The (step, sample) pairs the loss scores, those valid and past the burn-in; ``None`` for all."""
        if self.warm is None:
            return self.valid
        return ~self.warm if self.valid is None else self.valid & ~self.warm


class BurnIn(NamedTuple):
    """Where each sample of a stream stands in its burn-in: ``remaining`` valid warm-up steps ``(B,)``, and
    whether its last step was one (``warm_last``), so that a burn-in ending at a batch's edge is cut there."""

    remaining: torch.Tensor
    warm_last: torch.Tensor


def burn_in_marks(
    valid: Optional[torch.Tensor], resets: Optional[torch.Tensor], length: int, batch: int, burn_in: int,
    before: Optional[BurnIn],
) -> Tuple[torch.Tensor, torch.Tensor, BurnIn]:
    """The burn-in steps ``warm`` and the cuts ``cut`` of a batch (``(T, B)`` bools), and where it leaves them.

    A sample's first ``burn_in`` valid steps after its state starts afresh are warm-up: at a fresh stream
    (``before is None``) and at every reset of that sample. Padded steps count as warm-up while it lasts, but
    do not use it up. ``cut[t, i]``: sample ``i``'s warm-up ended before step ``t``.

    >>> warm, cut, after = burn_in_marks(None, None, 5, 1, 3, None)
    >>> warm.flatten().int().tolist(), cut.flatten().int().tolist(), after.remaining.tolist()
    ([1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0])
    """
    steps = torch.arange(length).unsqueeze(1)
    valid_t = torch.ones(length, batch, dtype=torch.bool) if valid is None else valid
    resets_t = torch.zeros(length, batch, dtype=torch.bool) if resets is None else resets
    counted = torch.cat([torch.zeros(1, batch, dtype=torch.long), valid_t.long().cumsum(0)])  # valid steps before t
    last_reset = torch.where(resets_t, steps, torch.full_like(steps, -1)).cummax(0).values  # -1: none in batch
    since = counted[:-1] - counted.gather(0, last_reset.clamp(min=0))  # valid steps since the last reset
    carried = torch.full((batch,), burn_in, dtype=torch.long) if before is None else before.remaining
    warm = torch.where(last_reset >= 0, since < burn_in, counted[:-1] < carried.unsqueeze(0))
    warm_last = torch.zeros(batch, dtype=torch.bool) if before is None else before.warm_last
    previous = torch.cat([warm_last.unsqueeze(0), warm[:-1]])
    cut = previous & ~warm & ~resets_t
    final_since = counted[-1] - counted.gather(0, last_reset[-1:].clamp(min=0))[0]
    remaining = torch.where(last_reset[-1] >= 0, burn_in - final_since, carried - counted[-1]).clamp(min=0)
    return warm, cut, BurnIn(remaining, warm[-1])


def _layout_check(name: str, t: Any, shape: Tuple[int, int], dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sequence info {name!r} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"sequence info {name!r} must be a bool tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"sequence info {name!r} must have the shape {shape} of x's first two axes, got {tuple(t.shape)}")
    return t.cpu() if dim == 0 else t.cpu().t()


def parse_sequence_info(info: Any, x: torch.Tensor, dim: int) -> SequenceInfo:
    """Check a batch's sequence information against ``x`` and turn it into time-major host tensors.

    >>> x = torch.zeros(4, 2, 1)  # (time, batch, features)
    >>> parse_sequence_info({"lengths": torch.tensor([4, 2])}, x, dim=0).valid.int().tolist()
    [[1, 1], [1, 1], [1, 0], [1, 0]]
    >>> parse_sequence_info({"length": torch.tensor([4, 2])}, x, dim=0)
    Traceback (most recent call last):
    ...
    ValueError: unknown sequence info keys ['length']; expected some of ('lengths', 'mask', 'resets', 'position', 'dim')
    """
    if not isinstance(info, Mapping):
        raise TypeError(f"the third element of a batch must be a dict of sequence info, got {type(info).__name__}")
    unknown = sorted(set(info) - set(SEQUENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown sequence info keys {unknown}; expected some of {SEQUENCE_KEYS}")
    if "dim" in info and info["dim"] != dim:
        raise ValueError(
            f"this batch is laid out with its time axis at dim={info['dim']}, but the trainer or evaluator reads time "
            f"along dim={dim}: it would swap time and samples. Pass dim={info['dim']} to the trainer and the "
            f"evaluator (or build the batches with batch_first={dim == 1})"
        )
    if dim not in (0, 1) or x.dim() < 2:
        raise ValueError(f"sequence info needs x with a batch axis and the time axis dim=0 or 1, got dim={dim}")
    shape = tuple(x.shape[:2])
    length, batch = (shape[0], shape[1]) if dim == 0 else (shape[1], shape[0])
    if "mask" in info and "lengths" in info:
        raise ValueError("give either 'mask' or 'lengths' in the sequence info, not both")
    valid = None
    if info.get("mask") is not None:
        valid = _layout_check("mask", info["mask"], shape, dim)
    elif info.get("lengths") is not None:
        lengths = info["lengths"]
        if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.shape != (batch,):
            raise ValueError(f"sequence info 'lengths' must be an integer tensor of shape ({batch},)")
        lengths = lengths.cpu()
        if bool((lengths < 0).any()) or bool((lengths > length).any()):
            raise ValueError(f"sequence info 'lengths' must lie in [0, {length}], got {lengths.tolist()}")
        valid = torch.arange(length).unsqueeze(1) < lengths.unsqueeze(0)
    resets = info.get("resets")
    if resets is not None:
        if isinstance(resets, torch.Tensor) and resets.shape == (batch,) and resets.dtype == torch.bool:
            resets = torch.cat([resets.cpu().unsqueeze(0), torch.zeros(length - 1, batch, dtype=torch.bool)])
        else:
            resets = _layout_check("resets", resets, shape, dim)
    position = info.get("position")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int) or position < 0):
        raise ValueError(f"sequence info 'position' must be an int >= 0, got {position!r}")
    return SequenceInfo(valid, resets, position)


def chunk_gates(info: SequenceInfo, rows: slice, start: int, device: Any) -> List[Gate]:
    """The change points of the steps ``rows`` of a batch, which start at stream position ``start``.

    The first gate sits at ``start`` and restates the validity in force, so that a chunk never inherits the
    previous one's.

    >>> info = SequenceInfo(valid=torch.tensor([[1, 1], [1, 0], [1, 0]]).bool(), resets=None)
    >>> [(g.position, g.valid.tolist() if g.valid is not None else None) for g in chunk_gates(info, slice(0, 3), 6, "cpu")]
    [(6, None), (7, [True, False])]
    """
    valid = None if info.valid is None else info.valid[rows]
    resets = None if info.resets is None else info.resets[rows]
    warm = None if info.warm is None else info.warm[rows]
    cut = None if info.cut is None else info.cut[rows]
    steps = rows.stop - rows.start
    change = torch.zeros(steps, dtype=torch.bool)
    change[0] = True
    if valid is not None:
        change[1:] |= (valid[1:] != valid[:-1]).any(1)
    if resets is not None:
        change |= resets.any(1)
    frozen = None
    if warm is not None:
        frozen = (warm if valid is None else warm | ~valid).all(1)  # no sample scores: no graph is needed
        change[1:] |= frozen[1:] != frozen[:-1]
        change |= cut.any(1)
    gates = []
    for j in change.nonzero().flatten().tolist():
        keep = None if resets is None or not bool(resets[j].any()) else (~resets[j]).to(device)
        ok = None if valid is None or bool(valid[j].all()) else valid[j].to(device)
        held = None if cut is None or not bool(cut[j].any()) else cut[j].to(device)
        gates.append(Gate(start + j, keep, ok, held, bool(frozen[j]) if frozen is not None else False))
    return gates


def masked_pair(y_pred: Any, y: torch.Tensor, valid: Optional[torch.Tensor], dim: int) -> Tuple[Any, torch.Tensor]:
    """``(y_pred, y)`` restricted to the valid (step, sample) pairs, in the rank and layout of a chunk.

    The valid pairs are gathered along the time axis ``dim`` with a batch of one: ``(N, 1, ...)`` time-first,
    ``(1, N, ...)`` batch-first. A loss written for plain chunks (a cross-entropy that flattens the first two
    axes, or one that permutes time and batch) therefore runs unchanged on masked ones. ``valid`` is in the
    layout of ``y``'s first two axes; ``None`` keeps everything as it is.

    >>> y = torch.arange(6.0).view(3, 2)  # (time, batch)
    >>> valid = torch.tensor([[True, True], [True, False], [False, False]])
    >>> masked_pair(y, y, valid, dim=0)[1].tolist()
    [[0.0], [1.0], [2.0]]
    """
    if valid is None:
        return y_pred, y
    if not isinstance(y_pred, torch.Tensor):
        raise TypeError(f"with a mask or lengths, y_pred must be a tensor, got {type(y_pred).__name__}")
    batch_axis = 1 - dim
    return y_pred[valid].unsqueeze(batch_axis), y[valid].unsqueeze(batch_axis)


def clear_padding(x: Any, info: Optional[SequenceInfo], rows: slice, dim: int) -> Any:
    """A chunk's floating ``x`` with zeros at the steps that are not valid (padding, masked pairs).

    Such a step holds its sample's state and scores nothing, so its input changes nothing the gradient sees: but
    a NaN or inf there would, since the backward pass multiplies the zero gradient at a held step by the
    step's non-finite activations (``0 * nan`` is ``nan``). Zeros make the contract's "adds nothing" hold for
    any value there. Token ids and other integer inputs cannot be non-finite and pass unchanged.

    >>> info = SequenceInfo(valid=torch.tensor([[True, True], [True, False]]), resets=None)
    >>> clear_padding(torch.full((2, 2, 1), float("nan")), info, slice(0, 2), dim=0).isnan().flatten().tolist()
    [True, True, True, False]
    """
    if info is None or info.valid is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return x
    valid = info.valid[rows]
    if bool(valid.all()):
        return x
    valid = (valid if dim == 0 else valid.t()).to(x.device)
    return torch.where(valid.view(*valid.shape, *[1] * (x.dim() - 2)), x, x.new_zeros(()))


def run_gated(gate: Optional[Gate], forward: Any, x: torch.Tensor, hidden: Any, start: int, state: StateProtocol) -> Tuple[Any, Any]:
    """``forward(x, hidden)`` over a span starting at ``start`` under ``gate``: its reset and cut at its own
    position, then the model call (without a graph where ``frozen``), then the state held over padding.

    A function of its arguments only, so that activation checkpointing re-runs exactly what ran: the track of
    gates moves on between a forward pass and its backward pass.
    """
    if gate is None:
        return forward(x, hidden)
    if gate.position == start and hidden is not None:
        if gate.keep is not None:
            hidden = state.reset(hidden, gate.keep)
        if gate.cut is not None:
            hidden = state.cut(hidden, gate.cut)
    if gate.frozen:  # burn-in or padding for every sample: nothing here is differentiated
        with torch.no_grad():
            y_pred, new = forward(x, hidden)
    else:
        y_pred, new = forward(x, hidden)
    if gate.valid is not None:
        new = state.hold(hidden, new, gate.valid)
    return y_pred, new


class GateTrack:
    """The gates of the stretch of stream a window may still run over, in position order.

    Only real change points are kept: a chunk without sequence information adds nothing after another, so the
    default path never cuts the forward pass.
    """

    def __init__(self, state: StateProtocol) -> None:
        self.state = state
        self.gates: List[Gate] = []

    def clear(self) -> None:
        self.gates.clear()

    def add(self, gates: List[Gate]) -> None:
        for gate in gates:
            if gate.idle and (not self.gates or (self.gates[-1].valid is None and not self.gates[-1].frozen)):
                continue
            self.gates.append(gate)

    def cuts(self, start: int, stop: int) -> List[int]:
        """Positions strictly inside ``(start, stop)`` where the forward pass must be cut."""
        return [g.position for g in self.gates if start < g.position < stop]

    def at(self, position: int) -> Optional[Gate]:
        """The gate in force at ``position``, or ``None`` when nothing applies."""
        for gate in reversed(self.gates):
            if gate.position <= position:
                return gate
        return None

    def drop_before(self, position: int) -> None:
        """Forget gates no run from ``position`` on can need (keeping the one in force there)."""
        while len(self.gates) > 1 and self.gates[1].position <= position:
            self.gates.pop(0)
        if self.gates and self.gates[0].idle:
            self.gates.pop(0)  # in force but without effect: the same as no gate

    def run(self, forward: Any, x: torch.Tensor, hidden: Any, start: int) -> Tuple[Any, Any]:
        """``forward(x, hidden)`` over a span starting at ``start`` with constant validity: resets, then holds."""
        return run_gated(self.at(start), forward, x, hidden, start, self.state)

    def state_dict(self) -> List[Tuple[Any, ...]]:
        return [tuple(g) for g in self.gates]

    def load_state_dict(self, saved: List[Tuple[Any, ...]]) -> None:
        self.gates = [Gate(*g) for g in saved]
