"""The TBPTT trainer: an Ignite ``Engine`` whose update walks each batch chunk by chunk.

The data flows one way: batch -> chunks (:mod:`ignite_tbptt.schedule`) -> window
(:mod:`ignite_tbptt.window`) -> optimizer step -> chunk events.
"""

import copy
import warnings
from typing import Any, Callable, List, Optional, Tuple, Union

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events, _prepare_batch
from torch import nn

from ignite_tbptt.adaptive import ADAPTIVE_K2_KEY, AdaptiveK2, check_window_kind, horizon_marks
from ignite_tbptt.amp import amp_context, device_type, grad_scaler
from ignite_tbptt.batches import NothingToTrain, batch_chunks, batch_size_of, checked_loss, chunk_sequence, split_batch
from ignite_tbptt.checks import batch_axis_probe, check_output_length, check_state_passing
from ignite_tbptt.carry import (
    CHUNK_LENGTHS_KEY, TRUNCATION_DRAWS_KEY, CarriedState, DeterministicTbpttEngine, TbpttEngine, reset_state, tbptt_engine,
)
from ignite_tbptt.distributed import average_gradients, is_ddp
from ignite_tbptt.events import Tbptt_Events, TIME_ITERATION_ATTR, fire, start_chunk, stop_requested
from ignite_tbptt.schedule import (
    ARTBP, BatchPlan, Chunk, RandomLength, Reach, Steps, Window, bptt_of, check_positive_int, check_steps, plan_batch,
)
from ignite_tbptt.lifecycle import options_of
from ignite_tbptt.sequences import SequenceInfo, clear_padding, masked_pair
from ignite_tbptt.state import DEFAULT_BATCH_DIM, BatchDims, DetachedStateCheck, ResetFn, StateProtocol, detach_state
from ignite_tbptt.updates import (
    SKIPPED_UPDATES_ATTR, WINDOW_LENGTHS_ATTR, AccumulationGroup, BurnInTally, all_finite, count_skipped_updates, count_window_lengths,
    scaled_learning_rate, scaler_step,
)
from ignite_tbptt.window import RecomputeWindow, RetainWindow, cat_time, default_model_fn

__all__ = [
    "Tbptt_Events",
    "average_gradients",
    "create_supervised_tbptt_trainer",
    "reset_state",
    "supervised_tbptt_training_step",
]

OVERLAP_MODES = {"recompute": RecomputeWindow, "retain": RetainWindow}
#: The ``engine.state`` attribute holding the current batch's backprop window in steps (``None`` under ``ARTBP``).
K2_ATTR = "k2"
#: The ``engine.state`` attribute holding whether ``recompute`` re-runs windows in merged calls (``None``: not yet known).
MERGE_CALLS_ATTR = "merge_calls"
#: The ``engine.state`` attribute holding the latest update's state-gradient norms (``monitor_state_grads=True``).
STATE_GRAD_NORMS_ATTR = "state_grad_norms"

def _detach_hidden(hidden: Any) -> Any:
    """Cut a hidden state (a tensor, or tuples, lists, dicts and namedtuples of tensors) from its graph.

    The trainer looks this name up at run time, so tests may patch ``ignite_tbptt.trainer._detach_hidden``.

    >>> h = torch.ones(2, requires_grad=True) * 2
    >>> _detach_hidden((h, [h])).__class__.__name__, _detach_hidden(h).requires_grad
    ('tuple', False)
    """
    return detach_state(hidden)


def _default_output_transform(x: Any, y: Any, y_pred: Any, loss: torch.Tensor) -> float:
    return loss.item()


def supervised_tbptt_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Union[Callable, nn.Module],
    tbtt_step: Steps,
    k2: Optional[Union[Window, AdaptiveK2]] = None,
    overlap: str = "recompute",
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_output_transform,
    carry_state: bool = False,
    amp_mode: Optional[str] = None,
    scaler: Union[bool, "torch.amp.GradScaler"] = False,
    gradient_accumulation_steps: int = 1,
    clip_grad_norm: Optional[float] = None,
    hidden_batch_dim: BatchDims = DEFAULT_BATCH_DIM,
    checkpoint_every: Optional[int] = None,
    skip_nonfinite: bool = False,
    check_state: bool = False,
    burn_in: int = 0,
    reset_hidden: Optional[ResetFn] = None,
    merge_calls: Optional[bool] = None,
    monitor_state_grads: bool = False,
) -> Callable[[Engine, Any], Any]:
    """The update function of :func:`create_supervised_tbptt_trainer`.

    Args:
        model, optimizer, loss_fn: as for :func:`create_supervised_tbptt_trainer`, which documents each argument,
            and so are ``tbtt_step``, ``k2``, ``overlap``, ``dim``, ``device``, ``non_blocking``,
            ``prepare_batch``, ``model_fn``, ``output_transform``, ``carry_state``, ``amp_mode``, ``scaler``,
            ``gradient_accumulation_steps``, ``clip_grad_norm``, ``hidden_batch_dim``, ``checkpoint_every``,
            ``skip_nonfinite``, ``check_state``, ``burn_in``, ``reset_hidden``, ``merge_calls`` and
            ``monitor_state_grads``.

    For every chunk of the batch it fires ``TIME_ITERATION_STARTED``, zeroes the gradients (at the start of
    each accumulation group), lets the window run forward, computes the chunk's loss over its valid steps,
    lets the window backpropagate it, steps the optimizer (firing ``GRADIENTS_COMPUTED`` just before) and
    fires ``TIME_ITERATION_COMPLETED`` with the chunk's loss in ``engine.state.output`` (a detached tensor:
    no host sync per chunk). The batch output is ``output_transform(x, y, y_pred, loss)`` with ``loss`` the
    mean of the chunk losses weighted by their number of valid (step, sample) pairs, and ``y_pred`` the
    detached predictions over the batch (collected only for a custom ``output_transform``). The returned
    function's ``carried_state`` attribute is its :class:`~ignite_tbptt.carry.CarriedState`.

    Example:
        >>> from ignite.engine import Engine
        >>> model = torch.nn.RNN(1, 1)
        >>> step = supervised_tbptt_training_step(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=2
        ... )
        >>> trainer = Engine(step)
    """
    bptt = bptt_of(tbtt_step)
    k2 = bptt if k2 is None else k2
    # The trainer's own draws: the user's RandomLength or ARTBP stays a description, and two trainers never share one.
    lengths = copy.deepcopy(tbtt_step) if isinstance(tbtt_step, RandomLength) else None
    artbp = copy.deepcopy(k2) if isinstance(k2, ARTBP) else None
    adaptive = copy.deepcopy(k2) if isinstance(k2, AdaptiveK2) else None
    check_steps(bptt, k2 if artbp is None and adaptive is None else bptt)
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {sorted(OVERLAP_MODES)}, got {overlap!r}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    state = StateProtocol(hidden_batch_dim, reset_hidden)
    check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if is_ddp(model) and overlap == "retain" and (artbp is not None or adaptive is not None or k2 > bptt):
        raise ValueError(
            'overlap="retain" with k2 > tbtt_step, k2=ARTBP(...) or k2=AdaptiveK2(...) backpropagates each forward pass in several backward calls, '
            "which DistributedDataParallel cannot reduce; pass the plain model (the trainer then averages the "
            'gradients across processes itself) or use overlap="recompute"'
        )
    on = device_type(device, model)
    autocast = amp_context(amp_mode, on)
    scaler = grad_scaler(scaler, amp_mode, on)
    accumulate = gradient_accumulation_steps
    # Looked up at call time so that a test can patch the module-level _detach_hidden.
    detach = lambda hidden: _detach_hidden(hidden)  # noqa: E731
    if merge_calls is not None and not isinstance(merge_calls, bool):
        raise TypeError(f"merge_calls must be True, False or None (find out), got {type(merge_calls).__name__}")
    if merge_calls and overlap != "recompute":
        raise ValueError('merge_calls=True applies to overlap="recompute" only: retain runs every step once')
    if monitor_state_grads and overlap != "retain":
        raise ValueError(
            'monitor_state_grads=True needs overlap="retain", whose backward pass computes the state gradient at '
            "every chunk boundary anyway; recompute backpropagates each window in one call and would need a hook "
            "at every boundary (see docs/guide/choosing-k2.md)"
        )
    recompute = overlap == "recompute"
    window = (RecomputeWindow(model, model_fn, detach, dim, state, checkpoint_every, merge_calls) if recompute
              else RetainWindow(model, model_fn, detach, dim, state, checkpoint_every, monitor_state_grads))
    stream = CarriedState(window, carry_state, burn_in)
    keep_predictions = output_transform is not _default_output_transform
    # With a scaler, its own inf check finds a non-finite loss: the group need not track the losses' finiteness.
    group = AccumulationGroup(accumulate, track_finite=skip_nonfinite and scaler is None)
    warned = False

    def backward(loss: Optional[torch.Tensor], weight: int, length: int) -> None:
        if loss is not None:
            loss = group.add(loss, weight, length)
            loss = scaler.scale(loss) if scaler is not None else loss
        window.backward(loss)

    def update_is_finite(engine: Engine, loss_ok: Optional[torch.Tensor], distributed: bool) -> bool:
        """Whether the group's losses and gradients are finite: one host read."""
        if clip_grad_norm is not None:  # the total norm is already there, and not finite where a gradient is not
            ok = torch.isfinite(engine.state.grad_norm)
        else:
            ok = all_finite([p.grad for p in model.parameters() if p.grad is not None])
        if loss_ok is not None and not distributed:  # distributed: folded into the averaged gradients
            ok = ok & loss_ok
        return bool(ok)

    def skip_update(engine: Engine) -> None:
        nonlocal warned
        setattr(engine.state, SKIPPED_UPDATES_ATTR, getattr(engine.state, SKIPPED_UPDATES_ATTR, 0) + 1)
        if not warned:
            warned = True
            warnings.warn(
                f"skip_nonfinite: the update after chunk {engine.state.chunk.index} of batch {engine.state.iteration} "
                f"(time_iteration {getattr(engine.state, TIME_ITERATION_ATTR)}) had a non-finite loss or gradient "
                "and was skipped: the parameters and the optimizer state are unchanged. Later skips are counted in "
                "engine.state.skipped_updates without a warning",
                stacklevel=2,
            )

    def optimizer_step(engine: Engine, distributed: bool) -> None:
        if not (group.weight or distributed):
            return  # nothing was valid: no update (a scaler could not step without gradients either)
        weight, chunk_lengths, loss_ok = group.take()
        # Random lengths: the rate scales by the chunk's length over bptt (the group's mean length), as AWD-LSTM.
        factor = sum(chunk_lengths) / (len(chunk_lengths) * bptt) if lengths is not None and chunk_lengths else 1.0
        if distributed:
            if loss_ok is not None:  # a non-finite loss on one process makes the average non-finite on all
                weight = torch.where(loss_ok, float(weight), float("nan"))
            average_gradients(model, weight)  # weighted by loss terms: exact where padding differs by process
        if scaler is not None:
            scaler.unscale_(optimizer)
        fire(engine, Tbptt_Events.GRADIENTS_COMPUTED)
        if clip_grad_norm is not None:
            engine.state.grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is not None:
            if not scaler_step(scaler, optimizer, factor, skip_nonfinite):
                skip_update(engine)
        elif skip_nonfinite and not update_is_finite(engine, loss_ok, distributed):
            skip_update(engine)
        else:
            with scaled_learning_rate(optimizer, factor):
                optimizer.step()

    def report_merge(engine: Engine) -> None:
        """Put the window's choice of calls in ``engine.state.merge_calls``, with a log line: it decides the speed."""
        merge = window.merge_calls
        setattr(engine.state, MERGE_CALLS_ATTR, merge)
        engine.logger.info(
            'overlap="recompute" re-runs each window in %s (engine.state.merge_calls=%s)',
            "as few calls as possible: merging them changes nothing for this model" if merge
            else "the calls the forward pass made: this model depends on where the stream is cut", merge,
        )

    def drop_group() -> None:
        """After a stop inside a batch: the half-accumulated gradient of the steps that ran is never stepped."""
        group.take()
        optimizer.zero_grad()

    def run_chunk(
        engine: Engine, chunk: Chunk, num_chunks: int, later: List[int], x: Any, y: Any, info: Any, rows: slice,
        distributed: bool, check_axes: bool,
    ) -> Optional[Tuple[Any, torch.Tensor, int]]:
        """Train on one chunk; return its detached predictions (``None`` unless kept), loss and weight.

        ``None`` when a ``TIME_ITERATION_STARTED`` handler stopped the run: the chunk does not run. With
        ``check_axes``, the state's batch axes are checked after the forward pass, before any update.
        """
        x_t, y_t = prepare_batch((x, y), device=device, non_blocking=non_blocking)
        x_t = clear_padding(x_t, info, rows, dim)
        gates, valid, weight = chunk_sequence(info, rows, chunk, x_t, dim)
        start_chunk(engine, chunk, num_chunks, weight)
        if stop_requested(engine):
            return None
        count = getattr(engine.state, TIME_ITERATION_ATTR)
        if artbp is not None:
            getattr(engine.state, WINDOW_LENGTHS_ATTR)[chunk.stop - chunk.window_start] += 1
        if not model.training:  # a chunk handler ran an evaluation; train() walks every submodule: not per chunk
            model.train()
        if (count - 1) % accumulate == 0:
            optimizer.zero_grad()
        with autocast():
            y_pred = window.forward(chunk, later, x_t, gates)
            if recompute and window.merge_calls != getattr(engine.state, MERGE_CALLS_ATTR, None):
                report_merge(engine)
            check_output_length(y_pred, x_t, dim)
            # The kept state tells only where this chunk computed it with a graph (recompute may keep an older one).
            stale = any(g.frozen for g in gates) or getattr(window, "state_at", chunk.stop) <= chunk.start
            detached_state(window.hidden, stale)
            if check_axes:
                state.check(window.hidden, batch_size_of(x_t, dim), lambda: batch_axis_probe(model, model_fn, x_t, dim))
            loss = checked_loss(loss_fn(*masked_pair(y_pred, y_t, valid, dim))) if weight else None
        backward(loss, weight, chunk.length)
        if monitor_state_grads:
            norms = window.state_grad_norms
            setattr(engine.state, STATE_GRAD_NORMS_ATTR, norms if norms is not None else x_t.new_zeros(0, dtype=torch.float))
        if count % accumulate == 0:
            optimizer_step(engine, distributed)
        engine.state.output = loss.detach() if loss is not None else torch.zeros((), device=x_t.device)
        stream.chunk_trained(chunk)
        fire(engine, Tbptt_Events.TIME_ITERATION_COMPLETED)
        # Only detached predictions leave: a y_pred still attached would keep this chunk's autograd graph alive
        # through the next chunk's forward pass, whose graph then fills fresh memory instead of the cache-warm
        # memory this one frees (4 to 9% slower for a GRUCell loop on CPU at k1 = 2).
        return detach_state(y_pred) if keep_predictions else None, engine.state.output, weight

    unchecked = check_state  # the state-passing check runs on the first batch longer than one chunk
    detached_state = DetachedStateCheck(artbp is not None or adaptive is not None or k2 > bptt)
    nothing = NothingToTrain()
    tally = BurnInTally(burn_in) if burn_in else None

    def adapted_reach(engine: Engine, x: Any, y: Any, info: Optional[SequenceInfo], offset: int) -> Reach:
        """Re-estimate ``K`` where due, on this batch from the carried state; the reach of this batch's windows.

        The new ``K`` sets the next batch's windows, which this batch's plan provides for; this batch keeps the
        overlap the previous batch provided for, unless it starts a fresh stream (nothing was provided for).
        """
        updates = getattr(engine.state, TIME_ITERATION_ATTR, 0)
        if adaptive.due(updates):
            x_t, y_t = prepare_batch((x, y), device=device, non_blocking=non_blocking)
            # Measured as it is trained on: padding cleared, resets made, unscored targets left out.
            x_t = clear_padding(x_t, info, slice(0, x_t.shape[dim]), dim)
            hidden = stream.window.state_at_stop() if offset else None
            adaptive.estimate(model, x_t, y_t, loss_fn, updates, tbtt_step=bptt, model_fn=model_fn, dim=dim,
                              hidden_batch_dim=hidden_batch_dim, hidden=hidden, reset_hidden=reset_hidden,
                              **horizon_marks(info, dim))
        overlap = adaptive.K - 1
        provided = stream.reach if offset else None
        return Reach(overlap, overlap) if provided is None else provided._replace(next_overlap=overlap)

    def plan_of(engine: Engine, x: Any, y: Any, info: Optional[SequenceInfo], length: int, offset: int) -> BatchPlan:
        """The batch's plan; what it leaves the next batch's plan is kept in the stream, its window in steps in
        ``engine.state.k2``."""
        window = (artbp or k2) if adaptive is None else adapted_reach(engine, x, y, info, offset)
        plan = plan_batch(length, offset, lengths or tbtt_step, window, stream.carry, stream.truncations)
        stream.truncations, stream.reach = plan.truncations, plan.reach
        setattr(engine.state, K2_ATTR, plan.k2)
        return plan

    def check_state_once(x: Any, y: Any, length: int) -> None:
        """``check_state``: check that the model passes its state on, at the first batch longer than one chunk."""
        nonlocal unchecked
        if unchecked and length > bptt:
            x_t = prepare_batch((x, y), device=device, non_blocking=non_blocking)[0]
            check_state_passing(model, x_t, bptt, model_fn=model_fn, dim=dim, hidden_batch_dim=hidden_batch_dim,
                                reset_hidden=reset_hidden)
            unchecked = False

    def run_plan(
        engine: Engine, plan: BatchPlan, x: Any, y: Any, info: Any, offset: int, length: int
    ) -> Tuple[Optional[torch.Tensor], int, List[Any]]:
        """Train on each chunk of the plan in turn; return the sum of their losses times their weights, the sum of
        the weights and the kept predictions. A stop or an exception inside the batch ends it there, and the
        stream and the accumulation group with it."""
        distributed = idist.get_world_size() > 1 and not is_ddp(model)  # averaged by hand before each step
        total, total_weight, predictions, done = None, 0, [], 0
        try:
            for chunk, later, rows, x_c, y_c in batch_chunks(plan.chunks, plan.later_of, x, y, offset, dim):
                # A batch that resets, pads or burns in works on the state per sample: its batch axes are checked
                # at its first chunk, before the first update, rather than at the first reset deep in the batch.
                check_axes = done == 0 and info is not None and info.gated
                ran = run_chunk(engine, chunk, len(plan.chunks), later, x_c, y_c, info, rows, distributed, check_axes)
                if ran is None:
                    break
                y_pred, loss, weight = ran
                # One running sum, updated in place: keeping every chunk's loss alive until the batch ends would
                # scatter small long-lived allocations between the chunks' activations and fragment the heap.
                total = loss * weight if total is None else total.add_(loss, alpha=weight)
                total_weight += weight
                done += 1
                if keep_predictions:
                    predictions.append(y_pred)
                if stop_requested(engine):
                    break
        finally:
            complete = stream.batch_complete(plan.chunks)
            stream.end_batch(length, complete)
            if not complete:
                drop_group()
        return total, total_weight, predictions

    def update(engine: Engine, batch: Any) -> Any:
        x, y, info, length = split_batch(batch, dim)
        check_state_once(x, y, length)
        offset = stream.begin_batch(x, dim, info.position if info is not None else None)
        info = stream.mark_burn_in(info, length)
        plan = plan_of(engine, x, y, info, length, offset)
        model.train()
        total, total_weight, predictions = run_plan(engine, plan, x, y, info, offset, length)
        nothing.check(x, info, dim, engine.state.iteration)
        if tally is not None:
            tally.add(total_weight, stream.position if stream.carry else length)
        y_pred = cat_time(predictions, dim) if predictions else None
        mean = total / total_weight if total_weight else torch.tensor(float("nan"))  # nan: nothing was valid
        return output_transform(x, y, y_pred, mean)

    update.carried_state = stream  # type: ignore[attr-defined]
    update.burn_in_tally = tally  # type: ignore[attr-defined]
    update.adaptive_k2 = adaptive  # type: ignore[attr-defined]
    draws = {CHUNK_LENGTHS_KEY: lengths, TRUNCATION_DRAWS_KEY: artbp, ADAPTIVE_K2_KEY: adaptive}
    update.draws = {key: d for key, d in draws.items() if d is not None}  # type: ignore[attr-defined]
    return update


def initial_k2(tbtt_step: Steps, k2: Optional[Union[Window, AdaptiveK2]], adaptive: Optional[AdaptiveK2]) -> Optional[int]:
    """``engine.state.k2`` before the first batch: the fixed window, an ``AdaptiveK2``'s ``initial`` window (``None``
    until its first estimate where it has none), ``None`` under ``ARTBP`` (random windows, counted in
    ``engine.state.window_lengths``)."""
    bptt = bptt_of(tbtt_step)
    if adaptive is not None:
        return None if adaptive.K is None else bptt + adaptive.K - 1
    return None if isinstance(k2, ARTBP) else (bptt if k2 is None else k2)


def create_supervised_tbptt_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Union[Callable, nn.Module],
    tbtt_step: Steps,
    dim: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    non_blocking: bool = False,
    prepare_batch: Callable = _prepare_batch,
    k2: Optional[Union[Window, AdaptiveK2]] = None,
    overlap: str = "recompute",
    model_fn: Callable = default_model_fn,
    output_transform: Callable = _default_output_transform,
    carry_state: bool = False,
    deterministic: bool = False,
    amp_mode: Optional[str] = None,
    scaler: Union[bool, "torch.amp.GradScaler"] = False,
    gradient_accumulation_steps: int = 1,
    clip_grad_norm: Optional[float] = None,
    hidden_batch_dim: BatchDims = DEFAULT_BATCH_DIM,
    checkpoint_every: Optional[int] = None,
    skip_nonfinite: bool = False,
    check_state: bool = False,
    burn_in: int = 0,
    reset_hidden: Optional[ResetFn] = None,
    merge_calls: Optional[bool] = None,
    monitor_state_grads: bool = False,
) -> Engine:
    """Create a trainer for recurrent models with truncated backpropagation through time, TBPTT(k1, k2).

    A drop-in for ``ignite.contrib.engines.create_supervised_tbptt_trainer``: the same arguments, model
    protocol and events. Each batch ``(x, y)`` is cut along ``dim`` into chunks of ``k1 = tbtt_step`` steps
    (the last may be shorter). After every chunk the optimizer steps, with the gradient of that chunk's
    loss backpropagated through the last ``k2`` steps (the chunk and up to ``k2 - k1`` steps before it, see
    ``docs/contract.md``). With ``k2 == tbtt_step`` (the default) this is exactly Ignite's trainer.

    Beyond Ignite's trainer:

    - ``k2 > tbtt_step`` with two exact ways to handle the overlap: ``"recompute"`` re-runs the window under
      the current parameters (any model, ``k2 / k1`` times the forward work); ``"retain"`` keeps the graphs
      and runs every step forward once.
    - ``engine.state.time_iteration`` counts chunks, so ``Tbptt_Events.TIME_ITERATION_COMPLETED(every=N)``
      and chunk-level logging work; during chunk events ``engine.state.chunk`` is the running
      :class:`~ignite_tbptt.schedule.Chunk` (index, time span, window start), ``engine.state.num_chunks``
      their count in the batch, ``engine.state.chunk_weight`` the number of (step, sample) pairs its loss
      averages, and ``engine.state.output`` the chunk's loss as a detached tensor.
    - ``Tbptt_Events.GRADIENTS_COMPUTED`` fires between the backward pass and the optimizer step (gradients
      unscaled and averaged across processes), so handlers can inspect or clip them.
    - The batch output is the mean of the chunk losses weighted by their valid steps, converted to a float
      once per batch. ``output_transform(x, y, y_pred, loss)`` replaces it, as in ``create_supervised_trainer``.
    - A batch may be ``(x, y, sequence_info)`` with per-sample ``"lengths"``/``"mask"`` (padding) and
      ``"resets"`` (a sample starts a new sequence); see :mod:`ignite_tbptt.sequences`.
    - ``model_fn(model, x, hidden)`` adapts models with other call signatures; ``hidden`` is ``None`` on
      the first chunk. The hidden state may be any nesting of tuples, lists, dicts and namedtuples.
    - Under ``ignite.distributed`` with several processes and a plain model, gradients are averaged across
      processes before every optimizer step, each process weighted by its valid (step, sample) pairs, so that
      padded or masked shards train as one process on the whole batch; a ``DistributedDataParallel`` model
      reduces its own (an unweighted mean).
    - ``engine.terminate()`` or ``terminate_epoch()`` in a chunk handler stops before the next chunk starts.
    - Random chunk lengths (:class:`~ignite_tbptt.schedule.RandomLength`), unbiased truncation
      (``k2=``:class:`~ignite_tbptt.schedule.ARTBP`), burn-in (``burn_in``), skipped non-finite updates
      (``skip_nonfinite``) and a check that the model passes its state on (``check_state``).
    - Batches from :class:`~ignite_tbptt.data.StreamBatches` carry their stream position; with carried state a
      batch that does not continue the stream is refused.

    Args:
        model: the recurrent model: ``model(x)`` then ``model(x, hidden)``, returning ``(y_pred, hidden)``.
        optimizer: the optimizer, stepped once per chunk (or per ``gradient_accumulation_steps`` chunks).
        loss_fn: ``loss_fn(y_pred, y)`` over one chunk, returning a scalar tensor.
        tbtt_step: ``k1``, the number of time steps per chunk and optimizer update, or a
            :class:`~ignite_tbptt.schedule.RandomLength` (AWD-LSTM's random lengths around its ``bptt``, each
            update's learning rate scaled by ``length / bptt``; its draws are part of ``state_dict()``).
        dim: the time axis of ``x``, ``y`` and ``y_pred``.
        device: where ``prepare_batch`` moves each chunk; the model is not moved.
        non_blocking: passed to ``prepare_batch``.
        prepare_batch: ``prepare_batch((x_chunk, y_chunk), device, non_blocking) -> (x, y)``, called once per
            chunk, so a long sequence can stay on the host and reach the device a chunk at a time.
        k2: how many steps each update backpropagates; ``None`` means ``tbtt_step`` (a ``RandomLength``'s
            ``bptt``), and ``k2 - bptt`` is then the fixed overlap before every chunk. Or
            :class:`~ignite_tbptt.schedule.ARTBP`: random truncation at chunk boundaries with compensation factors,
            whose expected gradient is the gradient through the whole stream (docs/contract.md, "Unbiased truncation"); its
            draws are part of ``state_dict()`` and ``engine.state.window_lengths`` counts the windows. Or
            :class:`~ignite_tbptt.adaptive.AdaptiveK2`: a window re-estimated from the gradient's measured decay every
            ``every`` updates, ``k2 = k1 + K - 1`` with ``K`` the truncation whose bias bound is within ``delta``
            (its window and estimates are part of ``state_dict()``; ``trainer.adaptive_k2`` is the trainer's copy).
            ``engine.state.k2`` is the current batch's window in steps (``None`` under ``ARTBP``).
        overlap: ``"recompute"`` or ``"retain"``: how the ``k2 - k1`` overlap steps are differentiated.
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``.
        output_transform: ``output_transform(x, y, y_pred, loss)`` gives ``engine.state.output`` per batch.
        carry_state: carry the hidden state, and for ``k2 > tbtt_step`` the backprop window, from one batch
            to the next, as if the batches were one long stream. The stream starts afresh at every epoch, when
            the batch size changes (with a warning), and whenever the :func:`reset_state` handler runs. The
            carried state is ``engine.carried_state`` and is part of ``engine.state_dict()``. Batches that carry
            their stream position (:class:`~ignite_tbptt.data.StreamBatches`) must continue the stream, or a
            ``ValueError`` says which step was expected; a ``DataLoader`` whose sampler shuffles warns.
        deterministic: use Ignite's ``DeterministicEngine``, for exact resumption mid-epoch.
        amp_mode: ``"amp"`` runs forward and loss under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU).
        scaler: ``True`` or a ``torch.amp.GradScaler`` to scale the loss (with ``amp_mode="amp"``).
        gradient_accumulation_steps: chunks whose gradients add up before an optimizer step; each chunk's
            loss is divided by it, as in Ignite's ``create_supervised_trainer``.
        clip_grad_norm: clip the gradients' total norm to this value before each step (after the
            ``GRADIENTS_COMPUTED`` handlers); the norm before clipping is ``engine.state.grad_norm``.
        hidden_batch_dim: the batch axis of the hidden-state tensors (``-2`` fits ``nn.RNN``/``GRU``/``LSTM``
            and the cells), used for per-sample resets, padding and burn-in: one int for every leaf, or a
            structure of ints matching the hidden state (``{"ssm": 0, "conv": 0}``). A batch with sequence
            information checks it at its first chunk, before any update; where a leaf has the batch's size at
            several axes, a probe that changes one sample's input finds which (or the check asks for it).
            See :mod:`ignite_tbptt.state`.
        checkpoint_every: memory-efficient windows for very long ``k2``: run each window in segments of at
            most this many steps under activation checkpointing (Gruslys et al. 2016), keeping one state per
            segment and rebuilding a segment's activations during the backward pass. About ``sqrt(k2)``
            balances the two; the gradients are the same. ``None`` keeps every activation of the window.
        check_state: run :func:`~ignite_tbptt.checks.check_state_passing` on the first batch longer than one chunk,
            before any update: an ``AssertionError`` if the model ignores the state it is given or does not
            continue from it. It costs two forward passes over that batch, once.
        burn_in: warm-up steps (docs/contract.md, "Burn-in"): for every sample, its first ``burn_in`` valid steps after its
            state starts afresh (a fresh stream, ``reset_state``, a per-sample reset) run forward and build the
            state, but score nothing and take no gradient; the state after them is held constant, as a window
            start is. Spans where every sample warms up run under ``torch.no_grad()``.
        skip_nonfinite: skip the optimizer step of an update whose loss or gradients are not finite, so that
            the parameters and the optimizer state stay as they were (a ``GradScaler``, if given, already does
            this; its own inf check is reused). Skips are counted in ``engine.state.skipped_updates``, with a
            warning at the first. One host read per update; off by default.
        reset_hidden: ``reset_hidden(hidden, keep) -> hidden``: how a sample starts afresh at a per-sample reset
            (``keep`` a ``(B,)`` bool tensor, ``False`` for the samples to reset), for a model whose fresh state
            is not zeros. ``None``: zeros, written with ``torch.where`` so that a non-finite state is cleared.
            Padding of a fresh stream holds a sample at the state it gives too.
        merge_calls: with ``overlap="recompute"``, whether to re-run each window in as few model calls as its sequence
            information allows, instead of in the calls the forward pass made (each chunk, cut where a later window
            starts). Merged is the same gradient only for a model whose output does not depend on where the stream
            is cut into calls (``nn.RNN``/``GRU``/``LSTM`` and their cells; a Transformer-XL memory does depend),
            and faster for fused kernels at small ``k1``. ``None`` (default): the trainer finds out, once, at the
            first window that merging would change: it runs that window both ways (no backward pass) with
            dropout off, at the current parameters and at perturbed ones, and merges from then on if outputs and
            final state agree within the dtype's tolerance (a model with batch norm keeps the calls). The answer
            is ``engine.state.merge_calls`` (``None`` until then), with a log line. ``True`` or ``False`` forces it.
        monitor_state_grads: with ``overlap="retain"``, after every update ``engine.state.state_grad_norms`` is a
            1-D tensor on the model's device: entry ``j`` the norm (over the batch and the state's floating leaves)
            of the update's state gradient at the start of the chunk ``j`` chunks back, ``j = 0`` the update's own
            chunk, down to the window start (held constant: its entry is the gradient the truncation drops). The
            backward pass computes these gradients anyway; the norms cost one small reduction per boundary and no
            host read (empty where the update chained through no boundary). For Ignite's loggers:
            ``OutputHandler(tag, state_attributes=["state_grad_norms"])``.

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
        ...     model, torch.optim.Adam(model.parameters()), torch.nn.MSELoss(), tbtt_step=5, k2=10,
        ...     clip_grad_norm=1.0,
        ... )
        >>> x = torch.randn(50, 4, 1)  # (time, batch, features)
        >>> state = trainer.run([(x, x.roll(1, 0))], max_epochs=2)
        >>> state.time_iteration
        20
    """
    check_window_kind(k2)
    step = supervised_tbptt_training_step(
        model, optimizer, loss_fn, tbtt_step, k2, overlap, dim, device, non_blocking, prepare_batch,
        model_fn, output_transform, carry_state, amp_mode, scaler, gradient_accumulation_steps, clip_grad_norm,
        hidden_batch_dim, checkpoint_every, skip_nonfinite, check_state, burn_in, reset_hidden, merge_calls,
        monitor_state_grads,
    )
    engine = tbptt_engine(step, carry_state, DeterministicTbpttEngine if deterministic else TbpttEngine)
    adaptive = engine.adaptive_k2 = step.adaptive_k2  # type: ignore[attr-defined]
    # What a checkpoint must agree on to be loaded (the options that shape the stream and what is saved of it).
    engine.options = options_of(  # type: ignore[attr-defined]
        tbtt_step=tbtt_step, k2=k2, overlap=overlap, dim=dim, carry_state=carry_state, burn_in=burn_in,
        gradient_accumulation_steps=gradient_accumulation_steps, deterministic=deterministic,
    )
    setattr(engine.state, K2_ATTR, initial_k2(tbtt_step, k2, adaptive))
    if overlap == "recompute":
        setattr(engine.state, MERGE_CALLS_ATTR, merge_calls)
    if skip_nonfinite:
        count_skipped_updates(engine)
    if isinstance(k2, ARTBP):
        count_window_lengths(engine)
    if step.burn_in_tally is not None:  # type: ignore[attr-defined]
        engine.add_event_handler(Events.EPOCH_COMPLETED, step.burn_in_tally.check)  # type: ignore[attr-defined]
    return engine
