"""The TBPTT trainer: an Ignite ``Engine`` whose update walks each batch chunk by chunk.

The data flows one way: batch -> chunks (:mod:`ignite_tbptt.schedule`) -> window
(:mod:`ignite_tbptt.window`) -> optimizer step -> chunk events.
"""

import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from ignite.engine import Engine, Events, _prepare_batch
from ignite.utils import apply_to_tensor
from torch import nn

from ignite_tbptt.events import Tbptt_Events, TIME_ITERATION_ATTR, register_tbptt_events
from ignite_tbptt.schedule import Chunk, check_steps, later_window_starts, plan_chunks
from ignite_tbptt.window import RecomputeWindow, RetainWindow, cat_time, default_model_fn

__all__ = ["Tbptt_Events", "create_supervised_tbptt_trainer", "reset_state", "supervised_tbptt_training_step"]

OVERLAP_MODES = {"recompute": RecomputeWindow, "retain": RetainWindow}


def _detach_hidden(hidden: Any) -> Any:
    """Cut a hidden state (a tensor, or tuples, lists, dicts and namedtuples of tensors) from its graph.

    The trainer looks this name up at run time, so tests may patch ``ignite_tbptt.trainer._detach_hidden``.

    >>> h = torch.ones(2, requires_grad=True) * 2
    >>> _detach_hidden((h, [h])).__class__.__name__, _detach_hidden(h).requires_grad
    ('tuple', False)
    """
    return apply_to_tensor(hidden, torch.Tensor.detach)


def _default_output_transform(x: Any, y: Any, y_pred: Any, loss: torch.Tensor) -> float:
    return loss.item()


def split_batch(batch: Any, dim: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Check that ``batch`` is an ``(x, y)`` pair of tensors sharing a time axis ``dim``; return it and ``T``.

    Raises ``TypeError`` or ``ValueError`` naming the problem, before anything runs.

    >>> split_batch((torch.zeros(5, 2), torch.zeros(4, 2)), dim=0)
    Traceback (most recent call last):
    ...
    ValueError: x and y must have the same length along the time axis dim=0, got 5 and 4
    """
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) != 2:
        kind = f"a sequence of length {len(batch)}" if isinstance(batch, Sequence) else type(batch).__name__
        raise TypeError(f"a batch must be an (x, y) pair, got {kind}")
    x, y = batch
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
    return x, y, x.shape[dim]


class CarriedState:
    """Where the trained stream stands: the backprop window (state, inputs or graphs) and the stream position.

    Without ``carry`` every batch starts afresh, as in Ignite. With it, batches continue one stream, and
    the state starts afresh only on :meth:`reset`, which the trainer calls at every epoch start, or when the
    batch size changes (with a warning), since the carried state no longer matches the batch.
    """

    def __init__(self, window: Any, carry: bool) -> None:
        self.window, self.carry = window, carry
        self.reset()

    def reset(self) -> None:
        """Forget the carried state: the next batch starts a fresh stream."""
        self.window.reset()
        self.position, self.batch_size = 0, None

    def begin_batch(self, x: torch.Tensor, dim: int) -> int:
        """Prepare for a batch ``x`` with time axis ``dim``; return its start position in the stream."""
        # Ignite's convention: (time, batch, ...) for dim=0, (batch, time, ...) otherwise.
        batch_size = x.shape[1 if dim == 0 else 0] if x.dim() > 1 else None
        if not self.carry:
            self.reset()
        elif self.batch_size is not None and batch_size != self.batch_size:
            warnings.warn(
                f"carry_state: the batch size changed from {self.batch_size} to {batch_size}; "
                "the carried state does not fit this batch and starts afresh",
                stacklevel=2,
            )
            self.reset()
        self.batch_size = batch_size
        return self.position

    def end_batch(self, length: int) -> None:
        """Move the stream position past a finished batch of ``length`` steps."""
        self.position += length


def reset_state(engine: Engine) -> None:
    """Handler that makes the trainer's next batch start a fresh stream (no carried state or window).

    Example:
        >>> import torch
        >>> from ignite.engine import Events
        >>> model = torch.nn.RNN(1, 1)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=5, carry_state=True
        ... )
        >>> _ = trainer.add_event_handler(Events.ITERATION_STARTED(every=10), reset_state)  # every 10 batches
    """
    engine.carried_state.reset()


def supervised_tbptt_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Union[Callable, nn.Module],
    tbtt_step: int,
    k2: Optional[int] = None,
    overlap: str = "recompute",
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_output_transform,
    carry_state: bool = False,
) -> Callable[[Engine, Any], Any]:
    """The update function of :func:`create_supervised_tbptt_trainer`; see it for the arguments.

    For every chunk of the batch it fires ``TIME_ITERATION_STARTED``, zeroes the gradients, lets the window
    run forward and backward, steps the optimizer and fires ``TIME_ITERATION_COMPLETED`` with the chunk's
    loss in ``engine.state.output`` (a detached tensor: no host sync per chunk). The batch output is
    ``output_transform(x, y, y_pred, loss)`` with ``loss`` the mean of the chunk losses weighted by their
    lengths, and ``y_pred`` the detached predictions over the batch (collected only for a custom
    ``output_transform``). The returned function's ``carried_state`` attribute is its
    :class:`CarriedState`; with ``carry_state=True`` the stream carries over from batch to batch.

    Example:
        >>> from ignite.engine import Engine
        >>> model = torch.nn.RNN(1, 1)
        >>> step = supervised_tbptt_training_step(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=2
        ... )
        >>> trainer = Engine(step)
    """
    k2 = tbtt_step if k2 is None else k2
    check_steps(tbtt_step, k2)
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {sorted(OVERLAP_MODES)}, got {overlap!r}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    # Looked up at call time so that a test can patch the module-level _detach_hidden.
    window = OVERLAP_MODES[overlap](model, loss_fn, model_fn, lambda hidden: _detach_hidden(hidden), dim)
    stream = CarriedState(window, carry_state)
    keep_predictions = output_transform is not _default_output_transform

    def run_chunk(engine: Engine, chunk: Chunk, num_chunks: int, later: List[int], x: Any, y: Any) -> Tuple[Any, Any]:
        x_t, y_t = prepare_batch((x, y), device=device, non_blocking=non_blocking)
        setattr(engine.state, TIME_ITERATION_ATTR, getattr(engine.state, TIME_ITERATION_ATTR) + 1)
        engine.state.chunk, engine.state.num_chunks = chunk, num_chunks
        engine.fire_event(Tbptt_Events.TIME_ITERATION_STARTED)
        model.train()
        optimizer.zero_grad()
        y_pred, loss = window(chunk, later, x_t, y_t)
        optimizer.step()
        engine.state.output = loss.detach()
        engine.fire_event(Tbptt_Events.TIME_ITERATION_COMPLETED)
        return y_pred, engine.state.output

    def update(engine: Engine, batch: Any) -> Any:
        x, y, length = split_batch(batch, dim)
        offset = stream.begin_batch(x, dim)
        chunks = plan_chunks(length, tbtt_step, k2, offset)
        total, predictions = 0, []
        for chunk in chunks:
            later = later_window_starts(chunk, offset + length, tbtt_step, k2, stream=stream.carry)
            x_c, y_c = (t.narrow(dim, chunk.start - offset, chunk.length) for t in (x, y))
            y_pred, loss = run_chunk(engine, chunk, len(chunks), later, x_c, y_c)
            total = total + loss * chunk.length
            if keep_predictions:
                predictions.append(apply_to_tensor(y_pred, torch.Tensor.detach))
        stream.end_batch(length)
        y_pred = cat_time(predictions, dim) if predictions else None
        return output_transform(x, y, y_pred, total / length)

    update.carried_state = stream  # type: ignore[attr-defined]
    return update


def create_supervised_tbptt_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Union[Callable, nn.Module],
    tbtt_step: int,
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    k2: Optional[int] = None,
    overlap: str = "recompute",
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_output_transform,
    carry_state: bool = False,
) -> Engine:
    """Create a trainer for recurrent models with truncated backpropagation through time, TBPTT(k1, k2).

    A drop-in for ``ignite.contrib.engines.create_supervised_tbptt_trainer``: the same arguments, model
    protocol and events. Each batch ``(x, y)`` is cut along ``dim`` into chunks of ``k1 = tbtt_step`` steps
    (the last may be shorter). After every chunk the optimizer steps, with the gradient of that chunk's
    loss backpropagated through the last ``k2`` steps (the chunk and up to ``k2 - k1`` steps before it, see
    ``SPEC.md``). With ``k2 == tbtt_step`` (the default) this is exactly Ignite's trainer.

    Beyond Ignite's trainer:

    - ``k2 > tbtt_step`` with two exact ways to handle the overlap: ``"recompute"`` re-runs the window under
      the current parameters (any model, ``k2 / k1`` times the forward work); ``"retain"`` keeps the graphs
      and runs every step forward once.
    - ``engine.state.time_iteration`` counts chunks, so ``Tbptt_Events.TIME_ITERATION_COMPLETED(every=N)``
      and chunk-level logging work; during chunk events ``engine.state.chunk`` is the running
      :class:`~ignite_tbptt.schedule.Chunk` (index, time span, window start), ``engine.state.num_chunks``
      their count in the batch, and ``engine.state.output`` the chunk's loss as a detached tensor.
    - The batch output is the mean of the chunk losses weighted by chunk length, converted to a float once
      per batch. ``output_transform(x, y, y_pred, loss)`` replaces it, as in ``create_supervised_trainer``.
    - ``model_fn(model, x, hidden)`` adapts models with other call signatures; ``hidden`` is ``None`` on
      the first chunk. The hidden state may be any nesting of tuples, lists, dicts and namedtuples.

    Args:
        model: the recurrent model: ``model(x)`` then ``model(x, hidden)``, returning ``(y_pred, hidden)``.
        optimizer: the optimizer, stepped once per chunk.
        loss_fn: ``loss_fn(y_pred, y)`` over one chunk, returning a scalar tensor.
        tbtt_step: ``k1``, the number of time steps per chunk and optimizer update.
        dim: the time axis of ``x``, ``y`` and ``y_pred``.
        device: where ``prepare_batch`` moves each chunk; the model is not moved.
        non_blocking: passed to ``prepare_batch``.
        prepare_batch: ``prepare_batch((x_chunk, y_chunk), device, non_blocking) -> (x, y)``, called once per
            chunk, so a long sequence can stay on the host and reach the device a chunk at a time.
        k2: how many steps each update backpropagates; ``None`` means ``tbtt_step``.
        overlap: ``"recompute"`` or ``"retain"``: how the ``k2 - k1`` overlap steps are differentiated.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``.
        output_transform: ``output_transform(x, y, y_pred, loss)`` gives ``engine.state.output`` per batch.
        carry_state: carry the hidden state, and for ``k2 > tbtt_step`` the backprop window, from one batch
            to the next, as if the batches were one long stream. The stream starts afresh at every epoch, when
            the batch size changes (with a warning), and whenever the :func:`reset_state` handler runs. The
            carried state is ``engine.carried_state``.

    Returns:
        an Ignite ``Engine`` with :class:`Tbptt_Events` registered.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rnn, self.head = torch.nn.LSTM(1, 8), torch.nn.Linear(8, 1)
        ...     def forward(self, x, hidden=None):
        ...         out, hidden = self.rnn(x, hidden)
        ...         return self.head(out), hidden
        >>> model = Net()
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.Adam(model.parameters()), torch.nn.MSELoss(), tbtt_step=5, k2=10
        ... )
        >>> x = torch.randn(50, 4, 1)  # (time, batch, features)
        >>> state = trainer.run([(x, x.roll(1, 0))], max_epochs=2)
        >>> state.time_iteration
        20
    """
    step = supervised_tbptt_training_step(
        model, optimizer, loss_fn, tbtt_step, k2, overlap, dim, device, non_blocking, prepare_batch,
        model_fn, output_transform, carry_state,
    )
    engine = Engine(step)
    register_tbptt_events(engine)
    engine.carried_state = step.carried_state  # type: ignore[attr-defined]
    if carry_state:
        engine.add_event_handler(Events.EPOCH_STARTED, reset_state)
    return engine
