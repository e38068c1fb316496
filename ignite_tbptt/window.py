"""Autograd mechanics of the backprop window: what one TBPTT(k1, k2) update runs forward and backward.

Two classes implement the two ``overlap`` modes behind two calls:
``window.forward(chunk, later_starts, x_chunk, gates) -> y_pred`` and ``window.backward(loss)``, which leaves
the chunk's gradient in the parameters' ``.grad``. The loss (with any masking or scaling) and the optimizer
step belong to the caller. Scheduling comes from
:mod:`ignite_tbptt.schedule`.

- :class:`RecomputeWindow` keeps the state at the next window's start and the inputs since then, and re-runs
  the window under the current parameters: exact gradient, ``k2 / k1`` times the forward work.
- :class:`RetainWindow` runs every step once and keeps the graphs of the last ``k2`` steps as *segments*
  cut at every window start. An update chains the state gradient back through the segments of its window.
  A retained chunk's forward pass uses differentiable clones of the parameters its state path saves
  (``torch.func.functional_call``), so the retained graphs never alias the live parameters that
  ``optimizer.step()`` changes in place, and the gradient still lands in ``.grad`` through the clone. The
  window keeps nothing else of the parameters: the graphs hold the clones they saved.

With ``k2 == k1`` both reduce to Ignite's trainer: one forward and one backward per chunk, nothing retained.
Under unbiased truncation (:class:`~ignite_tbptt.schedule.ARTBP`) a chunk carries the compensation ``factor`` of
its start: both windows multiply the state gradient by it wherever a backward pass crosses that position.
"""

import contextlib
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from ignite_tbptt.schedule import Chunk, checkpoint_cuts, segment_spans
from ignite_tbptt.sequences import Gate, GateTrack, run_gated
from ignite_tbptt.state import StateProtocol, call_model_checked, detach_state, map_tensors

__all__ = ["default_model_fn", "RecomputeWindow", "RetainWindow"]

Hidden = Any
ModelFn = Callable[[nn.Module, torch.Tensor, Optional[Hidden]], Tuple[Any, Hidden]]


def default_model_fn(model: nn.Module, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
    """Call ``model(x)`` on the first chunk of a sequence and ``model(x, hidden)`` after it, as Ignite does."""
    return model(x) if hidden is None else model(x, hidden)


def call_model(model_fn: ModelFn, model: Any, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
    """Run ``model_fn`` and check that it returned ``(y_pred, hidden)`` and left the ``hidden`` given unchanged."""
    out = call_model_checked(lambda x_, h: model_fn(model, x_, h), x, hidden)
    if type(out) is tuple and len(out) == 2:  # the usual case, checked before the slower Sequence check
        return out
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


class _ScaleGrad(torch.autograd.Function):
    """The identity forward, the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def compensated(hidden: Any, factor: float) -> Any:
    """``hidden`` unchanged, with the gradient that flows back through it multiplied by ``factor``.

    Unbiased truncation (:class:`~ignite_tbptt.schedule.ARTBP`) puts it at every boundary a window crosses.

    >>> h = torch.ones(2, requires_grad=True)
    >>> compensated(h, 4.0).sum().backward()
    >>> h.grad.tolist()
    [4.0, 4.0]
    """
    if factor == 1.0 or hidden is None:
        return hidden
    scale = lambda t: _ScaleGrad.apply(t, factor) if t.requires_grad else t  # noqa: E731
    return map_tensors(scale, hidden)


def run_span(gates: GateTrack, forward: Callable, x: torch.Tensor, hidden: Any, start: int, checkpointed: bool) -> Any:
    """One model call over a span starting at ``start``, under activation checkpointing if asked.

    Checkpointed, the span keeps only its inputs (``x`` and the state) for the backward pass and runs again
    there to rebuild its activations: the trade of Gruslys et al. (2016), memory for recomputation.
    """
    if not checkpointed or not torch.is_grad_enabled():
        return gates.run(forward, x, hidden, start)
    # The gate is looked up now: by the backward pass that re-runs the span, the track has moved on.
    return checkpoint(run_gated, gates.at(start), forward, x, hidden, start, gates.state, use_reentrant=False)


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

    def state_dict(self) -> List[Tuple[int, int, torch.Tensor]]:
        return [(a, b, x.clone()) for a, b, x in self.chunks]  # clone: a chunk may view a whole batch

    def load_state_dict(self, saved: List[Tuple[int, int, torch.Tensor]]) -> None:
        self.chunks = deque((a, b, x) for a, b, x in saved)


#: The tolerance ``(rtol, atol)`` within which ``merging_changes_nothing`` takes two runs as the same, per dtype:
#: torch.testing's defaults, which a fused kernel run in one call or in several stays within.
MERGE_TOLERANCE = {
    torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7),
}


def merging_changes_nothing(
    model: Any, run: Callable[[List[Tuple[int, int]]], Tuple[Any, Hidden]], spans: List[Tuple[int, int]],
    merged: List[Tuple[int, int]],
) -> bool:
    """Whether ``model`` gives the same outputs and final state run over ``merged`` spans as over ``spans``.

    ``run(spans)`` runs a window's steps in one call per span and returns the outputs and the last state (no
    backward pass follows). Both runs go with dropout off (``eval()``, every module's mode restored after), once
    at the current parameters and once at parameters moved by seeded noise (restored bit for bit after), so that a
    model that is cut-dependent only once trained (a zero-initialised attention branch) shows it now. The runs
    agree when every leaf agrees within :data:`MERGE_TOLERANCE` of its dtype. A model with running statistics
    in training mode (batch norm) is cut-dependent whatever the runs say: in training it normalises over each
    call. The global random state is not drawn from.

    >>> lstm = torch.nn.LSTM(1, 2)
    >>> x = torch.randn(6, 1, 1)
    >>> run = lambda spans: (torch.cat([lstm(x[a:b])[0] for a, b in spans]), None)  # each call from a fresh state
    >>> merging_changes_nothing(lstm, run, [(0, 3), (3, 6)], [(0, 6)])
    False
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    if any(m.training and getattr(m, "running_mean", None) is not None for m in modules):
        return False
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        return _alike(run(spans), run(merged)) and _perturbed(model, lambda: _alike(run(spans), run(merged)))
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def _perturbed(model: Any, check: Callable[[], bool]) -> bool:
    """``check()`` with the floating parameters of ``model`` moved by seeded noise (restored exactly after)."""
    if not isinstance(model, nn.Module):
        return True  # nothing to move: the check at the current values stands
    generator = torch.Generator().manual_seed(0)  # not the global generator: the run's draws stay as they were
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_((noise * (0.1 * float(p.abs().mean()) + 0.01)).to(device=p.device, dtype=p.dtype))
        return check()
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def _alike(first: Any, second: Any) -> bool:
    """Whether two nestings of tensors have the same structure, shapes and values within :data:`MERGE_TOLERANCE`."""
    (leaves_a, spec_a), (leaves_b, spec_b) = tree_flatten(first), tree_flatten(second)
    if spec_a != spec_b:
        return False
    for a, b in zip(leaves_a, leaves_b):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False
        elif a.shape != b.shape or a.dtype != b.dtype:
            return False
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                return False
        else:
            rtol, atol = MERGE_TOLERANCE.get(a.dtype, (0.0, 0.0))
            if not torch.allclose(a, b, rtol=rtol, atol=atol):
                return False
    return True


class RecomputeWindow:
    """``overlap="recompute"``: re-run each window ``(w, t]`` from the stored state at ``w``.

    It keeps one state, at the next update's window start as this update's run computed it, and the inputs
    (and sequence gates) from there on: memory is bounded by ``k2``.

    Args:
        model: the recurrent model.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``.
        detach: cuts a hidden state from its graph (``ignite_tbptt.trainer._detach_hidden``).
        dim: the time axis of inputs and outputs.
        state: how the hidden state is reset and held per sample (:class:`~ignite_tbptt.state.StateProtocol`);
            ``None``: zeros, with the batch at axis ``-2`` of every leaf.
        checkpoint_every: run the window in segments of at most this many steps under activation
            checkpointing, so memory holds one state per segment plus one segment's activations instead of
            the whole window's; ``None`` keeps all activations.
        merge_calls: ``True``: re-run a window in as few model calls as its sequence gates allow, instead of in
            the calls the forward pass made (each chunk, cut where a later window starts). The same for a model
            whose output does not depend on where the stream is cut into calls (``nn.RNN``/``GRU``/``LSTM``), and
            faster for fused kernels at small ``k1``; a Transformer-XL memory would compute another forward pass.
            ``False``: always the forward pass's calls. ``None``: find out with ``merging_changes_nothing`` at
            the first window whose calls merging would change, and merge from then on if it changes nothing; the
            answer is then ``merge_calls``. It holds for the window's life: a model is cut-dependent or not
            whatever its mode or dtype.

    Example:
        >>> import torch
        >>> from ignite_tbptt.schedule import plan_chunks
        >>> model, x = torch.nn.RNN(1, 2), torch.ones(4, 1, 1)
        >>> window = RecomputeWindow(model, default_model_fn, lambda h: h.detach(), dim=0)
        >>> first, second = plan_chunks(4, k1=2, k2=3)
        >>> window.backward(window.forward(first, [1], x[:2], []).sum())
        >>> y_pred = window.forward(second, [], x[2:], [])  # re-runs steps (1, 4], returns (2, 4]
        >>> tuple(y_pred.shape)
        (2, 1, 2)
    """

    def __init__(
        self, model: Any, model_fn: ModelFn, detach: Callable, dim: int, state: Optional[StateProtocol] = None,
        checkpoint_every: Optional[int] = None, merge_calls: Optional[bool] = False,
    ) -> None:
        self.model, self.model_fn, self.detach, self.dim = model, model_fn, detach, dim
        self.checkpoint_every, self.merge_calls = checkpoint_every, merge_calls
        self.inputs, self.gates = _Inputs(dim), GateTrack(state or StateProtocol())
        self.factors: Dict[int, float] = {}  # the compensations (ARTBP) at the chunk starts a window may still cross
        self.reset()

    def _call(self, x: torch.Tensor, hidden: Optional[Hidden]) -> Tuple[Any, Hidden]:
        return call_model(self.model_fn, self.model, x, hidden)

    def reset(self) -> None:
        """Start a fresh stream at position 0: no state, no inputs."""
        self.inputs.clear()
        self.gates.clear()
        self.factors.clear()
        self.calls: List[int] = []  # where the forward pass cut the steps a window may still re-run into calls
        self.state_at, self.hidden = 0, None

    def forward(self, chunk: Chunk, later_starts: List[int], x: torch.Tensor, gates: List[Gate]) -> Any:
        """Run the window of ``chunk`` forward; return the predictions over the chunk."""
        self.inputs.add(chunk.start, chunk.stop, x)
        self.gates.add(gates)
        if chunk.factor != 1.0:
            self.factors[chunk.start] = chunk.factor
        # The kept state sits at this window's start: the previous update kept it at the first later window
        # start, moved to the end of a call already made where the schedule's start fell inside one (_on_calls).
        hidden = None if self.hidden is None else self.detach(self.hidden)
        later_starts = self._on_calls(chunk, later_starts)
        next_start = later_starts[0] if later_starts else chunk.stop
        outputs = []
        # The window re-runs in the calls the forward pass made (every chunk, cut where a later window starts), so
        # that a model whose output depends on where it is cut (a memory of the last M steps) runs as it ran;
        # merged, in as few calls as the gates, checkpoints and compensations allow.
        self.calls += [chunk.start, *later_starts]
        window_start = self.state_at
        forced = [
            *self.gates.cuts(window_start, chunk.stop), *checkpoint_cuts(window_start, chunk.stop, self.checkpoint_every),
            *self.factors,
        ]
        spans = segment_spans(window_start, chunk.stop, [*self.calls, *forced])
        merged = segment_spans(window_start, chunk.stop, [chunk.start, next_start, *forced])
        if self.merge_calls is None and merged != spans:
            self.merge_calls = merging_changes_nothing(self.model, self._runner(hidden), spans, merged)
        for a, b in merged if self.merge_calls else spans:
            if a > window_start:  # a crossed boundary; the window's own start is held constant
                hidden = compensated(hidden, self.factors.get(a, 1.0))
            y_pred, hidden = run_span(self.gates, self._call, self.inputs.over(a, b), hidden, a, bool(self.checkpoint_every))
            if a >= chunk.start:
                outputs.append(y_pred)
            if b == next_start:
                self.state_at, self.hidden = b, hidden  # kept with its graph; detached where a window starts
        self.inputs.drop_before(next_start)
        self.gates.drop_before(next_start)
        self.factors = {j: f for j, f in self.factors.items() if j > next_start}
        self.calls = [j for j in self.calls if j > next_start]
        return cat_time(outputs, self.dim)

    def _on_calls(self, chunk: Chunk, later_starts: List[int]) -> List[int]:
        """``later_starts`` with each start before ``chunk`` that falls inside a call the forward pass made moved to
        that call's end (docs/contract.md, "Carried state"), as :class:`RetainWindow` starts a window at a segment's.

        Such a start was not foreseen when its call ran: a batch whose length is not a multiple of ``k1`` moved the
        chunk grid of the batches after it. A state there would be a cut the forward pass never made.
        """
        made = sorted({self.state_at, *self.calls, chunk.start})
        return sorted({p if p >= chunk.start else next(c for c in made if c >= p) for p in later_starts})

    def _runner(self, hidden: Optional[Hidden]) -> Callable[[List[Tuple[int, int]]], Tuple[Any, Hidden]]:
        """A function running the kept inputs over given spans from ``hidden``: the outputs over them and the last
        state, cut from their graph (what ``merging_changes_nothing`` compares).

        It runs as the training forward pass does, gradients on and checkpointed where asked, so that a model
        whose kernel without gradients differs (SRU's takes float32 only) runs the code it trains with; the
        graph is freed at once, never backpropagated.
        """

        def run(spans: List[Tuple[int, int]]) -> Tuple[Any, Hidden]:
            state, outputs = hidden, []
            with torch.enable_grad():
                for a, b in spans:
                    y_pred, state = run_span(self.gates, self._call, self.inputs.over(a, b), state, a,
                                             bool(self.checkpoint_every))
                    outputs.append(y_pred)
            return detach_state(cat_time(outputs, self.dim)), detach_state(state)

        return run

    def backward(self, loss: Optional[torch.Tensor]) -> None:
        """Backpropagate the chunk's (scaled) loss through the window; ``None``: nothing to learn from."""
        if loss is not None:
            loss.backward()

    def state_at_stop(self) -> Optional[Hidden]:
        """The state after the last step run forward, cut from its graph (``None`` on a fresh stream).

        The window keeps the state at the next window start; where that lies before the last step, the kept
        inputs run on from it, under ``torch.no_grad()``, in the calls the forward pass made.
        """
        hidden = None if self.hidden is None else self.detach(self.hidden)
        stop = self.inputs.chunks[-1][1] if self.inputs.chunks else self.state_at
        if stop > self.state_at:
            with torch.no_grad():
                cuts = [*self.calls, *self.gates.cuts(self.state_at, stop)]
                for a, b in segment_spans(self.state_at, stop, cuts):
                    hidden = run_span(self.gates, self._call, self.inputs.over(a, b), hidden, a, False)[1]
        return detach_state(hidden)

    def state_dict(self) -> Dict[str, Any]:
        """The kept state, inputs and gates, cut from any graph: enough to continue the stream exactly."""
        return {
            "state_at": self.state_at,
            "hidden": detach_state(self.hidden),
            "inputs": self.inputs.state_dict(),
            "gates": self.gates.state_dict(),
            "factors": dict(self.factors),
            "calls": list(self.calls),
        }

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.state_at, self.hidden = saved["state_at"], saved["hidden"]
        self.inputs.load_state_dict(saved["inputs"])
        self.gates.load_state_dict(saved["gates"])
        self.factors = dict(saved.get("factors", {}))
        self.calls = list(saved.get("calls", [a for a, _, _ in self.inputs.chunks]))


Params = Dict[str, torch.Tensor]


class _Segment(NamedTuple):
    """A retained stretch ``(start, stop]`` of the forward pass: its input state leaf, output state, inputs,
    the parameter clones it keeps (only under activation checkpointing, whose re-runs read them; else the graph
    keeps what it saved, and nothing more), the floating tensors of both states, flattened once here rather
    than by every window that chains through it, and the compensation (ARTBP) by which the state gradient is
    multiplied on its way out of the segment's start into the segment before, and whether a chunk starts there."""

    start: int
    stop: int
    h_in: Optional[Hidden]
    h_out: Hidden
    x: torch.Tensor
    params: Optional[Params]
    in_leaves: List[torch.Tensor]
    out_leaves: List[torch.Tensor]
    factor: float = 1.0
    opens_chunk: bool = False  # it starts where a chunk starts: a boundary the monitor reports


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


def _take_state_grad(leaves: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The gradient collected on a segment's input state, cleared so that no later update reuses it."""
    grads = []
    for t in leaves:
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


@contextlib.contextmanager
def keeping_compiled_graphs() -> Iterator[None]:
    """Backward passes through graphs that are backpropagated again later, also where the model is compiled.

    ``torch.compile`` compiles a model's backward on its first call and lets it reuse ("donate") its saved
    buffers, which fails the next backward pass through the same retained graph ("compiled with non-empty
    donated buffers"). Backward functions compiled inside this block keep their buffers. It sets
    ``torch._functorch.config.donated_buffer`` for the block only (a plain attribute: 3 us, where
    ``config.patch`` takes 17) and restores the user's value after; nothing changes outside the trainer.
    """
    config = _functorch_config()
    if config is None:
        yield
        return
    old = config.donated_buffer
    config.donated_buffer = False
    try:
        yield
    finally:
        config.donated_buffer = old


def _functorch_config() -> Any:
    try:
        import torch._functorch.config as config
    except ImportError:  # a torch without it compiles nothing that donates
        return None
    return config if hasattr(config, "donated_buffer") else None


class _Pending(NamedTuple):
    """What :meth:`RetainWindow.backward` needs to know about the chunk that just ran forward."""

    window_start: int
    retain: bool
    chained: bool
    keep_from: int


class RetainWindow:
    """``overlap="retain"``: run every step once and keep the graphs of the last ``k2`` steps.

    A chunk whose graph outlives its optimizer step runs under differentiable clones of the parameters its
    state path saves (learnt from the first such chunk), made once per chunk, and is cut into segments at
    every later window start. An update backpropagates its
    loss, then walks the segments of its window backwards, feeding each segment's input-state gradient into
    the output state of the segment before.

    Args: as :class:`RecomputeWindow`; ``model`` must be an ``nn.Module``. ``monitor``: after every backward pass
    that chains through the window, ``state_grad_norms`` holds the norm of the state gradient at every chunk
    start the pass reached (:meth:`_chain_state_grads`), at no extra backward work.

    Example:
        >>> import torch
        >>> from ignite_tbptt.schedule import plan_chunks
        >>> model, x = torch.nn.RNN(1, 2), torch.ones(4, 1, 1)
        >>> window = RetainWindow(model, default_model_fn, lambda h: h.detach(), dim=0)
        >>> first, second = plan_chunks(4, k1=2, k2=3)
        >>> window.backward(window.forward(first, [1], x[:2], []).sum())
        >>> [(s.start, s.stop) for s in window.segments]  # (0, 1] is gone: no later window reaches it
        [(1, 2)]
        >>> window.backward(window.forward(second, [], x[2:], []).sum())  # through (1, 4], no re-run
    """

    def __init__(
        self, model: nn.Module, model_fn: ModelFn, detach: Callable, dim: int, state: Optional[StateProtocol] = None,
        checkpoint_every: Optional[int] = None, monitor: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f'overlap="retain" needs an nn.Module model, got {type(model).__name__}; overlap="recompute" runs any '
                "callable"
            )
        self.model, self.model_fn, self.detach, self.dim = model, model_fn, detach, dim
        self.checkpoint_every, self.monitor = checkpoint_every, monitor
        self.state_grad_norms: Optional[torch.Tensor] = None  # with monitor: the latest update's, newest first
        self.call = _ModelFnCall(model, model_fn)
        self.gates = GateTrack(state or StateProtocol())
        self.segments: Deque[_Segment] = deque()
        # The parameters a retained graph saves on the state path, learnt from the first retained chunk that runs
        # from a state (None: not yet; clone them all). Under checkpointing all are cloned: re-runs read them all.
        self.saved_params: Optional[List[str]] = None
        self.params_checked = False
        self.reset()

    def reset(self) -> None:
        """Start a fresh stream: no state, no retained graphs."""
        self.segments.clear()
        self.gates.clear()
        self.hidden: Optional[Hidden] = None
        self.pending: Optional[_Pending] = None

    def forward(self, chunk: Chunk, later_starts: List[int], x: torch.Tensor, gates: List[Gate]) -> Any:
        """Run the chunk forward once, as retained segments; return its predictions."""
        self.gates.add(gates)
        retain = bool(later_starts)  # a later window reaches into this chunk: its graph must survive the step
        chained = retain or chunk.window_start < chunk.start
        params = self._clones(from_state=self.hidden is not None) if retain else None
        outputs, segments = [], []
        for a, b in segment_spans(chunk.start, chunk.stop, later_starts):
            if chained:
                h_in = _grad_leaf(self.hidden, self.detach)
            else:
                h_in = None if self.hidden is None else self.detach(self.hidden)
            segment = self._run_segment(a, b, x.narrow(self.dim, a - chunk.start, b - a), h_in, params, outputs)
            if a == chunk.start:
                segment = segment._replace(factor=chunk.factor, opens_chunk=True)
            segments.append(segment)
            self.hidden = segment.h_out
        self.segments.extend(segments)
        if retain and not self.params_checked:  # once, before the first update: the step would break the graph
            _check_no_live_parameter_saved(self.call, segments)
            self.params_checked = True
        # Learnt from a plain chunk: every segment runs from a state that takes a gradient, and no gate is in force.
        # A model run from no state saves less (no weight that only the state gradient needs), and so does one
        # whose state a gate cuts (burn-in), holds (padding) or runs without a graph: learnt there, the set would
        # leave out a parameter that later chunks save.
        learn = retain and self.saved_params is None and not self.checkpoint_every and not self.gates.gates
        if learn and all(seg.in_leaves and all(t.requires_grad for t in seg.out_leaves) for seg in segments):
            self.saved_params = _saved_clones(params, segments)
        self.pending = _Pending(chunk.window_start, retain, chained, later_starts[0] if later_starts else chunk.stop)
        return cat_time(outputs, self.dim)

    def backward(self, loss: Optional[torch.Tensor]) -> None:
        """Backpropagate the chunk's (scaled) loss through its window, then forget what no window needs."""
        window_start, retain, chained, keep_from = self.pending
        if self.monitor:
            self.state_grad_norms = None
        if loss is not None:
            with keeping_compiled_graphs():  # a compiled backward may be compiled on its first call
                loss.backward(retain_graph=retain)
                if chained:
                    self._chain_state_grads(window_start, retain)
        while self.segments and self.segments[0].start < keep_from:
            self.segments.popleft()
        self.gates.drop_before(keep_from)

    def _run_segment(
        self, a: int, b: int, x: torch.Tensor, h_in: Optional[Hidden], params: Optional[Params], outputs: List[Any]
    ) -> _Segment:
        """Run ``(a, b]`` from ``h_in`` (cut further where a sequence gate changes or a checkpointed segment
        ends), collecting outputs."""
        forward, hidden = self._forward(params), h_in
        cuts = [*self.gates.cuts(a, b), *checkpoint_cuts(a, b, self.checkpoint_every)]
        for c, d in segment_spans(a, b, cuts):
            x_span = x.narrow(self.dim, c - a, d - c)
            y_pred, hidden = run_span(self.gates, forward, x_span, hidden, c, bool(self.checkpoint_every))
            outputs.append(y_pred)
        # Without checkpointing the segment holds no clones: the state path's graph keeps those it saved (the
        # recurrent weights), and the rest (an embedding's, a decoder's) die with the chunk's forward and loss.
        kept = params if self.checkpoint_every else None
        return _Segment(a, b, h_in, hidden, x, kept, _float_tensors(h_in), _float_tensors(hidden))

    def _clones(self, from_state: bool = True) -> Params:
        """Clones of the parameters a retained graph saves (all, until the first retained chunk tells, and all
        for a chunk that starts from no state: the same call every time, so a compiled model compiles it once).

        The graph saves the clones, never the parameters, so optimizer.step() may change the parameters in
        place while the graph lives; CloneBackward routes the gradient into the parameters' .grad. The other
        parameters run as they are: their values at this chunk live on in what the graph saved from them (an
        embedding's output, say), and their own graph (a decoder's) is gone before the step. A model that saves
        another parameter on its state path in a later chunk only fails loudly, at that backward pass ("modified
        by an inplace operation"), never silently.
        """
        names = self.saved_params if from_state else None
        return {name: p.clone() for name, p in self.call.named_parameters() if names is None or name in names}

    def _forward(self, params: Optional[Params]) -> Callable[[torch.Tensor, Optional[Hidden]], Tuple[Any, Hidden]]:
        if params is None:
            return self.call
        return lambda x, hidden: torch.func.functional_call(self.call, params, (x, hidden))

    def _chain_state_grads(self, window_start: int, retain: bool) -> None:
        """Backpropagate the state gradient from the newest segment down to the window start.

        A window start that falls inside a segment (only where a stream leaves the k1 grid) is rounded up
        to that segment's end.

        With ``monitor``, the state gradient each segment that opens a chunk collected (the window start's too,
        held constant and dropped) is measured on the way: ``state_grad_norms[j]``, the norm over the batch and
        every floating leaf of the state, at the ``j``-th chunk start back from the update's chunk (``j = 0``: its
        own start). The norms stay on the device, one small reduction per boundary and no host read.
        """
        in_window = [s for s in self.segments if s.start >= window_start]
        norms: List[torch.Tensor] = []
        for seg, prev in zip(in_window[:0:-1], in_window[-2::-1]):
            pairs = [
                (out, grad if seg.factor == 1.0 else grad * seg.factor)
                for out, grad in zip(prev.out_leaves, self._take_state_grad(seg, norms))
                if grad is not None and out.requires_grad
            ]
            if not pairs:  # nothing reached this segment's input (it ran without a graph: burn-in or padding for
                continue  # every sample); older segments may still have a gradient of their own, from the loss
            outs, grads = zip(*pairs)
            torch.autograd.backward(list(outs), list(grads), retain_graph=retain)
        for seg in in_window[:1]:
            self._take_state_grad(seg, norms)  # the window start is held constant: drop what it collected
        if self.monitor and norms:
            self.state_grad_norms = torch.stack(norms)

    def _take_state_grad(self, seg: _Segment, norms: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """The state gradient ``seg`` collected (cleared), its norm appended to ``norms`` where monitored."""
        grads = _take_state_grad(seg.in_leaves)
        present = [g for g in grads if g is not None]
        if self.monitor and seg.opens_chunk and present:
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present])))
        return grads

    def state_dict(self) -> Dict[str, Any]:
        """The retained segments as inputs, input states and what their graphs saved (graphs cannot be saved).

        ``load_state_dict`` rebuilds each graph by running its segment again and giving it the saved
        tensors of the original (the activations and parameter versions its backward pass reads), so a resumed
        run backpropagates through exactly what the interrupted one would have. Under activation checkpointing
        the segments keep their parameter versions instead, and run again under them.
        """
        versions: List[Params] = []
        index: Dict[int, int] = {}
        segments = []
        for seg in self.segments:
            version, saved = None, None
            if seg.params is not None:
                if id(seg.params) not in index:
                    index[id(seg.params)] = len(versions)
                    versions.append(detach_state(seg.params))
                version = index[id(seg.params)]
            else:
                saved = [detach_state(t) for _, t in saved_tensors(seg.out_leaves)]
            segments.append((seg.start, seg.stop, detach_state(seg.h_in), seg.x.clone(), version, saved, seg.factor))
        return {"hidden": detach_state(self.hidden), "segments": segments, "versions": versions, "gates": self.gates.state_dict(),
                "chunk_starts": [seg.start for seg in self.segments if seg.opens_chunk]}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.reset()
        self.gates.load_state_dict(saved["gates"])
        live = dict(self.call.named_parameters())
        # Old values, with the gradient flowing into the live parameters as it would through a clone.
        versions = [{n: v + (live[n] - live[n].detach()) for n, v in version.items()} for version in saved["versions"]]
        chunk_starts = set(saved.get("chunk_starts", ()))
        for start, stop, h_in, x, version, tensors, factor in saved["segments"]:
            params = self._clones(from_state=h_in is not None) if version is None else versions[version]
            segment = self._run_segment(start, stop, x, _grad_leaf(h_in, self.detach), params, [])
            if tensors is not None:
                restore_saved_tensors(segment.out_leaves, tensors)
            self.segments.append(segment._replace(factor=factor, opens_chunk=start in chunk_starts))
        self.hidden = saved["hidden"]

    def state_at_stop(self) -> Optional[Hidden]:
        """The state after the last step run forward, cut from its graph (``None`` on a fresh stream)."""
        return None if self.hidden is None else detach_state(self.hidden)


def _check_no_live_parameter_saved(call: nn.Module, segments: List[_Segment]) -> None:
    """A ``ValueError`` naming the parameters that the retained graphs saved themselves instead of their clones.

    ``functional_call`` replaces a module's registered parameters only; a model that reads a parameter from
    somewhere else (ncps' LTC keeps them in a plain dict as well) runs on the live tensor, which the graph then
    saves, and the optimizer's in-place step would break at the next backward pass through it.
    """
    live = {p.untyped_storage().data_ptr(): name for name, p in call.named_parameters() if p.requires_grad}
    saved = {v.untyped_storage().data_ptr() for seg in segments for _, v in saved_tensors(seg.out_leaves)}
    names = sorted(live[ptr].split(".", 1)[1] for ptr in saved if ptr in live)  # without _ModelFnCall's "model."
    if names:
        raise ValueError(
            f'overlap="retain" cannot train this model: its graph saved the live parameters {names}, not the copies '
            "torch.func.functional_call puts in their place (the model reads them from somewhere other than its "
            "registered attributes, as ncps' LTC does from a plain dict), so the optimizer step would change them "
            'under the graphs a later window backpropagates through. overlap="recompute" trains it exactly'
        )


def _saved_clones(params: Params, segments: List[_Segment]) -> List[str]:
    """The names of the clones in ``params`` that the state path of ``segments`` saved for its backward pass."""
    storages = {v.untyped_storage().data_ptr() for seg in segments for _, v in saved_tensors(seg.out_leaves)}
    return [name for name, clone in params.items() if clone.untyped_storage().data_ptr() in storages]


def _graph_nodes(roots: List[torch.Tensor]) -> List[Any]:
    """The autograd nodes that ``roots`` backpropagate through, in a fixed order (depth first)."""
    order, seen = [], set()
    stack = [t.grad_fn for t in reversed(roots) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(fn for fn, _ in reversed(node.next_functions) if fn is not None)
    return order


def saved_tensors(roots: List[torch.Tensor]) -> List[Tuple[Any, Any]]:
    """Every tensor the backward pass from ``roots`` reads, as ``(raw saved tensor, value)``, in a fixed order.

    Autograd exposes each node's saved tensors as ``_saved_<name>`` (``saved_tensors`` for custom and compiled
    Functions) and the slots that hold them as ``_raw_saved_<name>``; a slot may hold a list. Empty slots are
    left out.
    """
    out = []
    for node in _graph_nodes(roots):
        for attr in sorted(a for a in dir(node) if a.startswith("_raw_saved_")):
            name = attr[len("_raw_saved_"):]
            # built-in nodes name the values _saved_<name>; custom and compiled Functions saved_tensors
            values = getattr(node, "_saved_" + name) if hasattr(node, "_saved_" + name) else getattr(node, "saved_" + name)
            raws = getattr(node, attr)
            if not isinstance(raws, (list, tuple)):
                raws, values = [raws], [values]
            out += [(raw, value) for raw, value in zip(raws, values) if isinstance(value, torch.Tensor)]
    return out


def restore_saved_tensors(roots: List[torch.Tensor], tensors: List[torch.Tensor]) -> None:
    """Make the graph behind ``roots`` read ``tensors`` (from :func:`saved_tensors` of an identical graph)."""
    slots = saved_tensors(roots)
    if len(slots) != len(tensors) or any(v.shape != t.shape for (_, v), t in zip(slots, tensors)):
        raise ValueError(
            "a retained segment of the saved window does not rebuild to the graph it was saved from (the model "
            "runs differently now); load the checkpoint with the model and model_fn it was saved with"
        )
    for (raw, value), tensor in zip(slots, tensors):
        raw.register_hooks(lambda _: None, lambda _, t=tensor.to(value.device): t)
