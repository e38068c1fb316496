"""The chunked evaluator: long sequences run chunk by chunk under ``torch.no_grad()``, updating Ignite metrics.

It shares the trainer's batch format (``(x, y)`` or ``(x, y, sequence_info)``), model protocol, chunk events
and carried state, so a stream is evaluated the way it is trained, with memory bounded by one chunk.
"""

from typing import Any, Callable, Dict, Optional, Union

import torch
from ignite.engine import Engine, _prepare_batch
from ignite.metrics import EpochWise, Loss, Metric
from torch import nn

from ignite_tbptt.amp import amp_context, device_type
from ignite_tbptt.batches import batch_chunks, batch_size_of, chunk_sequence, split_batch
from ignite_tbptt.carry import CarriedState, tbptt_engine
from ignite_tbptt.checks import batch_axis_probe
from ignite_tbptt.events import Tbptt_Events, fire, start_chunk, stop_requested
from ignite_tbptt.handlers import ChunkUpdated
from ignite_tbptt.schedule import batch_plan, check_steps
from ignite_tbptt.sequences import masked_pair
from ignite_tbptt.state import DEFAULT_BATCH_DIM, BatchDims, ResetFn, StateProtocol, detach_state
from ignite_tbptt.window import RecomputeWindow, default_model_fn

__all__ = ["create_supervised_tbptt_evaluator", "supervised_tbptt_evaluation_step"]


def _default_eval_output_transform(x: Any, y: Any, y_pred: Any) -> Any:
    return y_pred, y


def supervised_tbptt_evaluation_step(
    model: nn.Module,
    tbtt_step: int,
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_eval_output_transform,
    carry_state: bool = False,
    amp_mode: Optional[str] = None,
    hidden_batch_dim: BatchDims = DEFAULT_BATCH_DIM,
    burn_in: int = 0,
    reset_hidden: Optional[ResetFn] = None,
) -> Callable[[Engine, Any], Any]:
    """The process function of :func:`create_supervised_tbptt_evaluator`.

    Args:
        model, tbtt_step: as for :func:`create_supervised_tbptt_evaluator`, which documents each argument, and so
            are ``dim``, ``device``, ``non_blocking``, ``prepare_batch``, ``model_fn``, ``output_transform``,
            ``carry_state``, ``amp_mode``, ``hidden_batch_dim``, ``burn_in`` and ``reset_hidden``.

    Example:
        >>> model = torch.nn.GRU(1, 4)
        >>> evaluator = Engine(supervised_tbptt_evaluation_step(model, tbtt_step=10))
    """
    check_steps(tbtt_step, tbtt_step)
    autocast = amp_context(amp_mode, device_type(device, model))
    state = StateProtocol(hidden_batch_dim, reset_hidden)
    window = RecomputeWindow(model, model_fn, detach_state, dim, state)
    stream = CarriedState(window, carry_state, burn_in)

    def evaluate(engine: Engine, batch: Any) -> Any:
        x, y, info, length = split_batch(batch, dim)
        offset = stream.begin_batch(x, dim, info.position if info is not None else None)
        info = stream.mark_burn_in(info, length)
        chunks, later_of, _ = batch_plan(length, offset, tbtt_step, tbtt_step, stream=False)
        model.eval()
        done = 0
        try:
            with torch.no_grad():
                for chunk, later, rows, x_c, y_c in batch_chunks(chunks, later_of, x, y, offset, dim):
                    x_t, y_t = prepare_batch((x_c, y_c), device=device, non_blocking=non_blocking)
                    gates, valid, weight = chunk_sequence(info, rows, chunk, x_t, dim)
                    start_chunk(engine, chunk, len(chunks), weight)
                    if stop_requested(engine):
                        break
                    with autocast():
                        y_pred = window.forward(chunk, later, x_t, gates)
                    if done == 0 and info is not None and info.gated:
                        probe = lambda: batch_axis_probe(model, model_fn, x_t, dim)  # noqa: E731
                        state.check(window.hidden, batch_size_of(x_t, dim), probe)
                    y_pred, y_t = masked_pair(y_pred, y_t, valid, dim)
                    engine.state.output = output_transform(x_t, y_t, y_pred)
                    fire(engine, Tbptt_Events.TIME_ITERATION_COMPLETED)
                    done += 1
                    if stop_requested(engine):
                        break
        finally:  # a stop or an exception inside the batch ends it there
            stream.end_batch(length, complete=done == len(chunks))
        return engine.state.output

    evaluate.carried_state = stream  # type: ignore[attr-defined]
    return evaluate


def create_supervised_tbptt_evaluator(
    model: nn.Module,
    metrics: Optional[Dict[str, Metric]] = None,
    tbtt_step: int = 100,
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_eval_output_transform,
    carry_state: bool = False,
    amp_mode: Optional[str] = None,
    hidden_batch_dim: BatchDims = DEFAULT_BATCH_DIM,
    burn_in: int = 0,
    reset_hidden: Optional[ResetFn] = None,
) -> Engine:
    """Create an evaluator that runs long sequences chunk by chunk, carrying the state, under ``no_grad``.

    Each batch is cut into chunks of ``tbtt_step`` steps along ``dim``; the model runs each chunk from the
    state the previous chunk left (``model(x)`` first, then ``model(x, hidden)``), so the predictions are
    those of one pass over the whole sequence while memory holds one chunk's activations. After every chunk,
    ``engine.state.output = output_transform(x, y, y_pred)`` for that chunk and ``TIME_ITERATION_COMPLETED``
    fires; ``metrics`` are updated there (epoch-wise, after every chunk that scores something), so they
    equal those of a whole-sequence pass. With padded batches (``"lengths"`` or ``"mask"`` in a third batch
    element) ``y_pred`` and ``y`` hold the valid steps only, gathered along the time axis with a batch of one
    (``(N, 1, ...)`` time-first), as the trainer's ``loss_fn`` sees them; per-sample ``"resets"`` start a
    sample afresh as in training. An Ignite ``Loss`` left at its default ``batch_size=len`` weighs each chunk
    by its (step, sample) pairs, ``y.shape[:2].numel()``, so that its value is the mean over all of them.

    Args:
        model: the recurrent model, ``(y_pred, hidden)`` protocol as for the trainer.
        metrics: Ignite metrics by name, updated after every chunk and computed at the end of the run.
        tbtt_step: the chunk length: the most time steps whose activations live at once.
        dim: the time axis of ``x``, ``y`` and ``y_pred``.
        device, non_blocking, prepare_batch: as for Ignite's ``create_supervised_evaluator``, per chunk.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``.
        output_transform: ``output_transform(x, y, y_pred)`` per chunk; the metrics see its result.
        carry_state: carry the state from one batch to the next (a stream in pieces); it starts afresh at
            every run, when the batch size changes (with a warning) and whenever ``reset_state`` runs. As for
            the trainer, a batch that carries its stream position must continue the stream.
        amp_mode: ``"amp"`` runs the model under ``torch.autocast``.
        hidden_batch_dim: the batch axis of the hidden-state tensors, for resets and padding: one int, or a
            structure of ints matching the hidden state, as for the trainer.
        reset_hidden: ``reset_hidden(hidden, keep) -> hidden``, how a sample starts afresh, as for the trainer.
        burn_in: warm-up steps per sample, as for the trainer: they build the state and are left out of the
            metrics.

    Returns:
        an Ignite ``Engine`` with :class:`~ignite_tbptt.events.Tbptt_Events` registered and ``metrics`` attached.

    Example:
        >>> from ignite.metrics import MeanSquaredError
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rnn, self.head = torch.nn.GRU(1, 8), torch.nn.Linear(8, 1)
        ...     def forward(self, x, hidden=None):
        ...         out, hidden = self.rnn(x, hidden)
        ...         return self.head(out), hidden
        >>> evaluator = create_supervised_tbptt_evaluator(
        ...     Net(), metrics={"mse": MeanSquaredError()}, tbtt_step=50,
        ...     output_transform=lambda x, y, y_pred: (y_pred.flatten(0, 1), y.flatten(0, 1)),
        ... )
        >>> x = torch.randn(1000, 4, 1)  # 1,000 steps in 20 chunks
        >>> mse = evaluator.run([(x, x.roll(1, 0))]).metrics["mse"]
    """
    step = supervised_tbptt_evaluation_step(
        model, tbtt_step, dim, device, non_blocking, prepare_batch, model_fn, output_transform, carry_state,
        amp_mode, hidden_batch_dim, burn_in, reset_hidden,
    )
    engine = tbptt_engine(step, carry_state)
    for name, metric in (metrics or {}).items():
        count_pairs_in_loss(metric)
        metric.attach(engine, name, usage=ChunkUpdated(EpochWise(), scored_only=True))
    return engine


def _pairs(y: torch.Tensor) -> int:
    """The (step, sample) pairs of a chunk's targets: ``T * B`` whole, ``N`` masked (``(N, 1)``) or flattened."""
    return y.shape[:2].numel()


def count_pairs_in_loss(metric: Metric) -> None:
    """Make an Ignite ``Loss`` left at its default ``batch_size=len`` weigh each chunk by its (step, sample) pairs.

    ``len(y)`` of a time-first chunk is its number of steps, while a masked chunk's ``(N, 1, ...)`` counts pairs:
    mixed, the epoch's loss would be a biased mean. A ``batch_size`` the user gave is left alone.
    """
    if isinstance(metric, Loss) and metric._batch_size is len:
        metric._batch_size = _pairs
