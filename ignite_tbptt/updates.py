"""What an optimizer update needs beyond ``optimizer.step()``: the finiteness checks of ``skip_nonfinite``, its
count of skipped updates, the scaled learning rate of random chunk lengths, the tally of random windows, and the
tally that finds an epoch of burn-in only."""

import collections
import contextlib
import warnings
from typing import Any, Callable, Iterator, List, Tuple

import torch
from ignite.engine import Engine, Events

__all__ = [
    "SKIPPED_UPDATES_ATTR", "WINDOW_LENGTHS_ATTR", "AccumulationGroup", "BurnInTally", "all_finite", "count_skipped_updates", "count_window_lengths",
    "found_inf", "keep_per_run", "scaled_learning_rate", "scaler_step",
]

#: The ``engine.state`` attribute that counts the updates ``skip_nonfinite`` skipped.
SKIPPED_UPDATES_ATTR = "skipped_updates"
#: The ``engine.state`` attribute that counts the updates by the length of their backprop window (``ARTBP``).
WINDOW_LENGTHS_ATTR = "window_lengths"


def all_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A bool tensor: whether every element of every tensor is finite (no host read).

    It checks their sum, one reduction per tensor: a NaN or an infinity makes the sum non-finite, and summed in
    float32 or wider, finite elements overflow it only beyond about 1e29 each, far past any gradient worth a
    step. ``isfinite().all()`` per tensor costs 15 times as much (340 against 22 us for an LSTM(256)'s gradients
    on a 2-core CPU).
    """
    if not tensors:
        return torch.tensor(True)
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.stack([s.to(sums[0].device) for s in sums]).sum().isfinite()


def found_inf(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The ``GradScaler``'s own inf check of this step's gradients (made by ``unscale_``), over all devices.

    Reused instead of a second check; the scaler keeps it per optimizer until ``update()``.
    """
    found = list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
    return torch.stack([f.to(found[0].device) for f in found]).sum() > 0


def scaler_step(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer, factor: float, skip_nonfinite: bool) -> bool:
    """Step the optimizer through the ``GradScaler`` (at the learning rate times ``factor``) and update the scale;
    return whether the step was made.

    With ``skip_nonfinite`` the step is made only where every gradient is finite now, after the
    ``GRADIENTS_COMPUTED`` handlers and the clipping: the scaler's own inf check ran at ``unscale_``, before
    them, so a non-finite gradient a handler wrote would be applied (and every later update skipped, on NaN
    parameters). One or two host reads per update. The scale still moves on the scaler's own check.
    """
    made = True
    if skip_nonfinite:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        made = not bool(found_inf(scaler, optimizer)) and bool(all_finite(grads))
    if made:
        with scaled_learning_rate(optimizer, factor):
            scaler.step(optimizer)  # without skip_nonfinite, skips the step itself where its inf check found one
    scaler.update()
    return made


@contextlib.contextmanager
def scaled_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Every parameter group's learning rate times ``factor`` inside the block, and as it was after it.

    Schedulers and handlers set and read the rate between steps, so they never see the scaled one.
    """
    if factor == 1.0:
        yield
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr


def keep_per_run(engine: Engine, attr: str, fresh: Callable[[], Any]) -> None:
    """Keep ``engine.state.<attr>``: ``fresh()`` at every fresh run, and saved in ``state_dict()``."""
    setattr(engine.state, attr, fresh())
    engine.state_dict_user_keys.append(attr)

    @engine.on(Events.STARTED)
    def restart(engine: Engine) -> None:
        if engine.state.iteration == 0:  # not a run resumed from a state_dict
            setattr(engine.state, attr, fresh())


def count_skipped_updates(engine: Engine) -> None:
    """Keep ``engine.state.skipped_updates``: 0 at every fresh run, and saved in ``state_dict()``."""
    keep_per_run(engine, SKIPPED_UPDATES_ATTR, int)


def count_window_lengths(engine: Engine) -> None:
    """Keep ``engine.state.window_lengths``, a ``Counter`` of backprop window lengths in steps over the run's
    updates (random with ``k2=ARTBP(...)``), empty at every fresh run and saved in ``state_dict()``."""
    keep_per_run(engine, WINDOW_LENGTHS_ATTR, collections.Counter)


class BurnInTally:
    """The (step, sample) pairs an epoch scored under ``burn_in``, and its longest sequence: an epoch in which every
    step was burn-in trained on nothing, which the trainer says once, with the numbers, instead of silently."""

    def __init__(self, burn_in: int) -> None:
        self.burn_in, self.scored, self.longest, self.warned = burn_in, 0, 0, False

    def add(self, scored: int, length: int) -> None:
        """A batch that scored ``scored`` pairs, its stream now ``length`` steps long."""
        self.scored += scored
        self.longest = max(self.longest, length)

    def check(self, engine: Any) -> None:
        """At an epoch's end: warn (once per trainer) if the epoch scored nothing, then start the next tally."""
        if not self.scored and self.longest and not self.warned:
            self.warned = True
            warnings.warn(
                f"burn_in={self.burn_in} is at least as long as every sequence of epoch {engine.state.epoch}, whose "
                f"longest ran {self.longest} steps: every step was burn-in, so no loss was scored, no update was made "
                "and the output is nan. Lower burn_in below the length of the sequences (or carry the state across "
                "batches with carry_state=True)",
                stacklevel=2,
            )
        self.scored, self.longest = 0, 0


class AccumulationGroup:
    """The chunks whose gradients add up before one optimizer step (``gradient_accumulation_steps``).

    It keeps what the step needs to know of them: how many loss terms they backpropagated (the weight of the
    update, 0 when nothing was valid), their lengths (random chunk lengths scale the rate by them), and, with
    ``track_finite``, whether all their losses were finite, as one device tensor read once per update.

    >>> group = AccumulationGroup(accumulate=2, track_finite=True)
    >>> group.add(torch.tensor(3.0), weight=6, length=2).item()  # the loss divided by the group's size
    1.5
    >>> weight, lengths, finite = group.take()
    >>> weight, lengths, bool(finite), group.weight
    (6, [2], True, 0)
    """

    def __init__(self, accumulate: int, track_finite: bool) -> None:
        self.accumulate, self.track_finite = accumulate, track_finite
        self.weight, self.lengths, self.finite = 0, [], None

    def add(self, loss: torch.Tensor, weight: int, length: int) -> torch.Tensor:
        """Count a chunk's loss of ``weight`` terms into the group; the loss to backpropagate."""
        self.weight += weight
        self.lengths.append(length)
        if self.track_finite:
            ok = torch.isfinite(loss.detach())
            self.finite = ok if self.finite is None else self.finite & ok
        return loss / self.accumulate if self.accumulate > 1 else loss

    def take(self) -> Tuple[int, List[int], Any]:
        """The group's weight, chunk lengths and finiteness (``None`` untracked), and a fresh group after it."""
        taken = self.weight, self.lengths, self.finite
        self.weight, self.lengths, self.finite = 0, [], None
        return taken
