"""A backprop window that adapts during training: ``k2=AdaptiveK2(delta, ...)``.

Every ``every`` updates the trainer measures, on the batch it is about to train on, how fast the gradient decays
with the lag (:func:`~ignite_tbptt.horizon.gradient_horizon`), and takes the shortest truncation whose bias
bound ``beta**K`` is within ``delta`` (Aicher, Foti and Fox, UAI 2019): ``K = clamp(ceil(log delta / log beta),
k_min, k_max)``. Every loss term then backpropagates through at least ``K`` steps, the first step of a chunk
too, so the window is ``k2 = k1 + K - 1``. How a changed window enters the schedule is
:func:`~ignite_tbptt.schedule.adaptive_plan`'s business; this module decides ``K``.
"""

import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ignite_tbptt.horizon import GradientHorizon, gradient_horizon
from ignite_tbptt.schedule import check_positive_int

__all__ = ["ADAPTIVE_K2_KEY", "AdaptiveK2"]

#: The key of an ``AdaptiveK2``'s state (its window and estimates) in the trainer's ``state_dict()``.
ADAPTIVE_K2_KEY = "tbptt_adaptive_k2"

_NO_DECAY = "gradient_horizon: the gradient norms do not decay geometrically"


class AdaptiveK2:
    """``k2=AdaptiveK2(delta, k_max=...)``: a backprop window re-estimated from the gradient's decay during training.

    At the start of a batch, once ``every`` or more updates (chunks) have passed since the last estimate (and at
    the first batch where ``initial`` is ``None``), the trainer measures the gradient's decay ``beta`` on that
    batch's ``x`` and ``y`` with :func:`~ignite_tbptt.horizon.gradient_horizon` over lags ``0..max_lag``, from
    the carried state where there is one, with the trainer's ``loss_fn``, ``model_fn``, ``dim``,
    ``hidden_batch_dim`` and ``reset_hidden`` (the batch's resets, padding and burn-in are not applied to the
    measurement). Then

        ``K = clamp(ceil(log(delta) / log(beta)), k_min, k_max)``,  the window ``k2 = k1 + K - 1``,

    so that every loss term, the first step of a chunk too, backpropagates through at least ``K`` steps, whose
    bias bound ``beta**K`` is at most ``delta``. Where no geometric decay was measured (``beta >= 1``, or nothing
    to fit), ``K = k_max``, with a warning the first time. A batch shorter than ``max_lag + 1`` steps is not
    measured on: the estimate waits for the next batch.

    The trainer deep-copies it (two trainers never share one); the copy's window and estimates are part of the
    trainer's ``state_dict()``, and ``engine.state.k2`` is the window of the current batch in steps. The window
    changes only between batches: with ``carry_state=True`` an estimate applies from the next batch (the plan
    of a batch, made at its start, already provides for the next batch's windows), and where a batch starts a
    fresh stream, from that batch. See :func:`~ignite_tbptt.schedule.adaptive_plan` for the windows at a change.

    Args:
        delta: the tolerable relative bias of the truncated gradient, in ``(0, 1)``.
        every: re-estimate once this many updates have passed since the last estimate.
        k_min: the least ``K``, ``>= 1``.
        k_max: the largest ``K``: it bounds the window, and so memory in ``overlap="retain"``.
        max_lag: the lags measured, ``0..max_lag`` (default ``k_max``); a batch needs ``max_lag + 1`` steps.
        initial: ``K`` until the first estimate, which then runs after ``every`` updates; ``None``: estimate at
            the first batch.

    Attributes (of the trainer's copy, ``trainer.adaptive_k2``):
        K: the latest ``K`` (``None`` before the first); ``horizon``: the latest
        :class:`~ignite_tbptt.horizon.GradientHorizon` (not saved); ``history``: ``(update, K, beta)`` per estimate.

    Example:
        >>> from ignite_tbptt import create_supervised_tbptt_trainer
        >>> model = torch.nn.RNN(1, 4)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=5,
        ...     k2=AdaptiveK2(0.1, every=8, k_max=20), carry_state=True,
        ... )
        >>> x, y = torch.randn(40, 2, 1), torch.randn(40, 2, 4)
        >>> state = trainer.run([(x, y)], max_epochs=2)
        >>> state.k2 == 5 + trainer.adaptive_k2.K - 1, len(trainer.adaptive_k2.history)
        (True, 2)
    """

    def __init__(
        self, delta: float, *, every: int = 100, k_min: int = 1, k_max: int, max_lag: Optional[int] = None,
        initial: Optional[int] = None,
    ) -> None:
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
            raise TypeError(f"AdaptiveK2: delta must be a float in (0, 1), got {type(delta).__name__} ({delta!r})")
        if not 0 < delta < 1:
            raise ValueError(f"AdaptiveK2: delta, the tolerable relative bias, must be in (0, 1), got {delta!r}")
        for name, value in (("every", every), ("k_min", k_min), ("k_max", k_max)):
            check_positive_int(f"AdaptiveK2: {name}", value)
        if k_min > k_max:
            raise ValueError(f"AdaptiveK2: k_min ({k_min}) must be <= k_max ({k_max})")
        max_lag = k_max if max_lag is None else check_positive_int("AdaptiveK2: max_lag", max_lag)
        if initial is not None and not k_min <= check_positive_int("AdaptiveK2: initial", initial) <= k_max:
            raise ValueError(f"AdaptiveK2: initial ({initial}) must lie in [k_min, k_max] = [{k_min}, {k_max}]")
        self.delta, self.every, self.k_min, self.k_max = float(delta), every, k_min, k_max
        self.max_lag, self.initial = max_lag, initial
        self.K: Optional[int] = initial
        self.last_at: Optional[int] = None  # the update count at the last estimate
        self.history: List[Tuple[int, int, float]] = []
        self.horizon: Optional[GradientHorizon] = None
        self._warned = False

    def __repr__(self) -> str:
        return (f"AdaptiveK2(delta={self.delta}, every={self.every}, k_min={self.k_min}, k_max={self.k_max}, "
                f"max_lag={self.max_lag}, initial={self.initial})")

    def due(self, updates: int) -> bool:
        """Whether an estimate is due at a batch start after ``updates`` updates (chunks) of the run."""
        if self.last_at is None:
            return self.K is None or updates >= self.every
        return updates - self.last_at >= self.every

    def choose(self, horizon: GradientHorizon) -> int:
        """``K`` for a measured horizon: ``clamp(horizon.suggest(delta), k_min, k_max)``, or ``k_max`` where no
        geometric decay was measured (with a warning the first time)."""
        if not horizon.decay < 1:  # >= 1 or nan
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"AdaptiveK2: no geometric decay of the gradient over lags 0..{self.max_lag} (beta = "
                    f"{horizon.decay:.4g}): the bias bound gives no K, so K = k_max = {self.k_max}. Later such "
                    "estimates do the same without a warning",
                    UserWarning, stacklevel=3,
                )
            return self.k_max
        return min(self.k_max, max(self.k_min, horizon.suggest(self.delta)))

    def estimate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, updates: int, **horizon_kwargs: Any
    ) -> Optional[int]:
        """Measure on ``(x, y)`` (:func:`~ignite_tbptt.horizon.gradient_horizon` with ``horizon_kwargs``), set and
        return the new ``K``; ``None`` where the batch is too short to measure (the estimate stays due)."""
        dim = horizon_kwargs.get("dim", 0)
        if x.shape[dim] < self.max_lag + 1:
            if self.K is None:
                raise ValueError(
                    f"AdaptiveK2: the first batch has {x.shape[dim]} time steps, and measuring lags 0..{self.max_lag} "
                    f"needs max_lag + 1 = {self.max_lag + 1}; pass a smaller max_lag, or initial=K to train with until "
                    "a batch long enough comes"
                )
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DECAY)  # said once, by choose()
            self.horizon = gradient_horizon(model, x, y, loss_fn, max_lag=self.max_lag, **horizon_kwargs)
        self.K, self.last_at = self.choose(self.horizon), updates
        self.history.append((updates, self.K, self.horizon.decay))
        return self.K

    def state_dict(self) -> Dict[str, Any]:
        return {"K": self.K, "last_at": self.last_at, "history": list(self.history), "warned": self._warned}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.K, self.last_at = saved["K"], saved["last_at"]
        self.history = [tuple(h) for h in saved["history"]]  # type: ignore[misc]
        self._warned = saved.get("warned", False)
