"""Loss reporting and progress for the TBPTT trainer, chunk by chunk.

The trainer fires :class:`~ignite_tbptt.events.Tbptt_Events` around every time chunk of a batch, with the
chunk's loss as a detached tensor in ``engine.state.output`` and the number of loss terms it averages in
``engine.state.chunk_weight``. This module turns those into:

- :class:`TbpttLoss`, a metric: the training loss averaged over time steps, i.e. the chunk losses weighted by
  ``chunk_weight``, reported per chunk, per batch, per epoch or as a running value, through Ignite's
  ``MetricUsage`` mechanism (:class:`ChunkWise`, :class:`ChunkedBatchWise`, :class:`ChunkedEpochWise`,
  :class:`ChunkUpdated`);
- :class:`ChunkProgressBar`, a tqdm bar that advances per chunk.

Both accumulate on the device and read the loss back to the host only when a value is reported, never once
per chunk. Loggers and ``Checkpoint`` attached to a chunk event take its counter
``engine.state.time_iteration`` as their global step: by default for loggers (the event is registered with
that attribute), and with ``global_step_transform=global_step_from_engine(trainer)`` for ``Checkpoint``.
"""

import time
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import (
    BatchWise,
    EpochWise,
    MetricUsage,
    reinit__is_reduced,
    RunningBatchWise,
    RunningEpochWise,
    SingleEpochRunningBatchWise,
    sync_all_reduce,
)

from ignite_tbptt.events import Tbptt_Events

__all__ = [
    "ChunkProgressBar",
    "ChunkUpdated",
    "ChunkWise",
    "ChunkedBatchWise",
    "ChunkedEpochWise",
    "TbpttLoss",
]

Weight = Union[int, float, torch.Tensor]

# Ignite's built-in usages by name; each one updates at ``ITERATION_COMPLETED``, once per batch.
_IGNITE_USAGES: Dict[str, Type[MetricUsage]] = {
    cls.usage_name: cls
    for cls in (EpochWise, RunningEpochWise, BatchWise, RunningBatchWise, SingleEpochRunningBatchWise)
}


# ----------------------------------------------------------------------------------------------------------
# Weighted chunk losses
# ----------------------------------------------------------------------------------------------------------


def chunk_weight(engine: Engine) -> Weight:
    """The weight of the running chunk's loss: how many loss terms it averages (``engine.state.chunk_weight``).

    >>> from types import SimpleNamespace
    >>> chunk_weight(SimpleNamespace(state=SimpleNamespace(chunk_weight=12)))
    12
    """
    try:
        return engine.state.chunk_weight
    except AttributeError:
        raise AttributeError(
            "engine.state.chunk_weight is missing: chunk losses can only be weighted during the chunk events "
            "of a trainer made by ignite_tbptt.create_supervised_tbptt_trainer"
        ) from None


def weighted_loss(loss: Any, weight: Weight, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``loss * weight`` as a 0-dim tensor on the loss' device, without reading anything back to the host.

    A chunk of weight 0 (fully padded) contributes exactly 0, even when its loss is NaN (a mean over no
    terms), so it counts nothing.

    >>> weighted_loss(torch.tensor(0.5), 4), weighted_loss(torch.tensor(float("nan")), 0)
    (tensor(2., dtype=torch.float64), tensor(0., dtype=torch.float64))
    >>> weighted_loss(torch.tensor(float("nan")), torch.tensor(0))
    tensor(0., dtype=torch.float64)
    """
    loss = torch.as_tensor(loss).detach().to(dtype)
    if isinstance(weight, torch.Tensor):
        weight = weight.to(loss.device)
        return torch.where(weight > 0, loss * weight, torch.zeros_like(loss))
    return loss * weight if weight else torch.zeros_like(loss)


def is_chunk_completion(engine: Engine) -> bool:
    """Whether ``engine`` is firing ``TIME_ITERATION_COMPLETED`` now, or is a stand-in without events.

    ``RunningAverage(src)`` wires ``src``'s update to ``Events.ITERATION_COMPLETED`` (ignite 0.5), where
    ``engine.state.output`` is the batch's output, not a chunk loss: chunk metrics skip such calls.

    >>> from types import SimpleNamespace
    >>> is_chunk_completion(SimpleNamespace(last_event_name=Events.ITERATION_COMPLETED))
    False
    """
    event = getattr(engine, "last_event_name", None)
    return event is None or event == Tbptt_Events.TIME_ITERATION_COMPLETED


# ----------------------------------------------------------------------------------------------------------
# Metric usages: when a chunk metric resets, updates and reports
# ----------------------------------------------------------------------------------------------------------


def _starts_block_of(every: int) -> Callable[[Engine, int], bool]:
    """An event filter true on chunks 1, every + 1, 2 * every + 1, ...: the first chunk of each block."""

    def first_of_block(engine: Engine, time_iteration: int) -> bool:
        return (time_iteration - 1) % every == 0

    return first_of_block


class ChunkWise(MetricUsage):
    """Chunk-wise usage: reset at a chunk's start, update and report at its end.

    With ``every=N`` the metric covers blocks of ``N`` consecutive chunks (which may span batches), and
    reports at the last chunk of each block, on ``Tbptt_Events.TIME_ITERATION_COMPLETED(every=N)``: a
    handler on that same event logs it, and the loss is read back to the host once per ``N`` chunks.

    Args:
        every: the chunks in each block the metric covers (1: every chunk on its own).

    Attributes:
        usage_name: ``"chunk_wise"``

    >>> usage = ChunkWise(every=10)
    >>> usage.STARTED.name, usage.ITERATION_COMPLETED.name, usage.COMPLETED.name
    ('TBPTT_TIME_ITERATION_STARTED', 'TBPTT_TIME_ITERATION_COMPLETED', 'TBPTT_TIME_ITERATION_COMPLETED')
    """

    usage_name: str = "chunk_wise"

    def __init__(self, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if every == 1:
            started, completed = Tbptt_Events.TIME_ITERATION_STARTED, Tbptt_Events.TIME_ITERATION_COMPLETED
        else:
            started = Tbptt_Events.TIME_ITERATION_STARTED(event_filter=_starts_block_of(every))
            completed = Tbptt_Events.TIME_ITERATION_COMPLETED(every=every)
        super().__init__(started, completed, iteration_completed=Tbptt_Events.TIME_ITERATION_COMPLETED)
        self.every = every


def _ignite_usage(usage: Union[str, MetricUsage]) -> MetricUsage:
    """Ignite's usage named ``usage``, or ``usage`` itself."""
    if isinstance(usage, MetricUsage):
        return usage
    if usage not in _IGNITE_USAGES:
        names = [ChunkWise.usage_name, *_IGNITE_USAGES]
        raise ValueError(f"usage must be a MetricUsage or one of {names}, got {usage!r}")
    return _IGNITE_USAGES[usage]()


def _scores_something(engine: Engine, _: int) -> bool:
    return engine.state.chunk_weight > 0


class ChunkUpdated(MetricUsage):
    """Another usage's reset and report events, with an update after every chunk instead of every batch.

    ``ChunkUpdated(BatchWise())`` is :class:`ChunkedBatchWise`, ``ChunkUpdated(EpochWise())``
    :class:`ChunkedEpochWise`; ``ChunkUpdated("single_epoch_running_batch_wise")`` is the mean over the
    epoch so far, reported after every batch (as in Keras' progress line), and
    ``ChunkUpdated(RunningBatchWise())`` gives ``RunningAverage(output_transform=...)`` an exponential average
    over chunks, reported after every batch.

    Args:
        usage: a ``MetricUsage`` or the name of one of Ignite's (``"epoch_wise"``, ``"batch_wise"``,
            ``"running_batch_wise"``, ``"single_epoch_running_batch_wise"``, ``"running_epoch_wise"``).
        scored_only: update only after chunks that score something (``state.chunk_weight > 0``), as the
            chunked evaluator's metrics do.

    >>> usage = ChunkUpdated("running_batch_wise")
    >>> usage.usage_name, usage.STARTED.name, usage.ITERATION_COMPLETED.name, usage.COMPLETED.name
    ('running_batch_wise', 'STARTED', 'TBPTT_TIME_ITERATION_COMPLETED', 'ITERATION_COMPLETED')
    """

    def __init__(self, usage: Union[str, MetricUsage], scored_only: bool = False) -> None:
        usage = _ignite_usage(usage)
        update = Tbptt_Events.TIME_ITERATION_COMPLETED
        if scored_only:  # a chunk of padding or burn-in only gives a metric no pairs: an empty update is NaN
            update = update(event_filter=_scores_something)
        super().__init__(started=usage.STARTED, completed=usage.COMPLETED, iteration_completed=update)
        self.usage_name = getattr(usage, "usage_name", type(usage).__name__)


class ChunkedBatchWise(ChunkUpdated):
    """Batch-wise usage of a chunk metric: reset at ``ITERATION_STARTED``, update after every chunk, report at
    ``ITERATION_COMPLETED``: the loss of each batch, weighted over its time steps.

    >>> ChunkedBatchWise().COMPLETED.name
    'ITERATION_COMPLETED'
    """

    usage_name: str = BatchWise.usage_name

    def __init__(self) -> None:
        super().__init__(BatchWise())


class ChunkedEpochWise(ChunkUpdated):
    """Epoch-wise usage of a chunk metric (the default): reset at ``EPOCH_STARTED``, update after every chunk,
    report at ``EPOCH_COMPLETED``: the training loss of the epoch, over all its time steps.

    >>> ChunkedEpochWise().COMPLETED.name
    'EPOCH_COMPLETED'
    """

    usage_name: str = EpochWise.usage_name

    def __init__(self) -> None:
        super().__init__(EpochWise())


def chunk_usage(usage: Union[str, MetricUsage]) -> MetricUsage:
    """The usage that a chunk metric attaches with: Ignite's built-in usages and their names become their
    chunk-updated versions, ``"chunk_wise"`` is :class:`ChunkWise`, and any other ``MetricUsage`` is kept.

    >>> from ignite.metrics import BatchWise
    >>> type(chunk_usage(BatchWise())).__name__, type(chunk_usage("chunk_wise")).__name__
    ('ChunkUpdated', 'ChunkWise')
    """
    if usage == ChunkWise.usage_name:
        return ChunkWise()
    if isinstance(usage, str) or type(usage) in _IGNITE_USAGES.values():
        return ChunkUpdated(usage)
    if not isinstance(usage, MetricUsage):
        raise TypeError(f"usage must be a MetricUsage or a str, got {type(usage).__name__}")
    return usage


# ----------------------------------------------------------------------------------------------------------
# The loss metric
# ----------------------------------------------------------------------------------------------------------


def _identity(x: Any) -> Any:
    return x


class TbpttLoss(Metric):
    """The training loss of a TBPTT trainer averaged over time steps: the chunk losses weighted by
    ``engine.state.chunk_weight``, the number of loss terms each one averages.

    It updates after every chunk (``Tbptt_Events.TIME_ITERATION_COMPLETED``) with the detached chunk loss,
    adding to two tensors on the loss' device; only :meth:`compute` reads them back to the host, so reporting
    per epoch costs one host sync per epoch, not one per chunk. Under ``ignite.distributed`` the sums are
    all-reduced before the division. A chunk of weight 0 counts nothing; a report with no weight at all is NaN.

    ``attach(engine, name, usage)`` takes :class:`ChunkWise` (per chunk, or per block of ``N`` chunks),
    :class:`ChunkedBatchWise`, :class:`ChunkedEpochWise` (default), any :class:`ChunkUpdated`, their names
    (``"chunk_wise"``, ``"batch_wise"``, ``"epoch_wise"``, ``"running_batch_wise"``,
    ``"single_epoch_running_batch_wise"``, ``"running_epoch_wise"``) or Ignite's usage objects, which it
    turns into their chunk-updated versions.

    With ``ignite.metrics.RunningAverage``: ``RunningAverage(src)`` updates ``src`` once per batch (at
    ``Events.ITERATION_COMPLETED``, which this metric skips), so feed it the chunks yourself::

        loss = TbpttLoss()
        trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, loss.iteration_completed)
        RunningAverage(loss, alpha=0.9).attach(trainer, "smooth_loss")  # EMA of the batch losses

    or average the chunk losses themselves (unweighted, so a short last chunk counts as much as a full one)::

        RunningAverage(output_transform=lambda loss: loss, device=device).attach(
            trainer, "smooth_loss", usage=ChunkUpdated(RunningBatchWise()))

    Args:
        output_transform: turns the chunk's ``engine.state.output`` (its detached loss) into the loss.
        device: where to accumulate; ``None`` (default) follows the loss, so nothing is copied per chunk.

    Example:
        Log the mean loss of every block of 2 chunks, and report the epoch's loss:

        >>> import torch
        >>> from ignite_tbptt import create_supervised_tbptt_trainer, Tbptt_Events
        >>> model = torch.nn.RNN(1, 1)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=4)
        >>> TbpttLoss().attach(trainer, "loss")                          # epoch-wise
        >>> TbpttLoss().attach(trainer, "loss_2", usage=ChunkWise(every=2))
        >>> @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED(every=2))
        ... def log(engine):
        ...     print(engine.state.time_iteration, isinstance(engine.state.metrics["loss_2"], float))
        >>> x = torch.randn(10, 3, 1)                                     # chunks of 4, 4 and 2 steps
        >>> state = trainer.run([(x, x)], max_epochs=2)
        2 True
        4 True
        6 True
        >>> abs(state.metrics["loss"] - state.output) < 1e-6              # one batch: its loss
        True
    """

    required_output_keys = None
    _state_dict_all_req_keys = ("_sum", "_weight", "_num_chunks")

    def __init__(self, output_transform: Callable = _identity, device: Optional[Union[str, torch.device]] = None):
        self._follows_loss = device is None
        device = torch.device("cpu") if device is None else device
        super().__init__(output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=self._double_dtype, device=self._device)
        self._weight = torch.zeros((), dtype=self._double_dtype, device=self._device)
        self._num_chunks = 0

    def _on_loss_device(self, loss: torch.Tensor) -> torch.Tensor:
        """Bring the loss and the sums to one device, without a copy per chunk once the device is known."""
        if loss.device == self._device:
            return loss
        if not self._follows_loss:
            return loss.to(self._device)
        self._device = loss.device  # the next resets start there
        self._sum, self._weight = self._sum.to(loss.device), self._weight.to(loss.device)
        return loss

    @reinit__is_reduced
    def update(self, output: Tuple[Any, Weight]) -> None:
        """Add one chunk: ``output`` is ``(loss, weight)``."""
        loss, weight = output
        if not isinstance(loss, torch.Tensor):
            loss = torch.as_tensor(loss, device=self._device)
        loss = self._on_loss_device(loss)
        self._sum += weighted_loss(loss, weight, self._double_dtype)
        self._weight += weight.to(self._device) if isinstance(weight, torch.Tensor) else weight
        self._num_chunks += 1

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Update with the chunk that just completed; skipped outside ``TIME_ITERATION_COMPLETED``."""
        if is_chunk_completion(engine):
            self.update((self._output_transform(engine.state.output), chunk_weight(engine)))

    @sync_all_reduce("_sum", "_weight", "_num_chunks")
    def compute(self) -> float:
        """The weighted mean loss, read back to the host in one transfer."""
        if self._num_chunks == 0:
            raise NotComputableError(
                "TbpttLoss has seen no chunk: it updates at Tbptt_Events.TIME_ITERATION_COMPLETED; as the source of "
                "RunningAverage, add trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, "
                "loss.iteration_completed)"
            )
        total, weight = torch.stack((self._sum, self._weight)).tolist()
        return total / weight if weight else float("nan")

    def attach(self, engine: Engine, name: str, usage: Union[str, MetricUsage] = ChunkedEpochWise()) -> None:
        """Attach to ``engine`` under ``name``, reset and reported as ``usage`` says, updated per chunk."""
        super().attach(engine, name, chunk_usage(usage))

    def detach(self, engine: Engine, usage: Union[str, MetricUsage] = ChunkedEpochWise()) -> None:
        """Detach the ``usage`` given to :meth:`attach`."""
        super().detach(engine, chunk_usage(usage))

    def is_attached(self, engine: Engine, usage: Union[str, MetricUsage] = ChunkedEpochWise()) -> bool:
        """Whether this metric reports to ``engine`` with ``usage``."""
        return super().is_attached(engine, chunk_usage(usage))


# ----------------------------------------------------------------------------------------------------------
# The progress bar
# ----------------------------------------------------------------------------------------------------------


def _import_tqdm() -> Callable:
    """tqdm's notebook-or-terminal bar; tqdm is an optional dependency, needed only for the progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ModuleNotFoundError(
            "ChunkProgressBar needs tqdm, which is not installed: pip install tqdm", name="tqdm"
        ) from e
    return tqdm


def _set_total(bar: Any, total: Optional[int]) -> None:
    """Change a bar's total; a notebook bar also keeps it in its widget."""
    bar.total = total
    widget = getattr(bar, "container", None)  # tqdm.notebook: (label, progress, text)
    if widget is not None and total:
        widget.children[1].max = total


def _batch_position(engine: Engine) -> str:
    """``"b/n"``: the batch within the epoch and the epoch's length (``"b"`` if the length is unknown)."""
    length = engine.state.epoch_length
    if not length:
        return str(engine.state.iteration)
    return f"{(engine.state.iteration - 1) % length + 1}/{length}"


class ChunkProgressBar:
    """A tqdm progress bar that advances per chunk, one bar per epoch.

    Ignite's ``ProgressBar`` advances per batch and cannot attach to custom events. This bar counts the
    chunks of the epoch (its total is estimated from the number of chunks of the running batch), shows the
    epoch in its description and, as its postfix, the batch within the epoch and the mean loss of the epoch
    so far, weighted as in :class:`TbpttLoss` (the bar ends on the epoch's training loss). It redraws every
    ``every`` chunks and at most every ``mininterval`` seconds, and reads the loss back to the host only when
    it redraws. It closes at the end of each epoch, on ``engine.terminate()`` and on an exception; in a
    notebook (``tqdm.auto``) a bar stopped by an exception stays red.

    Args:
        persist: keep each epoch's bar on screen once it is done.
        desc: the description, followed by ``[epoch/max_epochs]`` when there is more than one epoch.
        tqdm_kwargs: passed to tqdm (``file``, ``ncols``, ``bar_format``, ...); ``mininterval`` (default 0.1 s)
            is the least time between redraws.

    Raises:
        ModuleNotFoundError: when tqdm is not installed (``pip install tqdm``).

    Example:
        >>> import io, torch
        >>> from ignite_tbptt import create_supervised_tbptt_trainer
        >>> model = torch.nn.RNN(1, 1)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=4)
        >>> out = io.StringIO()                            # default: the terminal, or a notebook widget
        >>> bar = ChunkProgressBar(persist=True, file=out, bar_format="{desc}: {n_fmt}/{total_fmt} chunks")
        >>> bar.attach(trainer, every=2)
        >>> x = torch.randn(10, 3, 1)                      # 3 chunks per batch
        >>> state = trainer.run([(x, x)] * 2, max_epochs=1)
        >>> print(out.getvalue().split("\\r")[-1].strip())
        Epoch: 6/6 chunks
    """

    def __init__(self, persist: bool = False, desc: str = "Epoch", **tqdm_kwargs: Any) -> None:
        self._tqdm = _import_tqdm()
        self.persist, self.desc = persist, desc
        self.mininterval = tqdm_kwargs.pop("mininterval", 0.1)
        self.tqdm_kwargs = tqdm_kwargs
        self.bar: Any = None
        self.every, self.output_transform = 1, _identity
        self._start_epoch()

    def attach(self, engine: Engine, output_transform: Optional[Callable] = None, every: int = 1) -> None:
        """Show ``engine``'s chunks.

        Args:
            engine: a trainer from :func:`~ignite_tbptt.create_supervised_tbptt_trainer`.
            output_transform: turns a chunk's ``engine.state.output`` (its detached loss) into the loss shown.
            every: redraw at most once every ``every`` chunks.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every, self.output_transform = every, output_transform or _identity
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_batch_started)
        engine.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED, self._on_chunk_started)
        engine.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, self._on_chunk_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)
        engine.add_event_handler(Events.TERMINATE, self._finish)
        engine.add_event_handler(Events.COMPLETED, self._finish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def log_message(self, message: str) -> None:
        """Print ``message`` above the bar without breaking it (``print`` would split the bar's line)."""
        self._tqdm.write(message, file=self.tqdm_kwargs.get("file"))

    def close(self) -> None:
        """Close the bar as it stands (idempotent)."""
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    # Per-epoch state -------------------------------------------------------------------------------------

    def _start_epoch(self) -> None:
        self.close()
        self._chunks = 0  # chunks completed this epoch; the bar shows them when it redraws
        self._loss_sum: Any = 0.0
        self._loss_weight: Any = 0
        self._new_batch = False
        self._last_draw = float("-inf")

    def _mean_loss(self) -> Optional[float]:
        """The epoch's mean loss so far, or ``None`` without weight: the one host sync of a redraw."""
        total, weight = self._loss_sum, self._loss_weight
        if isinstance(weight, torch.Tensor):
            total, weight = torch.stack((torch.as_tensor(total, device=weight.device), weight.to(total.dtype))).tolist()
        elif weight:
            total = float(total)
        return total / weight if weight else None

    def _draw(self, engine: Engine) -> None:
        loss = self._mean_loss()
        postfix = f"batch={_batch_position(engine)}" + ("" if loss is None else f", loss={loss:.4g}")
        self.bar.set_postfix_str(postfix, refresh=False)
        if self._chunks > self.bar.n:
            self.bar.update(self._chunks - self.bar.n)  # draws: the bar's own throttling is off
        else:
            self.bar.refresh()
        self._last_draw = time.perf_counter()

    # Handlers --------------------------------------------------------------------------------------------

    def _on_epoch_started(self, engine: Engine) -> None:
        self._start_epoch()

    def _on_batch_started(self, engine: Engine) -> None:
        self._new_batch = True

    def _on_chunk_started(self, engine: Engine) -> None:
        if not self._new_batch and self.bar is not None:
            return
        self._new_batch = False
        length = engine.state.epoch_length
        batches_left = length - (engine.state.iteration - 1) % length if length else None
        total = self._chunks + batches_left * engine.state.num_chunks if batches_left else None
        if self.bar is None:
            desc = self.desc
            if engine.state.max_epochs and engine.state.max_epochs > 1:
                desc = f"{desc} [{engine.state.epoch}/{engine.state.max_epochs}]"
            self.bar = self._tqdm(
                total=total, desc=desc, leave=self.persist, mininterval=0, miniters=0, unit="chunk", **self.tqdm_kwargs
            )
        elif total != self.bar.total:
            _set_total(self.bar, total)

    def _on_chunk_completed(self, engine: Engine) -> None:
        self._chunks += 1
        weight = chunk_weight(engine)
        self._loss_sum = self._loss_sum + weighted_loss(self.output_transform(engine.state.output), weight)
        self._loss_weight = self._loss_weight + weight
        due = self._chunks - self.bar.n >= self.every
        if due and time.perf_counter() - self._last_draw >= self.mininterval:
            self._draw(engine)

    def _finish(self, engine: Engine) -> None:
        """Show the last chunks and the final loss, complete the bar and close it."""
        if self.bar is None:
            return
        _set_total(self.bar, self._chunks)
        if self._chunks > self.bar.n:  # else the last frame is current; closing redraws it with the total
            self._draw(engine)
        self.close()

    def _on_exception(self, engine: Engine, e: BaseException) -> None:
        """Close the bar as it stands; re-raise unless another handler of ``EXCEPTION_RAISED`` decides.

        Ignite re-raises an exception only when no handler listens to ``EXCEPTION_RAISED``, so a bar that
        listens must re-raise to leave the run's behaviour unchanged.
        """
        self.close()
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
            raise e
