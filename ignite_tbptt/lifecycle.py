"""The edges of a run: ``run()`` again after an exception, where a checkpoint may be taken, and which trainer a
checkpoint may be loaded into.

Ignite's ``Engine`` counts a batch as begun before its ``ITERATION_STARTED`` handlers run, counts an epoch as
begun before its ``EPOCH_STARTED`` handlers run, and starts a fresh run when ``run()`` finds the counters at
the end. After an exception those counters say more than what was trained; the functions here put them back
to what was, so that ``run()`` again continues as a run resumed from a checkpoint taken there would.
"""

import warnings
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = [
    "OPTIONS_KEY", "check_options", "continue_after_exception", "loadable_rng_states", "options_of", "refuse_mid_batch",
    "restored_rng_states", "start_afresh",
]

#: The key of the trainer's options in its ``state_dict()``.
OPTIONS_KEY = "tbptt_options"


def continue_after_exception(engine: Engine) -> None:
    """Put an engine that an exception stopped where its next ``run()`` continues the run (docs/contract.md).

    - A batch whose ``ITERATION_STARTED`` handlers (or the checks before its first chunk) raised was not trained:
      it is not counted, so the next run trains it.
    - The epoch counter goes back to the epochs completed, as ``load_state_dict`` sets it: an exception in
      ``EPOCH_STARTED`` or inside an epoch leaves that epoch to run again (its ``EPOCH_STARTED`` fires again).
    - Ignite keeps the failed run's generator, whose next ``run()`` would return without training; it is
      dropped. Where nothing is left to train (an exception in the run's last batch, its last
      ``EPOCH_COMPLETED`` or ``COMPLETED``), Ignite's next ``run()`` would start afresh and train every epoch
      again: it gets a run that only fires ``STARTED`` and ``COMPLETED`` instead.
    """
    state = engine.state
    engine._internal_run_generator = None  # type: ignore[attr-defined]
    if engine.last_event_name == Events.ITERATION_STARTED and state.iteration:
        state.iteration -= 1
        engine.last_event_name = None  # counted back once: a state_dict() now saves the iteration as it is
    if state.epoch_length:
        state.epoch = state.iteration // state.epoch_length
    if engine._is_done(state):
        engine._internal_run_generator = engine._internal_run_as_gen()  # type: ignore[attr-defined]


def start_afresh(engine: Engine) -> None:
    """``run()`` with other data than the run an exception stopped: a fresh run, never the old stream's rest.

    Continuing would skip the new data's first batches (as many as the old run had trained in its epoch) and,
    carrying state, flow the old stream's state into them.
    """
    warnings.warn(
        f"run() got other data than the run an exception stopped at iteration {engine.state.iteration}: it starts "
        "a fresh run (iteration 0, a fresh carried stream) instead of continuing the old one. Pass the same data "
        "object to continue the stopped run",
        stacklevel=3,
    )
    engine.state.max_epochs = engine.state.max_iters = None  # Ignite's way to ask run() for a fresh state
    engine._internal_run_generator = None  # type: ignore[attr-defined]


def refuse_mid_batch(engine: Engine) -> None:
    """A ``state_dict()`` asked for inside a batch (a ``Checkpoint`` on a chunk event) cannot resume exactly.

    The optimizer has stepped on part of the batch, and what the resumed run needs to finish it (the rest of the
    batch's chunks, the window's graphs) is not in any ``state_dict()``: loaded, the run would go on with the
    next batch and silently drop the rest of this one. Refused when it is asked for, not when it is loaded.
    """
    raise RuntimeError(
        f"state_dict() was called inside batch {engine.state.iteration} (during {engine.last_event_name}): a "
        "checkpoint taken between the chunks of a batch cannot resume there, since the rest of the batch is not "
        "saved. Save at a batch boundary instead: attach the Checkpoint to Events.ITERATION_COMPLETED(every=n) "
        "(or EPOCH_COMPLETED), choosing n batches for about the number of chunks you wanted"
    )


def check_options(saved: Optional[Mapping[str, Any]], own: Mapping[str, Any]) -> None:
    """Refuse a checkpoint saved by a trainer built with other options, naming them, before anything is loaded.

    The carried window, the random draws and the counters only mean the same thing under the same options: a
    window kept for another ``k2`` or ``overlap`` would be continued as if it were this trainer's. A checkpoint
    without options (saved before they were recorded) is accepted.
    """
    if saved is None:
        return
    differ = [f"{name}: saved {saved.get(name)!r}, this trainer {value!r}" for name, value in own.items()
              if saved.get(name) != value]
    if differ:
        raise ValueError(
            "this checkpoint was saved by a trainer built with other options (" + "; ".join(differ) + "). Build "
            "the trainer with the options of the run that saved it to resume it, or load only the model and "
            "optimizer to start a new run from its weights"
        )


def loadable_rng_states(rng_states: Any) -> Any:
    """Ignite's saved random states with numpy's key array as a tensor, so that ``torch.load(weights_only=True)``
    reads them (Ignite keeps a numpy array there, which ``weights_only`` refuses)."""
    if rng_states is None or len(rng_states) < 3 or not isinstance(rng_states[2][1], np.ndarray):
        return rng_states
    name, keys, *rest = rng_states[2]
    return [*rng_states[:2], (name, torch.from_numpy(keys.astype(np.int64)), *rest)]


def restored_rng_states(rng_states: Any) -> Any:
    """The inverse of :func:`loadable_rng_states`: numpy's state as ``numpy.random.set_state`` takes it."""
    if rng_states is None or len(rng_states) < 3 or not isinstance(rng_states[2][1], torch.Tensor):
        return rng_states
    name, keys, *rest = rng_states[2]
    return [*rng_states[:2], (name, keys.numpy().astype(np.uint32), *rest)]


def options_of(**options: Any) -> Dict[str, Any]:
    """The options a checkpoint must agree on, as plain values that ``weights_only`` loading reads: numbers,
    strings and bools as they are, anything else (``RandomLength``, ``ARTBP``, ``AdaptiveK2``) by its ``repr``."""
    plain = (int, float, str, bool, type(None))
    return {name: value if isinstance(value, plain) else repr(value) for name, value in options.items()}
