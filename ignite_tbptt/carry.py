"""Carried state and the engines that save it: where the trained stream stands between batches.

:class:`CarriedState` holds the backprop window and the stream position; the engine classes put it in
``state_dict()``, so that ``Checkpoint`` keeps it and a resumed run continues the stream exactly.
:func:`tbptt_engine` builds the trainer's and the evaluator's engine around a step function.
"""

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from ignite.engine import DeterministicEngine, Engine, Events
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from ignite_tbptt.batches import batch_size_of
from ignite_tbptt.schedule import Reach, Truncations
from ignite_tbptt.sequences import BurnIn, SequenceInfo, burn_in_marks
from ignite_tbptt.events import as_ours, register_tbptt_events

__all__ = ["CARRIED_STATE_KEY", "CHUNK_LENGTHS_KEY", "TRUNCATION_DRAWS_KEY", "CarriedState", "DeterministicTbpttEngine", "TbpttEngine", "reset_state", "tbptt_engine"]

#: The key of the carried stream in the trainer's ``state_dict()``.
CARRIED_STATE_KEY = "tbptt_carried_state"
#: The key of the random chunk lengths' draws in the trainer's ``state_dict()``.
CHUNK_LENGTHS_KEY = "tbptt_chunk_lengths"
#: The key of the random truncations' draws (``k2=ARTBP(...)``) in the trainer's ``state_dict()``.
TRUNCATION_DRAWS_KEY = "tbptt_truncation_draws"


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
        self.batch_size, self.data_position = batch_size, data_position
        return self.position

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
    its key), so a resumed run draws on; and lets ``run()`` continue after an exception."""

    carried_state: CarriedState
    draws: Dict[str, Any] = {}

    # Handlers registered with Ignite's own Tbptt_Events go to ours (see ignite_tbptt.events.Tbptt_Events).
    def add_event_handler(self, event_name: Any, handler: Callable, *args: Any, **kwargs: Any) -> Any:
        return super().add_event_handler(as_ours(event_name), handler, *args, **kwargs)  # type: ignore[misc]

    def has_event_handler(self, handler: Callable, event_name: Any = None) -> bool:
        return super().has_event_handler(handler, as_ours(event_name))  # type: ignore[misc]

    def remove_event_handler(self, handler: Callable, event_name: Any) -> None:
        super().remove_event_handler(handler, as_ours(event_name))  # type: ignore[misc]

    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().run(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._resume_after_exception()
            raise

    def _resume_after_exception(self) -> None:
        """Make the next ``run()`` continue where an exception stopped this one, as from a checkpoint taken there.

        Ignite keeps the failed run's generator (the next ``run()`` would return ``None``), and counts the epoch it
        stopped in as begun, which makes an interrupted last epoch look done (the next ``run()`` would start
        afresh). The epoch counter goes back to the epochs completed, as ``load_state_dict`` sets it.
        """
        self._internal_run_generator = None  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        if state.epoch_length and state.iteration % state.epoch_length:
            state.epoch = state.iteration // state.epoch_length

    def state_dict(self) -> "OrderedDict[str, Any]":
        saved = super().state_dict()  # type: ignore[misc]
        saved[CARRIED_STATE_KEY] = self.carried_state.state_dict()
        for key, draws in self.draws.items():
            saved[key] = draws.state_dict()
        return saved

    def load_state_dict(self, state_dict: Mapping) -> None:
        state_dict = dict(state_dict)
        carried = state_dict.pop(CARRIED_STATE_KEY, None)
        saved_draws = {key: state_dict.pop(key, None) for key in self.draws}
        super().load_state_dict(state_dict)  # type: ignore[misc]
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
    """


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
