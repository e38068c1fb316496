"""A backprop window that adapts during training: ``k2=AdaptiveK2(delta, ...)``.

Every ``every`` updates the trainer measures, on the batch it is about to train on, how fast the gradient decays
with the lag (:func:`~ignite_tbptt.horizon.gradient_horizon`), and takes the shortest truncation whose estimated
relative bias is within ``delta`` (Aicher, Foti and Fox, UAI 2019: the measured norms plus a geometric tail,
:meth:`~ignite_tbptt.horizon.GradientHorizon.suggest`), clamped to ``[k_min, k_max]``. Every loss term then
backpropagates through at least ``K`` steps, the first step of a chunk too, so the window is ``k2 = k1 + K - 1``.
How a changed window enters the schedule is :func:`~ignite_tbptt.schedule.adaptive_plan`'s business; this module
decides ``K``.
"""

import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ignite_tbptt.horizon import DEFAULT_MAX_LAG, GradientHorizon, gradient_horizon
from ignite_tbptt.schedule import ARTBP, check_positive_int
from ignite_tbptt.sequences import SequenceInfo

__all__ = ["ADAPTIVE_K2_KEY", "AdaptiveK2", "check_window_kind"]

#: The key of an ``AdaptiveK2``'s state (its window and estimates) in the trainer's ``state_dict()``.
ADAPTIVE_K2_KEY = "tbptt_adaptive_k2"

#: ``K``'s upper clamp where none is given: the largest Aicher et al. allow their language models.
DEFAULT_K_MAX = 300

_NO_DECAY = "gradient_horizon: the gradient norms do not decay geometrically"


class AdaptiveK2:
    """``k2=AdaptiveK2(delta)``: a backprop window re-estimated from the gradient's decay during training.

    At the start of a batch, once ``every`` or more updates (chunks) have passed since the last estimate (and at
    the first batch where ``initial`` is ``None``), the trainer measures the gradient norms ``phi_k`` on that
    batch's ``x`` and ``y`` with :func:`~ignite_tbptt.horizon.gradient_horizon` over lags ``0..max_lag``, in
    train mode (``train_mode``), averaged over the batch's samples (and over ``batches`` consecutive batches),
    from the carried state where there is one, with the trainer's ``loss_fn``, ``model_fn``, ``dim``,
    ``hidden_batch_dim`` and ``reset_hidden``, and the batch's resets, padding, masks and burn-in targets
    (``horizon_marks``; the gradient's cut at the end of a burn-in is not applied). Then

        ``K = clamp(horizon.suggest(delta), k_min, k_max)``,  the window ``k2 = k1 + K - 1``,

    ``suggest`` being the smallest ``K`` whose estimated relative bias (the measured ``phi`` up to 90% of
    ``max_lag``, a geometric tail beyond, over a lower bound on the gradient's mass) is at most ``delta``; it may
    lie beyond ``max_lag``. A clamp warns with the ``K`` the estimate wanted, and where nothing can be estimated
    (no geometric decay, no gradient at the last step, non-finite norms, too few lags) ``K = k_max`` and a
    warning says why; each kind of warning is given once per trainer. A batch shorter than ``max_lag + 1``
    steps, or one where no sample's last target counts, is not measured on: the estimate waits for the next batch.

    The trainer deep-copies it (two trainers never share one); the copy's window and estimates are part of the
    trainer's ``state_dict()``, and ``engine.state.k2`` is the window of the current batch in steps. The window
    changes only between batches: with ``carry_state=True`` an estimate applies from the next batch (the plan
    of a batch, made at its start, already provides for the next batch's windows), and where a batch starts a
    fresh stream, from that batch. See :func:`~ignite_tbptt.schedule.adaptive_plan` for the windows at a change.

    Args:
        delta: the tolerable relative bias of the truncated gradient, in ``(0, 1)``.
        every: re-estimate once this many updates have passed since the last estimate.
        k_min: the least ``K``, ``>= 1``.
        k_max: the largest ``K`` (default 300, Aicher et al.'s clamp): it bounds the window, and so memory in
            ``overlap="retain"``.
        max_lag: the lags measured, ``0..max_lag`` (default 100); a batch needs ``max_lag + 1`` steps.
        initial: ``K`` until the first estimate, which then runs after ``every`` updates; ``None``: estimate at
            the first batch.
        train_mode: measure with the model in train mode (``True``, as Aicher et al.) or eval mode.
        batches: an estimate averages ``phi`` over this many consecutive batches (each a measurement, Aicher et
            al. average 5); until the last of them, each sets ``K`` from the mean so far.

    Attributes (of the trainer's copy, ``trainer.adaptive_k2``):
        K: the latest ``K`` (``None`` before the first); ``horizon``: the latest
        :class:`~ignite_tbptt.horizon.GradientHorizon` (not saved); ``history``: ``(update, K, beta)`` per estimate.

    Example:
        >>> from ignite_tbptt import create_supervised_tbptt_trainer
        >>> model = torch.nn.RNN(1, 4)
        >>> trainer = create_supervised_tbptt_trainer(
        ...     model, torch.optim.SGD(model.parameters(), 0.1), torch.nn.MSELoss(), tbtt_step=5,
        ...     k2=AdaptiveK2(0.1, every=8, max_lag=20), carry_state=True,
        ... )
        >>> x, y = torch.randn(40, 2, 1), torch.randn(40, 2, 4)
        >>> state = trainer.run([(x, y)], max_epochs=2)
        >>> state.k2 == 5 + trainer.adaptive_k2.K - 1, len(trainer.adaptive_k2.history)
        (True, 2)
    """

    def __init__(
        self, delta: float, *, every: int = 100, k_min: int = 1, k_max: int = DEFAULT_K_MAX,
        max_lag: int = DEFAULT_MAX_LAG, initial: Optional[int] = None, train_mode: bool = True, batches: int = 1,
    ) -> None:
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
            raise TypeError(f"AdaptiveK2: delta must be a float in (0, 1), got {type(delta).__name__} ({delta!r})")
        if not 0 < delta < 1:
            raise ValueError(f"AdaptiveK2: delta, the tolerable relative bias, must be in (0, 1), got {delta!r}")
        positive = (("every", every), ("k_min", k_min), ("k_max", k_max), ("max_lag", max_lag), ("batches", batches))
        for name, value in positive:
            check_positive_int(f"AdaptiveK2: {name}", value)
        if k_min > k_max:
            raise ValueError(f"AdaptiveK2: k_min ({k_min}) must be <= k_max ({k_max})")
        if initial is not None and not k_min <= check_positive_int("AdaptiveK2: initial", initial) <= k_max:
            raise ValueError(f"AdaptiveK2: initial ({initial}) must lie in [k_min, k_max] = [{k_min}, {k_max}]")
        if not isinstance(train_mode, bool):
            raise TypeError(f"AdaptiveK2: train_mode must be a bool, got {type(train_mode).__name__}")
        self.delta, self.every, self.k_min, self.k_max = float(delta), every, k_min, k_max
        self.max_lag, self.initial, self.train_mode, self.batches = max_lag, initial, train_mode, batches
        self.K: Optional[int] = initial
        self.last_at: Optional[int] = None  # the update count at the last estimate
        self.history: List[Tuple[int, int, float]] = []
        self.horizon: Optional[GradientHorizon] = None
        self._warned: List[str] = []  # the kinds of warning given: each once
        self._pending: List[List[float]] = []  # the norms of the batches measured for the estimate under way

    def __repr__(self) -> str:
        return (f"AdaptiveK2(delta={self.delta}, every={self.every}, k_min={self.k_min}, k_max={self.k_max}, "
                f"max_lag={self.max_lag}, initial={self.initial}, train_mode={self.train_mode}, "
                f"batches={self.batches})")

    def due(self, updates: int) -> bool:
        """Whether an estimate is due at a batch start after ``updates`` updates (chunks) of the run."""
        if self._pending:  # an estimate over several batches, under way
            return True
        if self.last_at is None:
            return self.K is None or updates >= self.every
        return updates - self.last_at >= self.every

    def choose(self, horizon: GradientHorizon) -> int:
        """``K`` for a measured horizon: ``clamp(horizon.suggest(delta), k_min, k_max)``, with a warning at a clamp;
        ``k_max`` where the horizon gives no ``K``, with a warning that says why. Each kind warns once."""
        problem = horizon.problem()
        if problem is not None:
            self._warn_once("unmeasurable", f"AdaptiveK2: no K can be estimated from this batch: {problem}. K = "
                            f"k_max = {self.k_max}; later such estimates do the same without a warning")
            return self.k_max
        wanted = horizon.suggest(self.delta)
        K = min(self.k_max, max(self.k_min, wanted))
        if K != wanted:
            bound = "k_max" if K == self.k_max else "k_min"
            cost = " (the truncated gradient then has a larger bias)" if bound == "k_max" else ""
            self._warn_once(bound, f"AdaptiveK2: the estimate wants K = {wanted} for delta = {self.delta}, clamped to "
                            f"{bound} = {K}{cost}; later clamps to it are not warned about")
        return K

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.append(kind)
            warnings.warn(message, UserWarning, stacklevel=4)

    def estimate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, updates: int, **horizon_kwargs: Any
    ) -> Optional[int]:
        """Measure on ``(x, y)`` (:func:`~ignite_tbptt.horizon.gradient_horizon` with ``horizon_kwargs``), set and
        return the new ``K``; ``None`` where the batch is too short to measure or scores no target at its last
        step (the estimate stays due)."""
        dim = horizon_kwargs.get("dim", 0)
        why = self._not_measurable(x, dim, horizon_kwargs.get("padding"), horizon_kwargs.get("mask"))
        if why is not None:
            if self.K is None:
                raise ValueError(f"AdaptiveK2: the first batch {why}")
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DECAY)  # said once, by choose()
            measured = gradient_horizon(model, x, y, loss_fn, max_lag=self.max_lag, train_mode=self.train_mode,
                                        **horizon_kwargs)
        self._pending.append(measured.norms.tolist())
        # The mean of the batches measured so far: each one in turn sets K, the last one completes the estimate.
        self.horizon = GradientHorizon.from_norms(torch.tensor(self._pending, dtype=torch.float64).mean(0))
        self.K = self.choose(self.horizon)
        self.history.append((updates, self.K, self.horizon.decay))
        if len(self._pending) == self.batches:
            self.last_at, self._pending = updates, []
        return self.K

    def _not_measurable(
        self, x: torch.Tensor, dim: int, padding: Optional[torch.Tensor], mask: Optional[torch.Tensor]
    ) -> Optional[str]:
        """Why ``gradient_horizon`` cannot measure on this batch (and what to do at a first batch), or ``None``."""
        if x.shape[dim] < self.max_lag + 1:
            return (f"has {x.shape[dim]} time steps, and measuring lags 0..{self.max_lag} needs max_lag + 1 = "
                    f"{self.max_lag + 1}; pass a smaller max_lag, or initial=K to train with until a batch long "
                    "enough comes")
        if padding is None and mask is None:
            return None
        # gradient_horizon measures the last step's loss: it raises where no sample's target there counts.
        counted = torch.ones(x.shape[1 - dim], dtype=torch.bool)
        for marks, counts in ((padding, False), (mask, True)):
            if marks is not None:
                counted &= marks.select(dim, -1).cpu() == counts
        if not bool(counted.any()):
            return ("scores no target at its last step (padding, masked or burn-in for every sample), where the "
                    "gradient is measured; pass initial=K to train with until a batch that scores one there comes")
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {"K": self.K, "last_at": self.last_at, "history": list(self.history), "warned": list(self._warned),
                "pending": [list(norms) for norms in self._pending]}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.K, self.last_at = saved["K"], saved["last_at"]
        self.history = [tuple(h) for h in saved["history"]]  # type: ignore[misc]
        warned = saved.get("warned", [])
        self._warned = ["unmeasurable"] if warned is True else list(warned or [])  # a bool in earlier checkpoints
        self._pending = [list(norms) for norms in saved.get("pending", [])]


def horizon_marks(info: Optional[SequenceInfo], dim: int) -> Dict[str, Optional[torch.Tensor]]:
    """A batch's sequence information as :func:`~ignite_tbptt.horizon.gradient_horizon`'s ``resets``, ``padding``
    and ``mask``, in the layout of ``x``'s first two axes (``info`` is time-major; ``dim=1``: batch-first).

    The trainer holds a sample's state over every step that is not valid, padding from ``"lengths"`` and masked
    steps from ``"mask"`` alike: both are ``padding`` to the measurement. Burn-in targets score nothing, so the
    scored pairs are the ``mask``. The cut at a burn-in's end (the gradient held there, the state's value kept)
    is left out: ``gradient_horizon`` can only start a state afresh, which would change the values after it.

    >>> info = SequenceInfo(valid=torch.tensor([[True, True], [True, False]]), resets=None)
    >>> horizon_marks(info, dim=1)["padding"].int().tolist()  # (B, T)
    [[0, 0], [0, 1]]
    """
    if info is None:
        return {}
    layout = lambda t: t if t is None or dim == 0 else t.t()  # noqa: E731
    padding = None if info.valid is None else ~info.valid
    return {"resets": layout(info.resets), "padding": layout(padding), "mask": layout(info.scored)}


def check_window_kind(k2: Any) -> None:
    """Raise a ``TypeError`` that names every part where ``k2`` combines window kinds that cannot work together.

    ``k2`` is one window: an int, ``ARTBP(p)`` (random truncation) or ``AdaptiveK2(delta)`` (a window from the
    measured decay). Random truncation compensates the windows it draws, and the adaptive window sets them: a
    pair or list of both has no meaning the trainer could give it.

    >>> check_window_kind((ARTBP(0.1), AdaptiveK2(0.1)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: k2 takes one window kind, got a tuple of ARTBP and AdaptiveK2: ARTBP(p) draws ...; pass one of them
    """
    if isinstance(k2, (tuple, list, set)):
        kinds = [type(part).__name__ for part in k2]
        raise TypeError(
            f"k2 takes one window kind, got a {type(k2).__name__} of {' and '.join(kinds)}: ARTBP(p) draws random "
            "truncations and compensates them, AdaptiveK2(delta) sets the window from the measured decay; "
            "pass one of them"
        )
