"""The chunk-level events of the TBPTT engines, with a counter so that event filters work on them."""

from typing import Any

from ignite.engine import Engine, EventEnum, Events
from ignite.engine.events import CallableEventWithFilter

__all__ = ["Tbptt_Events", "TIME_ITERATION_ATTR", "as_ours", "fire", "register_tbptt_events", "start_chunk"]

#: The ``engine.state`` attribute that counts chunks over the run, like ``iteration`` counts batches.
TIME_ITERATION_ATTR = "time_iteration"


class Tbptt_Events(EventEnum):
    """Events fired around every time chunk of a batch.

    All carry the counter ``engine.state.time_iteration``, so filters work on them, unlike Ignite's own TBPTT
    events:

    .. code-block:: python

        @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED(every=100))
        def log_chunk_loss(engine):
            print(engine.state.time_iteration, engine.state.chunk, float(engine.state.output))

    Ignite tells events apart by their names and keeps which counter an event has in a table that every engine
    in the process shares. These events are therefore named ``TBPTT_TIME_ITERATION_STARTED`` and so on, with
    ``TIME_ITERATION_STARTED`` as an alias: registered under Ignite's own names, they would give Ignite's own
    TBPTT trainer a counter it never advances. Handlers registered on our engines with Ignite's
    ``Tbptt_Events`` are taken as ours (:func:`~ignite_tbptt.events.as_ours`).
    """

    #: Fired at the start of every chunk, before its forward pass; ``engine.state.chunk`` is the chunk then.
    TBPTT_TIME_ITERATION_STARTED = "tbptt_time_iteration_started"
    #: Fired between a chunk's backward pass and its optimizer step, whenever the optimizer steps. The gradients
    #: are final then, unscaled under AMP and averaged across processes, so handlers can log or clip them.
    TBPTT_GRADIENTS_COMPUTED = "tbptt_gradients_computed"
    #: Fired at the end of every chunk, after its update; ``engine.state.output`` is the chunk's loss then.
    TBPTT_TIME_ITERATION_COMPLETED = "tbptt_time_iteration_completed"
    #: ``TBPTT_TIME_ITERATION_STARTED`` under Ignite's name, the one the examples use.
    TIME_ITERATION_STARTED = "tbptt_time_iteration_started"
    #: ``TBPTT_GRADIENTS_COMPUTED`` under the short name.
    GRADIENTS_COMPUTED = "tbptt_gradients_computed"
    #: ``TBPTT_TIME_ITERATION_COMPLETED`` under Ignite's name, the one the examples use.
    TIME_ITERATION_COMPLETED = "tbptt_time_iteration_completed"


#: Ignite's names for chunk events (``ignite.contrib.engines.Tbptt_Events``), and ours for the same events.
_IGNITE_NAMES = {"TIME_ITERATION_STARTED": Tbptt_Events.TIME_ITERATION_STARTED,
                 "TIME_ITERATION_COMPLETED": Tbptt_Events.TIME_ITERATION_COMPLETED}


def as_ours(event: Any) -> Any:
    """``event`` as one of our :class:`Tbptt_Events` if it is Ignite's chunk event of that name (its filter kept),
    else unchanged: the drop-in promise for handlers registered with Ignite's ``Tbptt_Events``.

    >>> from ignite.contrib.engines import Tbptt_Events as IgniteEvents
    >>> as_ours(IgniteEvents.TIME_ITERATION_COMPLETED) is Tbptt_Events.TIME_ITERATION_COMPLETED
    True
    """
    ours = _IGNITE_NAMES.get(getattr(event, "name", None)) if isinstance(event, CallableEventWithFilter) else None
    if ours is None:
        return event
    return ours if event.filter is None else CallableEventWithFilter(ours.value, event.filter, ours.name)


def register_tbptt_events(engine: Engine) -> None:
    """Register :class:`Tbptt_Events` on ``engine`` with the counter ``state.time_iteration``.

    The counter is saved by ``engine.state_dict()`` and starts from 0 on every fresh run.
    """
    engine.register_events(*Tbptt_Events, event_to_attr={e: TIME_ITERATION_ATTR for e in Tbptt_Events})
    engine.state_dict_user_keys.append(TIME_ITERATION_ATTR)

    def reset_counter(engine: Engine) -> None:
        if engine.state.iteration == 0:  # a fresh run, not one resumed from a state_dict
            setattr(engine.state, TIME_ITERATION_ATTR, 0)

    engine.add_event_handler(Events.STARTED, reset_counter)


def fire(engine: Engine, event: Tbptt_Events) -> None:
    """Fire one of our registered events, skipping ``fire_event``'s check that it is registered.

    The check scans the engine's event list with slow comparisons, and ``_fire_event`` formats a debug message
    even with no handler to call; at three events per chunk that costs more than the rest of the per-chunk
    bookkeeping together. An event without handlers only records itself as the last one fired.
    """
    if engine._event_handlers[event]:
        engine._fire_event(event)
    else:
        engine.last_event_name = event


def start_chunk(engine: Engine, chunk: Any, num_chunks: int, weight: int) -> None:
    """Count a chunk, expose it on ``engine.state`` and fire ``TIME_ITERATION_STARTED``.

    During the chunk's events ``state.chunk`` is the :class:`~ignite_tbptt.schedule.Chunk`, ``state.num_chunks``
    the number of chunks in the batch and ``state.chunk_weight`` the number of (step, sample) pairs scored.
    """
    setattr(engine.state, TIME_ITERATION_ATTR, getattr(engine.state, TIME_ITERATION_ATTR) + 1)
    engine.state.chunk, engine.state.num_chunks, engine.state.chunk_weight = chunk, num_chunks, weight
    fire(engine, Tbptt_Events.TIME_ITERATION_STARTED)


def stop_requested(engine: Engine) -> bool:
    """Whether a handler asked the engine to stop the run or the epoch (``terminate()``, ``terminate_epoch()``).

    Ignite acts on the request after the batch; the chunk loops ask after every chunk event, so that no chunk
    starts once it is made.
    """
    return bool(engine.should_terminate or engine.should_terminate_single_epoch)
