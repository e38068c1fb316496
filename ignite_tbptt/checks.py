"""A check that a model passes its state on: chunked with the state handed over, it computes what it computes whole.

TBPTT trains a recurrent model one chunk at a time, handing each chunk the state the previous one left. A model
that ignores the state it is given, or starts afresh inside ``forward``, still trains, silently, as a model
of one chunk. :func:`check_state_passing` catches both before a run.
"""

from typing import Any, Callable, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ignite_tbptt.window import call_model, default_model_fn

__all__ = ["check_state_passing"]


def _time_leaves(out: Any, dim: int) -> List[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dim() > dim]


def _perturbed(hidden: Any, generator: torch.Generator) -> Any:
    def shift(t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, t.dtype)
        return t + noise * (t.abs().mean() + 1)

    return tree_map(shift, hidden)


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
) -> None:
    """Check that ``model`` chunked by ``tbtt_step`` with its state passed on computes what it computes on ``x`` whole.

    It runs ``x`` whole and chunk by chunk, as the trainer does (``model(x_chunk)`` first, then
    ``model(x_chunk, hidden)``, or ``model_fn(model, x, hidden)``), in eval mode and without gradients, then

    - checks that the outputs depend on the state passed in: the second chunk run from a perturbed state must
      give other outputs, else an ``AssertionError`` says the state passed in is ignored;
    - compares the outputs step by step: an ``AssertionError`` names the first chunk and time step where they
      differ beyond ``rtol`` and ``atol``, and by how much.

    It returns ``None`` for a model that passes its state on. A model whose output legitimately depends on
    future steps fails by design: a bidirectional layer's backward direction reads the rest of the sequence,
    which a chunk cuts off, so it differs at the first chunk's last steps, and TBPTT cannot train it as it runs
    whole. The model's train/eval mode is restored afterwards.

    Args:
        model: the recurrent model, in the trainer's ``(y_pred, hidden)`` protocol.
        x: an input with a time axis ``dim`` longer than one chunk.
        tbtt_step: the chunk length.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``, as for the trainer.
        dim: the time axis of ``x`` and of the outputs.
        rtol, atol: the tolerance of the comparison (as ``torch.isclose``).

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
    finally:
        if training:
            model.train()


def _check(model: Any, model_fn: Callable, x: torch.Tensor, k1: int, dim: int, length: int, rtol: float, atol: float) -> None:
    whole = _time_leaves(call_model(model_fn, model, x, None)[0], dim)
    chunks, hidden, states = [], None, []
    for start in range(0, length, k1):
        states.append(hidden)
        y_pred, hidden = call_model(model_fn, model, x.narrow(dim, start, min(k1, length - start)), hidden)
        chunks.append(_time_leaves(y_pred, dim))
    # Does the second chunk depend on the state it is given?
    x1 = x.narrow(dim, k1, min(k1, length - k1))
    shifted = _time_leaves(call_model(model_fn, model, x1, _perturbed(states[1], torch.Generator().manual_seed(0)))[0], dim)
    if all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(chunks[1], shifted)):
        raise AssertionError(
            "the state passed in is ignored: chunk 1 gives the same outputs from a perturbed state as from the state "
            "chunk 0 left, so TBPTT would train a model of single chunks; pass the hidden argument on to the "
            "recurrent layer (or adapt the call with model_fn)"
        )
    for leaf, whole_leaf in enumerate(whole):
        pieces = [c[leaf] for c in chunks]
        for index, (piece, start) in enumerate(zip(pieces, range(0, length, k1))):
            expected = whole_leaf.narrow(dim, start, piece.shape[dim])
            step = _first_difference(expected, piece, dim, rtol, atol)
            if step is not None:
                at = start + step
                diff = (piece.narrow(dim, step, 1) - expected.narrow(dim, step, 1)).abs().max().item()
                if index == 0:  # no state was handed over yet: the outputs read steps after the chunk
                    why = ("its outputs depend on later steps, which a chunk cuts off (a bidirectional layer, or "
                           "attention over the whole sequence?)")
                else:
                    why = "the model does not continue from the state it is given" + (
                        " (it starts afresh at every chunk?)" if step == 0 else "")
                raise AssertionError(
                    f"chunk {index} (steps {start}..{start + piece.shape[dim] - 1}) differs from the whole sequence "
                    f"first at step {at}" + (f" of output {leaf}" if len(whole) > 1 else "") + f", by {diff:.3g} "
                    f"(rtol={rtol}, atol={atol}): {why}"
                )
