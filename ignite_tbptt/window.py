"""Autograd mechanics of the backprop window: what one TBPTT(k1, k2) update runs forward and backward.

Two classes implement ``SPEC.md``'s two ``overlap`` modes behind one call,
``window(chunk, later_starts, x_chunk, y_chunk) -> (y_pred, loss)``. The call leaves the chunk's gradient in
the parameters' ``.grad``; the optimizer step belongs to the caller. Scheduling comes from
:mod:`ignite_tbptt.schedule`.

- :class:`RecomputeWindow` keeps the state at the next window's start and the inputs since then, and re-runs
  the window under the current parameters: exact gradient, ``k2 / k1`` times the forward work.
- :class:`RetainWindow` runs every step once and keeps the graphs of the last ``k2`` steps as *segments*
  cut at every window start. An update chains the state gradient back through the segments of its window.
  Each chunk's forward pass uses differentiable clones of the parameters (``torch.func.functional_call``),
  so the retained graphs never alias the live parameters that ``optimizer.step()`` changes in place, and
  the gradient still lands in ``.grad`` through the clone.

With ``k2 == k1`` both reduce to Ignite's trainer: one forward and one backward per chunk, nothing retained.
"""

from collections import deque
from typing import Any, Callable, Deque, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt.schedule import Chunk, segment_spans

__all__ = ["default_model_fn", "RecomputeWindow", "RetainWindow"]

Hidden = Any
ModelFn = Callable[[nn.Module, torch.Tensor, Optional[Hidden]], Tuple[Any, Hidden]]


def default_model_fn(model: nn.Module, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
    """Call ``model(x)`` on the first chunk of a sequence and ``model(x, hidden)`` after it, as Ignite does."""
    return model(x) if hidden is None else model(x, hidden)


def call_model(model_fn: ModelFn, model: Any, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
    """Run ``model_fn`` and check that it returned ``(y_pred, hidden)``."""
    out = model_fn(model, x, hidden)
    if not (isinstance(out, Sequence) and not isinstance(out, (str, bytes)) and len(out) == 2):
        raise TypeError(
            "the model must return a pair (y_pred, hidden), got "
            f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, Sequence) else ''}; "
            "wrap it with model_fn=lambda model, x, hidden: ... to adapt other signatures"
        )
    return out[0], out[1]


def cat_time(pieces: List[Any], dim: int) -> Any:
    """Concatenate model outputs (tensors or matching nestings of them) along the time axis ``dim``."""
    if len(pieces) == 1:
        return pieces[0]
    flat = [tree_flatten(p) for p in pieces]
    leaves = [torch.cat(parts, dim) for parts in zip(*(leaves for leaves, _ in flat))]
    return tree_unflatten(leaves, flat[0][1])


class _Inputs:
    """Prepared input chunks kept for re-running windows, each with its span ``(start, stop]``."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.chunks: Deque[Tuple[int, int, torch.Tensor]] = deque()

    def add(self, start: int, stop: int, x: torch.Tensor) -> None:
        self.chunks.append((start, stop, x))

    def over(self, start: int, stop: int) -> torch.Tensor:
        """The inputs of steps ``(start, stop]``, sliced from one chunk or joined from several."""
        pieces = []
        for a, b, x in self.chunks:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                pieces.append(x if (lo, hi) == (a, b) else x.narrow(self.dim, lo - a, hi - lo))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)

    def drop_before(self, position: int) -> None:
        """Forget chunks that end at or before ``position``: no later window reaches them."""
        while self.chunks and self.chunks[0][1] <= position:
            self.chunks.popleft()

    def clear(self) -> None:
        self.chunks.clear()


class RecomputeWindow:
    """``overlap="recompute"``: re-run each window ``(w, t]`` from the stored state at ``w``.

    It keeps one state, at the next update's window start as this update's run computed it, and the inputs
    from there on: memory is bounded by ``k2``.

    Args:
        model: the recurrent model.
        loss_fn: ``loss_fn(y_pred, y)`` for one chunk.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``.
        detach: cuts a hidden state from its graph (``ignite_tbptt.trainer._detach_hidden``).
        dim: the time axis of inputs and outputs.

    Example:
        >>> import torch
        >>> from ignite_tbptt.schedule import plan_chunks
        >>> model, x = torch.nn.RNN(1, 2), torch.ones(4, 1, 1)
        >>> window = RecomputeWindow(model, lambda p, y: p.pow(2).mean(), default_model_fn, lambda h: h.detach(), 0)
        >>> first, second = plan_chunks(4, k1=2, k2=3)
        >>> _ = window(first, [1], x[:2], x[:2])
        >>> y_pred, loss = window(second, [], x[2:], x[2:])  # re-runs steps (1, 4], scores (2, 4]
        >>> tuple(y_pred.shape)
        (2, 1, 2)
    """

    def __init__(self, model: Any, loss_fn: Callable, model_fn: ModelFn, detach: Callable, dim: int) -> None:
        self.model, self.loss_fn, self.model_fn, self.detach, self.dim = model, loss_fn, model_fn, detach, dim
        self.inputs = _Inputs(dim)
        self.reset()

    def reset(self) -> None:
        """Start a fresh stream at position 0: no state, no inputs."""
        self.inputs.clear()
        self.state_at, self.hidden = 0, None

    def __call__(
        self, chunk: Chunk, later_starts: List[int], x: torch.Tensor, y: torch.Tensor
    ) -> Tuple[Any, torch.Tensor]:
        self.inputs.add(chunk.start, chunk.stop, x)
        # The kept state sits at this window's start: the previous update kept it at the first later window
        # start, and the next chunk always starts where the schedule expected it.
        hidden = None if self.hidden is None else self.detach(self.hidden)
        next_start = later_starts[0] if later_starts else chunk.stop
        outputs = []
        for a, b in segment_spans(self.state_at, chunk.stop, (chunk.start, next_start)):
            y_pred, hidden = call_model(self.model_fn, self.model, self.inputs.over(a, b), hidden)
            if a >= chunk.start:
                outputs.append(y_pred)
            if b == next_start:
                self.state_at, self.hidden = b, hidden  # kept with its graph; detached where a window starts
        self.inputs.drop_before(next_start)
        y_pred = cat_time(outputs, self.dim)
        loss = self.loss_fn(y_pred, y)
        loss.backward()
        return y_pred, loss


class _Segment(NamedTuple):
    """A retained stretch ``(start, stop]`` of the forward pass: its input state leaf and output state."""

    start: int
    stop: int
    h_in: Optional[Hidden]
    h_out: Hidden


def _grad_leaf(hidden: Optional[Hidden], detach: Callable) -> Optional[Hidden]:
    """A copy of ``hidden`` cut from its graph whose floating tensors collect the state gradient."""
    if hidden is None:
        return None
    leaves, spec = tree_flatten(detach(hidden))
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_(True)
    return tree_unflatten(leaves, spec)


def _float_tensors(hidden: Optional[Hidden]) -> List[torch.Tensor]:
    """The floating tensors of a state, in a fixed order: the ones that carry a state gradient."""
    return [t for t in tree_flatten(hidden)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _take_state_grad(h_in: Optional[Hidden]) -> List[Optional[torch.Tensor]]:
    """The gradient collected on a segment's input state, cleared so that no later update reuses it."""
    grads = []
    for t in _float_tensors(h_in):
        grads.append(t.grad)
        t.grad = None
    return grads


class _ModelFnCall(nn.Module):
    """``model_fn`` as a module, so that ``functional_call`` can run it under substituted parameters."""

    def __init__(self, model: nn.Module, model_fn: ModelFn) -> None:
        super().__init__()
        self.model, self.model_fn = model, model_fn

    def forward(self, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
        return call_model(self.model_fn, self.model, x, hidden)


class RetainWindow:
    """``overlap="retain"``: run every step once and keep the graphs of the last ``k2`` steps.

    A chunk whose graph outlives its optimizer step runs under differentiable clones of the parameters,
    made once per chunk, and is cut into segments at every later window start. An update backpropagates its
    loss, then walks the segments of its window backwards, feeding each segment's input-state gradient into
    the output state of the segment before.

    Args: as :class:`RecomputeWindow`; ``model`` must be an ``nn.Module``.

    Example:
        >>> import torch
        >>> from ignite_tbptt.schedule import plan_chunks
        >>> model, x = torch.nn.RNN(1, 2), torch.ones(4, 1, 1)
        >>> window = RetainWindow(model, lambda p, y: p.pow(2).mean(), default_model_fn, lambda h: h.detach(), 0)
        >>> first, second = plan_chunks(4, k1=2, k2=3)
        >>> _ = window(first, [1], x[:2], x[:2])
        >>> [(s.start, s.stop) for s in window.segments]  # (0, 1] is gone: no later window reaches it
        [(1, 2)]
        >>> y_pred, loss = window(second, [], x[2:], x[2:])  # backprop through (1, 4], no forward re-run
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, model_fn: ModelFn, detach: Callable, dim: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f'overlap="retain" needs an nn.Module model, got {type(model).__name__}')
        self.model, self.loss_fn, self.model_fn, self.detach, self.dim = model, loss_fn, model_fn, detach, dim
        self.call = _ModelFnCall(model, model_fn)
        self.segments: Deque[_Segment] = deque()
        self.hidden: Optional[Hidden] = None

    def reset(self) -> None:
        """Start a fresh stream: no state, no retained graphs."""
        self.segments.clear()
        self.hidden = None

    def __call__(
        self, chunk: Chunk, later_starts: List[int], x: torch.Tensor, y: torch.Tensor
    ) -> Tuple[Any, torch.Tensor]:
        retain = bool(later_starts)  # a later window reaches into this chunk: its graph must survive the step
        chained = retain or chunk.window_start < chunk.start
        forward = self._forward_with_clones() if retain else self.call
        outputs = []
        for a, b in segment_spans(chunk.start, chunk.stop, later_starts):
            if chained:
                h_in = _grad_leaf(self.hidden, self.detach)
            else:
                h_in = None if self.hidden is None else self.detach(self.hidden)
            y_pred, self.hidden = forward(x.narrow(self.dim, a - chunk.start, b - a), h_in)
            self.segments.append(_Segment(a, b, h_in, self.hidden))
            outputs.append(y_pred)
        y_pred = cat_time(outputs, self.dim)
        loss = self.loss_fn(y_pred, y)
        loss.backward(retain_graph=retain)
        if chained:
            self._chain_state_grads(chunk.window_start, retain)
        keep_from = later_starts[0] if later_starts else chunk.stop
        while self.segments and self.segments[0].start < keep_from:
            self.segments.popleft()
        return y_pred, loss

    def _forward_with_clones(self) -> Callable[[torch.Tensor, Optional[Hidden]], Tuple[Any, Hidden]]:
        # The graph saves the clones, never the parameters, so optimizer.step() may change the parameters
        # in place while the graph lives; CloneBackward routes the gradient into the parameters' .grad.
        clones = {name: p.clone() for name, p in self.call.named_parameters()}
        return lambda x, hidden: torch.func.functional_call(self.call, clones, (x, hidden))

    def _chain_state_grads(self, window_start: int, retain: bool) -> None:
        """Backpropagate the state gradient from the newest segment down to the window start.

        A window start that falls inside a segment (only where a stream leaves the k1 grid) is rounded up
        to that segment's end.
        """
        in_window = [s for s in self.segments if s.start >= window_start]
        for seg, prev in zip(in_window[:0:-1], in_window[-2::-1]):
            pairs = [
                (out, grad)
                for out, grad in zip(_float_tensors(prev.h_out), _take_state_grad(seg.h_in))
                if grad is not None and out.requires_grad
            ]
            if not pairs:
                break
            outs, grads = zip(*pairs)
            torch.autograd.backward(list(outs), list(grads), retain_graph=retain)
        for seg in in_window[:1]:
            _take_state_grad(seg.h_in)  # the window start is held constant: drop what it collected
