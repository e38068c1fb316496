"""Carried state and the engines that save it: where the trained stream stands between batches.

:class:`CarriedState` holds the backprop window and the stream position; the engine classes put it in
``state_dict()``, so that ``Checkpoint`` keeps it and a resumed run continues the stream exactly.
:func:`tbptt_engine` builds the trainer's and the evaluator's engine around a step function.
"""

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
from ignite.engine import DeterministicEngine, Engine, Events
from ignite.engine.deterministic import ReproducibleBatchSampler, _get_rng_states, _set_rng_states, update_dataloader
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler
from torch.utils.data.dataloader import _DatasetKind

from ignite_tbptt.batches import batch_size_of
from ignite_tbptt.schedule import Chunk, Reach, Truncations
from ignite_tbptt.sequences import BurnIn, SequenceInfo, burn_in_marks
from ignite_tbptt.events import as_ours, register_tbptt_events
from ignite_tbptt.lifecycle import (
    OPTIONS_KEY, check_options, continue_after_exception, loadable_rng_states, refuse_mid_batch, restored_rng_states,
    start_afresh,
)

__all__ = ["CARRIED_STATE_KEY", "CHUNK_LENGTHS_KEY", "TRUNCATION_DRAWS_KEY", "CarriedState", "DeterministicTbpttEngine", "TbpttEngine", "reset_state", "tbptt_engine"]

#: The key of the carried stream in the trainer's ``state_dict()``.
CARRIED_STATE_KEY = "tbptt_carried_state"
#: The key of the random chunk lengths' draws in the trainer's ``state_dict()``.
CHUNK_LENGTHS_KEY = "tbptt_chunk_lengths"
#: The key of the random truncations' draws (``k2=ARTBP(...)``) in the trainer's ``state_dict()``.
TRUNCATION_DRAWS_KEY = "tbptt_truncation_draws"
#: The key of a ``deterministic=True`` run's seed in the trainer's ``state_dict()``.
SEED_KEY = "tbptt_seed"


def check_burn_in(burn_in: Any) -> int:
    """``burn_in`` as an int >= 0, or a ``TypeError``/``ValueError`` that names it."""
    if isinstance(burn_in, bool) or not isinstance(burn_in, int):
        raise TypeError(f"burn_in must be an int >= 0, got {type(burn_in).__name__} ({burn_in!r})")
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    return burn_in


class CarriedState:
    """Where the trained stream stands: the backprop window (state, inputs or graphs) and the stream position.

    Without ``carry`` every batch starts afresh, as in Ignite. With it, batches continue one stream, and
    the state starts afresh only on :meth:`reset`, which the trainer calls at every epoch start, or when the
    batch size changes (with a warning), since the carried state no longer matches the batch. It is saved
    in the engine's ``state_dict()``, so a run resumed from a checkpoint continues the stream exactly.
    """

    def __init__(self, window: Any, carry: bool, burn_in: int = 0) -> None:
        self.window, self.carry, self.burn_in = window, carry, check_burn_in(burn_in)
        self.trained_to: Optional[int] = None  # where the running batch's last chunk trained so far ends
        self.reset()

    @property
    def hidden(self) -> Any:
        """The model's state after the last step of the stream so far, cut from any graph; ``None`` for a fresh
        stream. After an evaluator has scored a text with ``carry_state=True``, generation continues from it:

        >>> import torch
        >>> from ignite_tbptt import create_supervised_tbptt_evaluator
        >>> rnn = torch.nn.GRU(1, 3)
        >>> evaluator = create_supervised_tbptt_evaluator(rnn, tbtt_step=4, carry_state=True)
        >>> x = torch.randn(10, 2, 1)
        >>> _ = evaluator.run([(x, x)])
        >>> torch.allclose(evaluator.carried_state.hidden, rnn(x)[1])
        True
        """
        return self.window.state_at_stop()

    def reset(self, data_position: Optional[int] = None) -> None:
        """Forget the carried state: the next batch starts a fresh stream.

        ``data_position``: where in its data the next batch must start, if it carries its position (``0`` at an
        epoch start: a stream starts at its beginning); ``None``: anywhere.
        """
        self.window.reset()
        self.position, self.batch_size = 0, None
        self.data_position = data_position  # where the data's next batch must start, if its batches say
        self.burn: Optional[BurnIn] = None  # each sample's burn-in so far (None: a fresh stream)
        self.truncations: Optional[Truncations] = None  # random truncations so far (k2=ARTBP; None: a fresh stream)
        self.reach: Optional[Reach] = None  # what the previous batch provided for this one's windows (k2=AdaptiveK2)

    def mark_burn_in(self, info: Optional[SequenceInfo], length: int) -> Optional[SequenceInfo]:
        """The batch's sequence information with its burn-in steps and cuts (``burn_in > 0``), carried on."""
        if not self.burn_in:
            return info
        info = info or SequenceInfo(None, None)
        warm, cut, self.burn = burn_in_marks(info.valid, info.resets, length, self.batch_size, self.burn_in, self.burn)
        return info._replace(warm=warm, cut=cut)

    def begin_batch(self, x: torch.Tensor, dim: int, data_position: Optional[int] = None) -> int:
        """Prepare for a batch ``x`` with time axis ``dim``; return its start position in the stream.

        ``data_position`` is the batch's first step in the data's stream (sequence info ``"position"``), if the
        batch carries it. Carrying state, a batch that does not start where the previous one stopped raises a
        ``ValueError`` before anything runs.
        """
        batch_size = batch_size_of(x, dim)
        if not self.carry:
            self.reset()
        elif self.batch_size is not None and batch_size != self.batch_size:
            warnings.warn(
                f"carry_state: the batch size changed from {self.batch_size} to {batch_size}; "
                "the carried state does not fit this batch and starts afresh",
                stacklevel=2,
            )
            self.reset()
        elif self.position == 0 and None not in (data_position, self.data_position) and data_position != self.data_position:
            raise ValueError(
                f"carry_state: the epoch's first batch starts at step {data_position} of its stream, not at its "
                "beginning: the carried state would start afresh in the middle of a document. An epoch_length "
                "shorter than the data continues the data mid-stream; give each epoch the whole data (epoch_length="
                "len(batches)), or resume a run from a checkpoint of its trainer"
            )
        elif None not in (data_position, self.data_position) and data_position != self.data_position:
            raise ValueError(
                f"carry_state: this batch starts at step {data_position} of its stream, but the carried state "
                f"stands at step {self.data_position}: a skipped, repeated or reordered batch would carry the state "
                "across unrelated steps. Feed the batches in order (an epoch_length longer than the data restarts "
                "it mid-epoch), or run reset_state first"
            )
        self.batch_size, self.data_position, self.trained_to = batch_size, data_position, None
        return self.position

    def chunk_trained(self, chunk: Chunk) -> None:
        """Record that ``chunk`` has trained: its update is made (or skipped, as its own check decided).

        Called before the chunk's ``TIME_ITERATION_COMPLETED`` handlers, so that an exception there, after the
        batch's last update, leaves a complete batch, as ``terminate()`` at the same point does.
        """
        self.trained_to = chunk.stop

    def batch_complete(self, chunks: List[Chunk]) -> bool:
        """Whether every chunk of the batch (``chunks``, as planned) has trained."""
        return bool(chunks) and self.trained_to == chunks[-1].stop

    def end_batch(self, length: int, complete: bool = True) -> None:
        """Move the stream position past a finished batch of ``length`` steps.

        A batch stopped inside (``complete=False``) leaves the state inside the batch, where the next batch does
        not start: the next batch starts a fresh stream rather than continue from the wrong step.
        """
        if not complete:
            self.reset()
            return
        self.position += length
        if self.data_position is not None:
            self.data_position += length

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The stream position and window, or ``None`` when nothing carries over to the next batch."""
        if not self.carry:
            return None
        return {
            "position": self.position, "batch_size": self.batch_size, "data_position": self.data_position,
            "burn_in": None if self.burn is None else tuple(self.burn), "window": self.window.state_dict(),
            "truncations": None if self.truncations is None else tuple(self.truncations),
            "reach": None if self.reach is None else tuple(self.reach),
        }

    def load_state_dict(self, saved: Optional[Dict[str, Any]]) -> None:
        self.reset()
        if saved is not None and self.carry:
            self.position, self.batch_size = saved["position"], saved["batch_size"]
            self.data_position = saved.get("data_position")
            self.burn = None if saved.get("burn_in") is None else BurnIn(*saved["burn_in"])
            truncations = saved.get("truncations")
            self.truncations = None if truncations is None else Truncations(truncations[0], tuple(truncations[1]))
            self.reach = None if saved.get("reach") is None else Reach(*saved["reach"])
            self.window.load_state_dict(saved["window"])


class _CarriedStateEngineMixin:
    """Saves ``engine.carried_state`` in ``state_dict()`` (so ``Checkpoint`` keeps it) and restores it, and the
    state of the schedule's random draws (``engine.draws``: random chunk lengths, random truncations, each under
    its key), so a resumed run draws on; refuses a checkpoint inside a batch, or one saved under other options
    (``engine.options``); and lets ``run()`` continue after an exception (:mod:`ignite_tbptt.lifecycle`)."""

    carried_state: CarriedState
    draws: Dict[str, Any] = {}
    options: Dict[str, Any] = {}

    def __init__(self, process_function: Callable) -> None:
        self._in_batch = False  # the process function is running: a state_dict() now would be mid-batch
        self._stopped_data: Any = None  # the data of the run an exception stopped (None: no such run)

        def process(engine: Engine, batch: Any) -> Any:
            self._in_batch = True
            try:
                return process_function(engine, batch)
            finally:
                self._in_batch = False

        super().__init__(process)  # type: ignore[call-arg]

    # Handlers registered with Ignite's own Tbptt_Events go to ours (see ignite_tbptt.events.Tbptt_Events).
    def add_event_handler(self, event_name: Any, handler: Callable, *args: Any, **kwargs: Any) -> Any:
        return super().add_event_handler(as_ours(event_name), handler, *args, **kwargs)  # type: ignore[misc]

    def has_event_handler(self, handler: Callable, event_name: Any = None) -> bool:
        return super().has_event_handler(handler, as_ours(event_name))  # type: ignore[misc]

    def remove_event_handler(self, handler: Callable, event_name: Any) -> None:
        super().remove_event_handler(handler, as_ours(event_name))  # type: ignore[misc]

    def run(self, data: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._stopped_data is not None and data is not self._stopped_data:
            start_afresh(self)  # type: ignore[arg-type]
        self._stopped_data = None
        try:
            return super().run(data, *args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._stopped_data = data
            self._resume_after_exception()
            raise

    def _resume_after_exception(self) -> None:
        continue_after_exception(self)  # type: ignore[arg-type]

    def state_dict(self) -> "OrderedDict[str, Any]":
        if self._in_batch:
            refuse_mid_batch(self)  # type: ignore[arg-type]
        saved = super().state_dict()  # type: ignore[misc]
        if self.last_event_name == Events.ITERATION_STARTED and saved["iteration"]:  # type: ignore[attr-defined]
            saved["iteration"] -= 1  # Ignite counts the batch before it trains: a resume must train it
        saved[CARRIED_STATE_KEY] = self.carried_state.state_dict()
        for key, draws in self.draws.items():
            saved[key] = draws.state_dict()
        saved[OPTIONS_KEY] = dict(self.options)
        return saved

    def load_state_dict(self, state_dict: Mapping) -> None:
        state_dict = dict(state_dict)
        check_options(state_dict.pop(OPTIONS_KEY, None), self.options)
        carried = state_dict.pop(CARRIED_STATE_KEY, None)
        saved_draws = {key: state_dict.pop(key, None) for key in self.draws}
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._stopped_data = None
        self.carried_state.load_state_dict(carried)
        for key, draws in self.draws.items():
            if saved_draws[key] is not None:
                draws.load_state_dict(saved_draws[key])


class TbpttEngine(_CarriedStateEngineMixin, Engine):
    """The trainer's ``Engine``: Ignite's, with the carried stream in ``state_dict()``, and two differences.

    - A run resumed mid-epoch (``load_state_dict``, or ``run()`` again after an exception) continues the data
      where it stopped: Ignite's plain engine would iterate the data from its first batch again and train the
      epoch's first batches a second time. It skips the batches already trained, as ``DeterministicEngine``
      does, so the restored stream continues exactly where the data are the same on every pass.
    - ``run()`` again after an exception continues the run (Ignite 0.5 keeps the failed run's generator, and
      its next ``run()`` returns ``None`` without training). A batch that an exception stopped inside ends
      as a stopped batch does (the carried stream starts afresh, the half-accumulated gradient is dropped).
    """

    def _setup_engine(self) -> None:
        super()._setup_engine()
        if self._init_iter:  # mid-epoch, resumed: skip to the batch after the last one trained
            length = self._get_data_length(self.state.dataloader)
            for _ in range(self.state.iteration % length if length else self._init_iter):
                next(self._dataloader_iter)


class DeterministicTbpttEngine(_CarriedStateEngineMixin, DeterministicEngine):
    """The trainer's engine for ``deterministic=True``: Ignite's ``DeterministicEngine`` plus the carried stream.

    Resumed mid-epoch from a checkpoint, it replays the data from the right batch and the stream from the
    right state, so the run continues exactly as the uninterrupted one, with the random number generators as
    they were (dropout draws included). ``run()`` again after an exception continues, as for :class:`TbpttEngine`.

    Where Ignite's engine alone would not continue exactly, it also:

    - keeps the run's seed over ``run()`` again and in ``state_dict()`` (Ignite draws a new one at every
      ``run()``, which reorders a shuffling ``DataLoader``'s later epochs), and the random number generators'
      states where an exception or ``terminate()`` stopped the run, so that dropout draws go on from there;
    - draws a shuffling ``DataLoader``'s permutation of a resumed epoch before the saved generator states are
      restored, as the uninterrupted epoch drew it (Ignite's ``ReproducibleBatchSampler`` draws it lazily, after
      the restore, so that the rest of the epoch got other batches);
    - re-enters the epoch that ``terminate()`` stopped in, where Ignite counts one more (a ``set_epoch``
      handler would then lay out another epoch's batches, and the run would end an epoch short);
    - saves the generator states so that ``torch.load(..., weights_only=True)`` reads them.
    """

    def __init__(self, process_function: Callable) -> None:
        super().__init__(process_function)
        self._keep_seed = False  # the next run() keeps the seed: after an exception, terminate() or loading one
        self.add_event_handler(Events.TERMINATE, self._keep_random_states)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if self.should_terminate and state.epoch_length and state.iteration % state.epoch_length:
            state.epoch = state.iteration // state.epoch_length  # the epoch terminate() stopped in runs on
        return super().run(*args, **kwargs)

    def _keep_random_states(self) -> None:
        self.state.rng_states = _get_rng_states()
        self._keep_seed = True

    def _resume_after_exception(self) -> None:
        super()._resume_after_exception()
        self._keep_random_states()

    def _init_run(self) -> None:
        keep, self._keep_seed = self._keep_seed, False  # for this run only: a later fresh run draws its own
        if not (keep and getattr(self.state, "seed", None) is not None):
            super()._init_run()

    def _setup_engine(self) -> None:
        data = self.state.dataloader
        if _map_style(data) and type(data.batch_sampler) is BatchSampler:  # Ignite would wrap it the same way
            self.state.dataloader = data = update_dataloader(data, _DrawnBatchSampler(data.batch_sampler))
        rng_states, self.state.rng_states = self.state.rng_states, None  # restored below, after the draw
        super()._setup_engine()  # seeds the epoch and starts the data where the run stands
        if isinstance(data, DataLoader) and isinstance(data.batch_sampler, _DrawnBatchSampler):
            data.batch_sampler.draw()
        length = self._dataloader_len
        if rng_states is not None and length and self.state.iteration % length:
            _set_rng_states(rng_states)

    def state_dict(self) -> "OrderedDict[str, Any]":
        saved = super().state_dict()
        saved["rng_states"] = loadable_rng_states(saved["rng_states"])
        if getattr(self.state, "seed", None) is not None:
            saved[SEED_KEY] = self.state.seed
        return saved

    def load_state_dict(self, state_dict: Mapping) -> None:
        state_dict = dict(state_dict)
        seed = state_dict.pop(SEED_KEY, None)
        super().load_state_dict(state_dict)
        self.state.rng_states = restored_rng_states(self.state.rng_states)
        if seed is not None:
            self.state.seed, self._keep_seed = seed, True


def _map_style(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` over a map-style dataset, whose sampler Ignite makes reproducible."""
    return isinstance(data, DataLoader) and getattr(data, "_dataset_kind", _DatasetKind.Map) == _DatasetKind.Map


class _DrawnBatchSampler(ReproducibleBatchSampler):
    """Ignite's ``ReproducibleBatchSampler`` whose epoch's batches can be drawn before its iteration starts.

    :meth:`draw` draws them at once, where the engine has just seeded the epoch; the next iteration yields those,
    and later ones draw their own as Ignite's does.
    """

    _drawn = False

    def draw(self) -> None:
        self.setup_batch_indices()
        self._drawn = True

    def __iter__(self) -> Iterator[List[int]]:
        if not self._drawn:
            self.setup_batch_indices()
        self._drawn = False
        yield from self.batch_indices


def reset_state(engine: Engine) -> None:
    """Handler that makes the trainer's next batch start a fresh stream (no carried state or window).

    Args:
        engine: a trainer or evaluator made with ``carry_state=True``.

    Example:
        >>> import torch
        >>> from ignite.engine import Events
        >>> from ignite_tbptt import create_supervised_tbptt_trainer
        >>> model = torch.nn.RNN(1, 1)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=5, carry_state=True
        ... )
        >>> _ = trainer.add_event_handler(Events.ITERATION_STARTED(every=10), reset_state)  # every 10 batches
    """
    engine.carried_state.reset()


def tbptt_engine(step: Callable, carry_state: bool, engine_class: type = TbpttEngine) -> Engine:
    """An engine running ``step`` (an update or evaluation step with a ``carried_state``), with the chunk events
    registered and, when the state carries over, a fresh stream at every epoch start."""
    engine = engine_class(step)
    register_tbptt_events(engine)
    engine.carried_state = step.carried_state  # type: ignore[attr-defined]
    engine.draws = getattr(step, "draws", {})  # type: ignore[attr-defined]
    if carry_state:
        engine.add_event_handler(Events.STARTED, _warn_if_shuffled)
        engine.add_event_handler(Events.STARTED, _reset_where_the_data_restarts)
        engine.add_event_handler(Events.EPOCH_STARTED, _reset_at_epoch_start)
    return engine


_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _shuffling_sampler(data: Any) -> Optional[str]:
    """The name of a ``DataLoader``'s sampler that reorders its samples, or ``None``."""
    if not isinstance(data, DataLoader):
        return None
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, _RANDOM_SAMPLERS) or getattr(sampler, "shuffle", False) is True:
            return type(sampler).__name__
    return None


def _warn_if_shuffled(engine: Engine) -> None:
    sampler = _shuffling_sampler(engine.state.dataloader)
    if sampler is not None:
        warnings.warn(
            f"carry_state=True, but the DataLoader's {sampler} shuffles: row i of a batch does not continue row i "
            "of the batch before, so the carried state flows into unrelated samples. Use "
            "ignite_tbptt.data.StreamBatches (which shuffles whole documents between epochs) or shuffle=False",
            stacklevel=2,
        )


def _reset_where_the_data_restarts(engine: Engine) -> None:
    """A run that starts mid-epoch after ``terminate()`` on a plain ``Engine``.

    Ignite's plain engine then iterates the data from its first batch again (a run resumed from a checkpoint
    or after an exception skips to the right batch instead, :class:`TbpttEngine`), so the carried stream cannot
    continue: it starts afresh, at the data's first batch.
    """
    state = engine.state
    restarts = engine._init_iter == 0  # set by Ignite's run() after terminate(); None where it resumes
    if not isinstance(engine, DeterministicEngine) and state.epoch_length and state.iteration % state.epoch_length and restarts:
        engine.carried_state.reset(data_position=0)


def _reset_at_epoch_start(engine: Engine) -> None:
    # Not when a run resumes mid-epoch from a state_dict: the restored stream continues.
    state = engine.state
    if state.epoch_length is None or state.iteration == (state.epoch - 1) * state.epoch_length:
        engine.carried_state.reset(data_position=0)  # an epoch's stream starts at the data's beginning
