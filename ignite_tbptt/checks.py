"""A check that a model passes its state on: chunked with the state handed over, it computes what it computes whole.

TBPTT trains a recurrent model one chunk at a time, handing each chunk the state the previous one left. A model
that ignores the state it is given, or part of it, or starts afresh inside ``forward``, still trains, silently,
as a model of one chunk. :func:`check_state_passing` catches these before a run. It tells them apart from a
model that uses all of its state and still computes differently in chunks than whole, because its output
depends on where the sequence is cut into calls (a memory of the last ``M`` steps, as Transformer-XL keeps):
such a model is trained faithfully as it runs in chunks, and the check says so with a warning.
"""

import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt.batches import batch_size_of
from ignite_tbptt.state import DEFAULT_BATCH_DIM, BatchDims, ResetFn, StateProtocol, named_leaves
from ignite_tbptt.window import call_model, default_model_fn

__all__ = ["batch_axis_probe", "check_output_length", "check_state_passing"]


def _time_leaves(out: Any, dim: int) -> List[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dim() > dim]


def check_output_length(y_pred: Any, x: torch.Tensor, dim: int) -> None:
    """A ``ValueError`` naming both lengths if an output of the model does not cover its input chunk's steps.

    The loss of a chunk pairs ``y_pred`` with ``y`` step by step. A model that returns fewer steps than it was
    given (minGRU-pytorch's ``minLM`` keeps only the last token once it is given a state) would fail inside the
    user's loss with a batch-size mismatch, or, with a loss that broadcasts, train on the wrong pairs. Every
    tensor of ``y_pred`` with a time axis ``dim`` must have the chunk's length there.

    >>> check_output_length(torch.zeros(1, 2, 5), torch.zeros(4, 2, 3), dim=0)
    Traceback (most recent call last):
    ...
    ValueError: the model returned an output of 1 time steps (shape (1, 2, 5)) for an input chunk of 4 steps ...
    """
    steps = x.shape[dim]
    for t in _time_leaves(y_pred, dim):
        if t.shape[dim] != steps:
            raise ValueError(
                f"the model returned an output of {t.shape[dim]} time steps (shape {tuple(t.shape)}) for an input "
                f"chunk of {steps} steps (shape {tuple(x.shape)}) along dim={dim}: the loss pairs every output step "
                "with a target step, so the model must return one output per input step (a model that returns only "
                "the last step once it is given a state, as minGRU-pytorch's minLM does, needs a model_fn that "
                "asks it for all of them)"
            )


@torch.no_grad()
def batch_axis_probe(model: Any, model_fn: Callable, x: torch.Tensor, dim: int) -> Tuple[Any, Any]:
    """The states the model returns for ``x`` and for ``x`` with the input of its first sample changed, from a
    fresh start.

    :meth:`~ignite_tbptt.state.StateProtocol.check` reads a leaf's batch axis off them where its size alone
    cannot tell: the axis along which only the first entry moves. The first sample gets noise (or, for token
    ids, the next id, modulo the largest id plus one), so that samples that are all alike (padding) tell too.
    Two calls without gradients, in eval mode (dropout would move every axis), the mode restored.
    """
    changed = x.clone()
    first = changed.select(1 if dim % x.dim() == 0 else 0, 0)
    if x.is_floating_point():
        noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        first.add_(noise.to(x.device, x.dtype) * (first.abs().mean() + 1))
    else:
        first.copy_((first + 1) % (int(x.max()) + 1))
    training = model.training if isinstance(model, nn.Module) else None
    if training:
        model.eval()
    try:
        return tuple(call_model(model_fn, model, xs, None)[1] for xs in (x, changed))
    finally:
        if training:
            model.train()


def _perturbed(hidden: Any, generator: torch.Generator, only: Optional[int] = None) -> Any:
    """``hidden`` with noise added to its floating leaves (to the ``only``-th leaf alone, if given)."""
    leaves, spec = tree_flatten(hidden)

    def shift(i: int, t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or only not in (None, i):
            return t
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, t.dtype)
        return t + noise * (t.abs().mean() + 1)

    return tree_unflatten([shift(i, t) for i, t in enumerate(leaves)], spec)


def _first_difference(whole: torch.Tensor, chunked: torch.Tensor, dim: int, rtol: float, atol: float) -> Optional[int]:
    """The first time step where ``chunked`` differs from ``whole`` beyond the tolerance, or ``None``."""
    bad = ~torch.isclose(chunked, whole, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    steps = bad.movedim(dim, 0).reshape(bad.shape[dim], -1).any(1)
    return int(steps.nonzero()[0])


@torch.no_grad()
def check_state_passing(
    model: nn.Module,
    x: torch.Tensor,
    tbtt_step: int,
    *,
    model_fn: Optional[Callable] = None,
    dim: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    hidden_batch_dim: Optional[BatchDims] = None,
    reset_hidden: Optional[ResetFn] = None,
) -> None:
    """Check that ``model`` chunked by ``tbtt_step`` with its state passed on computes what it computes on ``x`` whole.

    It runs ``x`` whole and chunk by chunk, as the trainer does (``model(x_chunk)`` first, then
    ``model(x_chunk, hidden)``, or ``model_fn(model, x, hidden)``), in eval mode and without gradients, then

    - checks that the outputs depend on the state passed in, and on each of its floating leaves: the second
      chunk run from a perturbed state (or leaf) must give other outputs, else an ``AssertionError`` says
      which state is ignored;
    - compares the outputs step by step. Where the first chunk differs, an ``AssertionError`` names the step:
      the outputs read later steps, which a chunk cuts off (a bidirectional layer's backward direction), and
      TBPTT cannot train the model as it runs whole. Where a later chunk differs although the model uses all
      of its state, its output depends on where the sequence is cut into calls: a ``UserWarning`` names the
      chunk and step and says so, since both overlap modes train such a model as it runs in chunks;
    - with ``hidden_batch_dim`` or ``reset_hidden`` given (the trainer passes its own), checks the state
      protocol of :mod:`ignite_tbptt.state`: every floating leaf has the batch at its axis (an
      ``AssertionError`` otherwise), and a state reset for every sample gives the outputs of a fresh start
      (a ``UserWarning`` otherwise: per-sample resets would start samples elsewhere than a fresh stream does).

    It returns ``None`` for a model that passes its state on. The model's train/eval mode is restored
    afterwards.

    Args:
        model: the recurrent model, in the trainer's ``(y_pred, hidden)`` protocol.
        x: an input with a time axis ``dim`` longer than one chunk.
        tbtt_step: the chunk length.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``, as for the trainer.
        dim: the time axis of ``x`` and of the outputs.
        rtol, atol: the tolerance of the comparison (as ``torch.isclose``).
        hidden_batch_dim: the batch axis of every leaf of the hidden state, as for the trainer; ``None``: not
            checked.
        reset_hidden: how a sample starts afresh, as for the trainer; checked against a fresh start when it or
            ``hidden_batch_dim`` is given.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rnn = torch.nn.GRU(2, 4)
        ...     def forward(self, x, hidden=None):
        ...         return self.rnn(x, hidden)
        >>> check_state_passing(Net(), torch.randn(30, 3, 2), tbtt_step=10)  # passes: returns None
        >>> class Forgetful(Net):
        ...     def forward(self, x, hidden=None):
        ...         return self.rnn(x)  # drops the state it is given
        >>> check_state_passing(Forgetful(), torch.randn(30, 3, 2), tbtt_step=10)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: the state passed in is ignored: chunk 1 gives the same outputs from a perturbed state ...
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor with a time axis, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"x of shape {tuple(x.shape)} has no time axis dim={dim}")
    if isinstance(tbtt_step, bool) or not isinstance(tbtt_step, int) or tbtt_step < 1:
        raise ValueError(f"tbtt_step must be an int >= 1, got {tbtt_step!r}")
    dim = dim % x.dim()
    length = x.shape[dim]
    if length <= tbtt_step:
        raise ValueError(f"x needs more than one chunk: {length} time steps along dim={dim}, tbtt_step={tbtt_step}")
    model_fn = model_fn or default_model_fn
    training = model.training if isinstance(model, nn.Module) else None
    if training:
        model.eval()  # no dropout: both runs must see the same model
    try:
        _check(model, model_fn, x, tbtt_step, dim, length, rtol, atol)
        if hidden_batch_dim is not None or reset_hidden is not None:
            _check_protocol(model, model_fn, x, tbtt_step, dim, StateProtocol(
                DEFAULT_BATCH_DIM if hidden_batch_dim is None else hidden_batch_dim, reset_hidden), rtol, atol)
    finally:
        if training:
            model.train()


def _outputs(model_fn: Callable, model: Any, x: torch.Tensor, hidden: Any, dim: int) -> List[torch.Tensor]:
    y_pred = call_model(model_fn, model, x, hidden)[0]
    try:
        check_output_length(y_pred, x, dim)
    except ValueError as error:
        raise AssertionError(str(error)) from None
    return _time_leaves(y_pred, dim)


def _same(a: List[torch.Tensor], b: List[torch.Tensor], rtol: float, atol: float) -> bool:
    return all(torch.allclose(p, q, rtol=rtol, atol=atol) for p, q in zip(a, b))


def _check(model: Any, model_fn: Callable, x: torch.Tensor, k1: int, dim: int, length: int, rtol: float, atol: float) -> None:
    whole = _outputs(model_fn, model, x, None, dim)
    chunks, hidden, states = [], None, []
    for start in range(0, length, k1):
        states.append(hidden)
        y_pred, hidden = call_model(model_fn, model, x.narrow(dim, start, min(k1, length - start)), hidden)
        chunks.append(_time_leaves(y_pred, dim))
    _check_state_used(model, model_fn, x.narrow(dim, k1, min(k1, length - k1)), states[1], chunks[1], dim)
    for leaf, whole_leaf in enumerate(whole):
        pieces = [c[leaf] for c in chunks]
        for index, (piece, start) in enumerate(zip(pieces, range(0, length, k1))):
            expected = whole_leaf.narrow(dim, start, piece.shape[dim])
            step = _first_difference(expected, piece, dim, rtol, atol)
            if step is None:
                continue
            diff = (piece.narrow(dim, step, 1) - expected.narrow(dim, step, 1)).abs().max().item()
            where = (
                f"chunk {index} (steps {start}..{start + piece.shape[dim] - 1}) differs from the whole sequence first at "
                f"step {start + step}" + (f" of output {leaf}" if len(whole) > 1 else "") + f", by {diff:.3g} "
                f"(rtol={rtol}, atol={atol})"
            )
            if index == 0:  # no state was handed over yet: the outputs read steps after the chunk
                raise AssertionError(
                    f"{where}: its outputs depend on later steps, which a chunk cuts off (a bidirectional layer, or "
                    "attention over the whole sequence?)"
                )
            warnings.warn(
                f"{where}, although the model uses every part of the state it is given: its output depends on where "
                "the sequence is cut into calls (a memory of the last M steps, as Transformer-XL keeps, does). Both "
                "overlap modes train it as it runs in chunks of the same cuts; if it should compute the same in "
                "chunks as whole, the state it returns is not the state at the end of the chunk",
                UserWarning, stacklevel=3,
            )
            return


def _check_state_used(
    model: Any, model_fn: Callable, x1: torch.Tensor, state: Any, outputs: List[torch.Tensor], dim: int
) -> None:
    """An ``AssertionError`` if chunk 1's outputs stay the same from a perturbed state, or a perturbed leaf.

    "The same" means within the run-to-run noise of the model (a repeated call from the same state; zero on a
    CPU), not within ``rtol``: a model ignores a leaf only if nothing of it reaches the outputs. A stabilised
    state (xLSTM's ``n`` and ``m``) may reach them by a factor as small as the forget gate, ``exp(-12)``, and
    is still used. A leaf used that faintly is trained as it is, so the check accepts it.
    """
    generator = torch.Generator().manual_seed(0)
    noise = _distance(outputs, _outputs(model_fn, model, x1, state, dim))
    if _distance(outputs, _outputs(model_fn, model, x1, _perturbed(state, generator), dim)) <= noise:
        raise AssertionError(
            "the state passed in is ignored: chunk 1 gives the same outputs from a perturbed state as from the state "
            "chunk 0 left, so TBPTT would train a model of single chunks; pass the hidden argument on to the "
            "recurrent layer (or adapt the call with model_fn)"
        )
    named = named_leaves(state)
    floating = [i for i, (_, t) in enumerate(named) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for i in floating if len(floating) > 1 else []:
        if _distance(outputs, _outputs(model_fn, model, x1, _perturbed(state, generator, only=i), dim)) <= noise:
            raise AssertionError(
                f"the state leaf {named[i][0]} passed in is ignored: chunk 1 gives the same outputs when only that "
                "leaf is perturbed, so the model starts that part of its state afresh at every chunk; pass it on "
                "(an LSTM's cell state with its hidden state, say)"
            )


def _distance(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """The largest difference between matching outputs, infinite where a non-finite value appears in one only."""
    diffs = [torch.where((p == q) | (p.isnan() & q.isnan()), 0.0, (p - q).abs().nan_to_num(float("inf"))).max()
             for p, q in zip(a, b) if p.numel()]
    return float(max(diffs)) if diffs else 0.0


def _check_protocol(
    model: Any, model_fn: Callable, x: torch.Tensor, k1: int, dim: int, protocol: StateProtocol, rtol: float,
    atol: float,
) -> None:
    """The state's batch axes, and a reset of every sample against a fresh start, over the second chunk."""
    x0, x1 = x.narrow(dim, 0, k1), x.narrow(dim, k1, min(k1, x.shape[dim] - k1))
    state = call_model(model_fn, model, x0, None)[1]
    try:
        protocol.check(state, batch_size_of(x, dim), probe=lambda: batch_axis_probe(model, model_fn, x0, dim))
    except ValueError as error:
        raise AssertionError(str(error)) from None
    if not _same(_outputs(model_fn, model, x1, None, dim), _outputs(model_fn, model, x1, protocol.fresh_like(state), dim), rtol, atol):
        warnings.warn(
            "a reset does not start a sample as a fresh stream does: chunk 1 run from the state reset for every "
            "sample gives other outputs than run from no state. Per-sample resets (document boundaries, "
            "StreamBatches) would start those samples elsewhere; pass reset_hidden=fn(hidden, keep) that gives "
            "the model's fresh state",
            UserWarning, stacklevel=3,
        )
