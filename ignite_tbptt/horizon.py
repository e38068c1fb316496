"""How far back the gradient reaches: its decay with the lag, measured on one batch, for choosing ``k2``.

TBPTT with a window of ``k2`` steps drops every path of the gradient that runs back further than ``k2`` steps.
How much that costs depends on how fast the backpropagated gradient decays with the lag. Aicher, Foti and Fox
(UAI 2019, "Adaptively Truncating Backpropagation Through Time to Control Gradient Bias") measure that decay,
estimate the gradient mass a truncation drops from the measured norms and a geometric tail fitted to them,
``phi_k ~ c * beta**k``, and turn a tolerable relative bias ``delta`` into a truncation length.
:func:`gradient_horizon` does the measurement and the fit on one batch, :class:`GradientHorizon` the estimate;
the method is theirs, this code our own. The formulas it implements are stated in the docstrings.
"""

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt.batches import batch_size_of
from ignite_tbptt.sequences import masked_pair
from ignite_tbptt.state import BatchDims, ResetFn, StateProtocol, _batch_axis, detach_state, named_leaves
from ignite_tbptt.window import call_model, default_model_fn

__all__ = ["GradientHorizon", "gradient_horizon"]

Hidden = Any


class GradientHorizon:
    """What :func:`gradient_horizon` measured: the gradient norms by lag, their geometric tail, and the bias estimate.

    Attributes:
        norms: ``phi_k`` for ``k = 0..max_lag``, a 1-D ``float64`` tensor (see :func:`gradient_horizon`).
        decay: ``beta``, the fitted geometric decay rate per step: ``exp`` of the least-squares slope of
            ``log phi_k`` against ``k``. ``>= 1``: no geometric decay over the lags measured; ``0.0``: the
            gradient vanishes after lag 0; ``nan``: nothing to fit (every ``phi_k`` zero or not finite).
        scale: ``exp`` of the fit's intercept: the fitted ``phi_0`` (for the plot).
        tail_start: ``tau``, the last lag whose measured ``phi`` enters the estimate; the geometric tail
            ``phi_tau * beta**(k - tau)`` stands for the lags beyond it.
    """

    def __init__(self, norms: torch.Tensor, decay: float, scale: float, tail_start: Optional[int] = None) -> None:
        self.norms, self.decay, self.scale = norms, decay, scale
        self.tail_start = default_tail_start(len(norms) - 1) if tail_start is None else tail_start
        if not 0 <= self.tail_start < len(norms):
            raise ValueError(f"tail_start must lie in [0, max_lag] = [0, {len(norms) - 1}], got {self.tail_start}")
        self._dropped = _dropped_mass(norms, self.tail_start, decay)
        kept = torch.cat([norms.new_zeros(1), norms.cumsum(0)])  # kept[K] = phi_0 + ... + phi_{K-1}
        # The lower bound on the full gradient's mass: the best over K' of (mass kept) - (mass dropped).
        self.mass = float((kept[1:] - self._dropped[1:]).max())

    @classmethod
    def from_norms(cls, norms: torch.Tensor) -> "GradientHorizon":
        """The horizon of given norms ``phi_0..phi_max_lag`` (a 1-D float64 tensor), with ``beta`` fitted to them:
        for instance the mean of several batches' ``norms``, a steadier estimate than one batch's."""
        decay, scale = _fit_decay(norms)
        return cls(norms, decay, scale)

    def __repr__(self) -> str:
        return f"GradientHorizon(max_lag={len(self.norms) - 1}, decay={self.decay:.4g}, tail_start={self.tail_start})"

    def absolute_bias(self, K: int) -> float:
        """``E(K)``: the gradient mass that truncating after ``K`` steps drops, the measured ``phi_K..phi_tau``
        plus the geometric tail beyond ``tau`` (in units of ``phi``; see :func:`gradient_horizon`).

        ``inf`` where a tail is left and ``beta >= 1`` or ``nan``.
        """
        _check_lag(K)
        if K < len(self._dropped):
            return float(self._dropped[K])
        return _tail(float(self.norms[self.tail_start]), self.decay, K - self.tail_start)

    def relative_bias(self, K: int) -> float:
        """``delta(K) = E(K) / D``, the estimate of the relative bias of truncating after ``K`` steps.

        ``D`` (``mass``) is the lower bound on the full gradient's mass, ``max_K' (sum_{k < K'} phi_k - E(K'))``;
        ``inf`` where it is not positive (nothing was measured, or the tail is void).
        """
        dropped = self.absolute_bias(K)
        if not self.mass > 0:
            return math.inf
        return dropped / self.mass

    def problem(self) -> Optional[str]:
        """Why no bias estimate can be made from these norms, or ``None`` where one can."""
        if not bool(torch.isfinite(self.norms).all()):
            bad = (~torch.isfinite(self.norms)).nonzero().flatten().tolist()
            return (f"the gradient norms are not finite at lags {bad[:5]}{'...' if len(bad) > 5 else ''}: the loss or "
                    "the model overflowed on this batch")
        if not bool((self.norms > 0).any()):
            return ("the gradient of the last step's loss is zero at every lag: the loss does not depend on the "
                    "state (or no target of the last step counts)")
        if not self.decay < 1 and float(self.norms[self.tail_start]) > 0:
            return (f"no geometric decay was measured (decay beta = {self.decay:.4g}): the estimated bias does not "
                    "fall below delta for any K; measure over more lags (max_lag), or on a trained model")
        if not self.mass > 0:
            return (f"the {len(self.norms)} lags measured do not bound the gradient's mass from below (the estimated "
                    f"tail, decay beta = {self.decay:.4g}, outweighs the measured head): measure more lags (max_lag)")
        return None

    def suggest(self, delta: float) -> int:
        """The smallest ``K >= 1`` with ``relative_bias(K) <= delta``; beyond the lags measured, from the tail.

        Raises ``ValueError`` for ``delta`` outside ``(0, 1)``, and where no ``K`` is backed by the estimate:
        no geometric decay (``beta >= 1`` or ``nan`` with a tail left), or no gradient measured at all.
        """
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta, the tolerable relative bias, must be in (0, 1), got {delta!r}")
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)
        within = (self._dropped[1:] <= delta * self.mass).nonzero()
        if len(within):
            return int(within[0]) + 1
        # Beyond the measured lags the estimate is phi_tau * beta**(K - tau) / (1 - beta) / D: solve for K, then
        # settle on the defining property (the logarithms may land one off).
        phi_tau = float(self.norms[self.tail_start])
        steps = math.log(delta * self.mass * (1 - self.decay) / phi_tau) / math.log(self.decay)
        K = self.tail_start + max(1, math.ceil(steps))
        K = max(K, len(self._dropped))
        while K > len(self._dropped) and self.relative_bias(K - 1) <= delta:
            K -= 1
        while self.relative_bias(K) > delta:
            K += 1
        return K

    def plot(self, ax: Any = None) -> Any:
        """``phi_k`` against ``k`` on a log scale, with the fitted line ``scale * beta**k``; returns the axes.

        Imports matplotlib only here (and pyplot only where no ``ax`` is given).
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        lags = list(range(len(self.norms)))
        ax.semilogy(lags, self.norms.tolist(), "o", label=r"measured $\varphi_k$")
        if math.isfinite(self.decay) and self.decay > 0:
            ax.semilogy(lags, [self.scale * self.decay ** k for k in lags], "-", label=rf"fit, $\beta$ = {self.decay:.4g}")
        ax.set_xlabel("lag k (steps before the last)")
        ax.set_ylabel("gradient norm of the last step's loss")
        ax.legend()
        return ax


#: The lags measured where none are given: Aicher et al.'s window for synthetic tasks (they use 400 for language
#: models); the estimate extrapolates beyond it along the fitted tail.
DEFAULT_MAX_LAG = 100


def gradient_horizon(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    *,
    max_lag: int = DEFAULT_MAX_LAG,
    tbtt_step: Optional[int] = None,
    model_fn: Optional[Callable] = None,
    dim: int = 0,
    hidden_batch_dim: BatchDims = -2,
    hidden: Optional[Hidden] = None,
    reset_hidden: Optional[ResetFn] = None,
    resets: Optional[torch.Tensor] = None,
    padding: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    train_mode: bool = True,
) -> GradientHorizon:
    """Measure on one batch how the gradient decays with the lag, and estimate the bias of truncating it.

    **What is measured.** Let ``T`` be the length of ``x`` along ``dim``, ``s_t`` the hidden state that enters
    step ``t`` and ``L`` the loss of the last step alone: ``loss_fn`` on the last step's prediction and target,
    each a slice of length 1 along ``dim`` (so a loss written for chunks works). Then for ``k = 0..max_lag``

        ``phi_k = mean_b || d(B * L) / d s_{T-1-k} [b] ||``

    the gradient with respect to the state entering the step ``k`` steps before the last (``k = 0``: the state
    the last step starts from), its norm taken per sample ``b`` over all floating leaves of the state together
    (each leaf's batch axis from ``hidden_batch_dim``), then averaged over the ``B`` samples whose last target
    counts: the batch's samples are the independent estimates the average is over. ``loss_fn`` is taken to
    average over the batch, as Ignite's losses do, so the loss is multiplied by ``B`` and row ``b`` of the
    gradient is sample ``b``'s own. (For a loss that sums, the norms come out ``B`` times larger; the estimate
    does not depend on the scale.) The partial derivative holds the earlier states fixed: it is what
    backpropagation carries into ``s_{T-1-k}`` from the last step's loss.

    **Sequences.** ``resets``, ``padding`` and ``mask`` are bool tensors in the layout of ``x``'s first two axes
    (time and batch as ``dim`` says), as the trainer's batches carry them. A reset (``True``: the sample's state
    starts afresh before that step, from ``reset_hidden``) is applied as the trainer applies it, so no gradient
    crosses it; over padding (``True``) the state is held, as in the trainer, and a lag that starts in a
    sample's padding counts as ``0`` for it; ``mask`` (``False``: the target does not count) and padding at
    the last step leave that sample out of the loss. Where no sample's last target counts, nothing can be
    measured: ``ValueError``.

    **How.** The earlier ``T - max_lag - 1`` steps (if any) only warm the state up, under ``torch.no_grad``,
    in calls of ``tbtt_step`` steps (``None``: one call; one step per call where resets or padding are given),
    starting from ``hidden`` (``None``: the model's own start, ``model(x)``). The last ``max_lag + 1`` steps
    then run **one step per call**, each call's input state a fresh node of the graph, and one
    ``torch.autograd.grad`` gives the gradients with respect to all of them. Where no state enters the first
    measured step, it starts from the model's fresh state (``reset_hidden``, default zeros). One step per call
    changes nothing for ``nn.RNN``/``GRU``/``LSTM`` and the like.

    **The decay.** ``beta = exp(slope)`` with ``slope`` the least-squares slope of ``log phi_k`` against ``k``
    over the lags where ``phi_k`` is positive and finite. Where only ``phi_0`` is positive (the gradient does
    not reach back), ``beta = 0``; where fewer than two points remain otherwise, ``beta`` is ``nan``. A fit
    with ``beta >= 1`` means no geometric decay over the lags measured: a ``UserWarning`` says so.

    **The bias estimate** (Aicher, Foti and Fox, UAI 2019, Theorem 1 and their code). The gradient of the last
    step's loss with respect to the parameters is a sum of terms, one per lag, each at most ``M`` times the
    backpropagated gradient there (``M`` a bound on a step's parameter derivative). Truncating after ``K``
    steps drops the terms of lags ``k >= K``, whose mass is estimated from the **measured** ``phi`` up to
    ``tau = tail_start`` (90% of ``max_lag``) and a **geometric tail** beyond it:

        ``E(K) = sum_{k=K}^{tau} phi_k + phi_tau * beta / (1 - beta)``    for ``K <= tau``,
        ``E(K) = phi_tau * beta**(K - tau) / (1 - beta)``                  for ``K > tau``.

    The full gradient's mass is bounded below by the best over ``K'`` of what a truncation keeps minus what it
    drops, ``D = max_{K'} (sum_{k < K'} phi_k - E(K'))`` (``K' = 1..max_lag + 1``), and the relative bias is

        ``relative_bias(K) = E(K) / D``,    ``suggest(delta) = min {K >= 1 : E(K) / D <= delta}``

    (``M`` cancels). Beyond the measured lags ``suggest`` solves the tail for ``K``. For an exactly geometric
    ``phi_k = c * beta**k`` measured far enough, ``E(K) / D`` tends to ``beta**K``. The measured head is what
    makes the estimate trustworthy where the decay is not geometric: a large ``phi_0`` over a fast-decaying
    rest, or two timescales whose slow one dominates late.

    In the trainer's TBPTT(k1, k2) the last step of a chunk is backpropagated over ``k2`` steps and its first
    over ``k2 - k1 + 1``: ``k2 >= suggest(delta) + k1 - 1`` keeps every step's estimate within ``delta``.

    **Nothing changes.** The gradients come from ``torch.autograd.grad``, which leaves the parameters' ``.grad``
    alone; the parameters are not touched; ``hidden`` is not changed. The model runs in **train mode** as the
    trainer runs it (Aicher et al. measure so), or in eval mode with ``train_mode=False`` (no dropout noise;
    on CUDA, cuDNN is then off for the measured steps, as its RNN backward refuses eval mode); its mode is
    restored afterwards.

    Args:
        model: the recurrent model, in the trainer's protocol: ``model(x)`` on the first call, then
            ``model(x, hidden)``, returning ``(y_pred, hidden)``.
        x: the inputs, with a time axis ``dim`` of at least ``max_lag + 1`` steps.
        y: the targets, of the same length along ``dim``.
        loss_fn: ``loss_fn(y_pred, y) -> scalar`` on the last step (a slice of length 1 along ``dim``).
        max_lag: the largest lag measured, ``>= 1`` (default 100).
        tbtt_step: the call length of the warm-up steps (``None``: one call).
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``, as for the trainer.
        dim: the time axis of ``x``, ``y`` and the predictions.
        hidden_batch_dim: the batch axis of every leaf of the hidden state: one int or a structure of ints
            matching it (:class:`~ignite_tbptt.state.StateProtocol`); ``-2`` fits ``nn.RNN``/``GRU``/``LSTM``.
        hidden: the state the sequence starts from; ``None``: the model's own start.
        reset_hidden: the model's fresh state, as for the trainer (at resets, and where no state enters the
            first measured step).
        resets, padding, mask: per (step, sample) bools, see **Sequences**; ``None``: none.
        train_mode: measure in train mode (default) or in eval mode.

    Returns:
        a :class:`~ignite_tbptt.horizon.GradientHorizon` with ``norms`` (the ``phi_k``), ``decay`` (``beta``),
        ``absolute_bias(K)``, ``relative_bias(K)``, ``suggest(delta)`` and ``plot(ax=None)``.

    Example:
        A linear recurrence ``h' = 0.5 h + W x`` (``tanh`` at 0 is the identity, and the state stays at 0):
        the gradient halves at every step back, and the estimate is ``0.5**K`` to within the window's share.

        >>> model = torch.nn.RNN(1, 3, bias=False)
        >>> _ = model.weight_hh_l0.data.copy_(0.5 * torch.eye(3))
        >>> x, y = torch.zeros(40, 2, 1), torch.ones(40, 2, 3)
        >>> horizon = gradient_horizon(model, x, y, torch.nn.MSELoss(), max_lag=30)
        >>> tuple(horizon.norms.shape), round(horizon.decay, 6), horizon.tail_start
        ((31,), 0.5, 27)
        >>> horizon.suggest(0.01), round(horizon.relative_bias(7), 4)  # 0.5**7 <= 0.01 < 0.5**6
        (7, 0.0078)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor with a time axis, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor with a time axis, got {type(y).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"x of shape {tuple(x.shape)} has no time axis dim={dim}")
    if isinstance(max_lag, bool) or not isinstance(max_lag, int):
        raise TypeError(f"max_lag must be an int, got {type(max_lag).__name__}")
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    if tbtt_step is not None and (isinstance(tbtt_step, bool) or not isinstance(tbtt_step, int) or tbtt_step < 1):
        raise ValueError(f"tbtt_step must be an int >= 1 or None, got {tbtt_step!r}")
    if not isinstance(train_mode, bool):
        raise TypeError(f"train_mode must be a bool, got {type(train_mode).__name__}")
    dim = dim % x.dim()
    length = x.shape[dim]
    if length < max_lag + 1:
        raise ValueError(
            f"x has {length} time steps along dim={dim}: measuring lags 0..{max_lag} needs at least "
            f"max_lag + 1 = {max_lag + 1}"
        )
    if y.dim() <= dim or y.shape[dim] != length:
        raise ValueError(f"y must have the length of x along the time axis dim={dim} ({length}), got shape {tuple(y.shape)}")
    marks = _Marks.of(x, dim, resets=resets, padding=padding, mask=mask)
    protocol = StateProtocol(hidden_batch_dim, reset_hidden)
    model_fn = model_fn or default_model_fn
    training = model.training if isinstance(model, nn.Module) else None
    if training is not None:
        model.train(train_mode)
    try:
        norms = _measure(model, model_fn, x, y, loss_fn, max_lag, tbtt_step, dim, protocol, hidden, marks, train_mode)
    finally:
        if training is not None:
            model.train(training)
    horizon = GradientHorizon.from_norms(norms)
    if horizon.decay >= 1:
        warnings.warn(
            f"gradient_horizon: the gradient norms do not decay geometrically over lags 0..{max_lag} (fitted decay "
            f"beta = {horizon.decay:.4g} >= 1): the tail of the bias estimate is void (suggest raises where the "
            "measured lags do not suffice)",
            UserWarning, stacklevel=2,
        )
    return horizon


class _Marks(NamedTuple):
    """A batch's resets, padding and scored targets, time-major ``(T, B)`` bools; ``None`` where absent."""

    resets: Optional[torch.Tensor]
    padding: Optional[torch.Tensor]
    scored: Optional[torch.Tensor]

    @staticmethod
    def of(x: torch.Tensor, dim: int, **given: Optional[torch.Tensor]) -> "_Marks":
        shape = tuple(x.shape[:2])
        out = {}
        for name, t in given.items():
            if t is not None:
                if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or tuple(t.shape) != shape:
                    got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(
                        f"{name} must be a bool tensor of the shape of x's first two axes {shape}, got {got}"
                    )
                t = t.to(x.device)
                t = t if dim == 0 else t.transpose(0, 1)
            out[name] = t
        scored = out["mask"]
        if out["padding"] is not None:
            scored = ~out["padding"] if scored is None else scored & ~out["padding"]
        return _Marks(out["resets"], out["padding"], scored)

    @property
    def stepwise(self) -> bool:
        """Whether the state must be reset or held at single steps."""
        return self.resets is not None or self.padding is not None


def _step(
    model: Any, model_fn: Callable, x: torch.Tensor, dim: int, t: int, state: Hidden, marks: _Marks,
    protocol: StateProtocol,
) -> Tuple[Any, Hidden]:
    """Step ``t`` as the trainer runs it: the resets before it, the model call, the state held over padding."""
    if marks.resets is not None and state is not None and bool(marks.resets[t].any()):
        state = protocol.reset(state, ~marks.resets[t])
    y_pred, new = call_model(model_fn, model, x.narrow(dim, t, 1), state)
    if marks.padding is not None and bool(marks.padding[t].any()):
        new = protocol.hold(state, new, ~marks.padding[t])
    return y_pred, new


def _measure(
    model: Any, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, max_lag: int,
    tbtt_step: Optional[int], dim: int, protocol: StateProtocol, hidden: Optional[Hidden], marks: _Marks,
    train_mode: bool,
) -> torch.Tensor:
    """``phi_0..phi_max_lag`` as a float64 tensor (see :func:`gradient_horizon`)."""
    length = x.shape[dim]
    first = length - (max_lag + 1)  # the first measured step
    last = length - 1
    counted = None if marks.scored is None else marks.scored[last]
    if counted is not None and not bool(counted.any()):
        raise ValueError(
            "gradient_horizon: nothing to measure: no sample's target at the last step counts (mask or padding "
            "there for every sample), so the last step's loss has no gradient"
        )
    state = detach_state(hidden)
    if first > 0:
        step = 1 if marks.stepwise else (tbtt_step or first)
        with torch.no_grad():
            for start in range(0, first, step):
                if marks.stepwise:
                    state = _step(model, model_fn, x, dim, start, state, marks, protocol)[1]
                else:
                    state = call_model(model_fn, model, x.narrow(dim, start, min(step, first - start)), state)[1]
        state = detach_state(state)
    if state is None:  # no state enters the window: the fresh one, in the structure the model returns
        with torch.no_grad():
            probe = call_model(model_fn, model, x.narrow(dim, first, 1), None)[1]
        state = detach_state(protocol.fresh_like(probe))
    batch = batch_size_of(x, dim)
    entering: List[Hidden] = []
    with _cudnn_off(x.is_cuda and not train_mode):
        with torch.enable_grad():
            for t in range(first, length):
                state = _entering(state)
                entering.append(state)
                y_pred, state = _step(model, model_fn, x, dim, t, state, marks, protocol)
            # in the layout of the last step's (time, batch) axes
            valid = None if counted is None else counted.unsqueeze(dim)
            pair = masked_pair(y_pred, y.narrow(dim, last, 1), valid, dim)
            loss = loss_fn(*pair)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                f"{f' of shape {tuple(loss.shape)}' if isinstance(loss, torch.Tensor) else ''}")
            per_step = [_floating_leaves(s, protocol, batch) for s in entering]
            inputs = [t for leaves in per_step for t, _ in leaves]
            samples = batch if counted is None else int(counted.sum())
            if loss.requires_grad:
                grads = torch.autograd.grad(loss.reshape(()) * samples, inputs, allow_unused=True)
            else:  # the loss depends on nothing that takes a gradient
                grads = (None,) * len(inputs)
    norms = torch.zeros(max_lag + 1, dtype=torch.float64)
    grads_left = iter(grads)
    for i, leaves in enumerate(per_step):
        squares = torch.zeros(batch, dtype=torch.float64, device=x.device)
        for t, axis in leaves:
            g = next(grads_left)
            if g is not None:
                squares = squares + g.detach().to(torch.float64).movedim(axis, 0).reshape(batch, -1).pow(2).sum(1)
        per_sample = squares.sqrt()
        if marks.padding is not None:  # a lag that starts in a sample's padding does not count for it
            per_sample = per_sample.masked_fill(marks.padding[first + i], 0.0)
        norms[max_lag - i] = (per_sample.sum() / samples).item()
    return norms


def _entering(state: Hidden) -> Hidden:
    """``state`` as the input of the next measured step: each floating leaf a node of its own that takes a gradient
    (an identity view where it has a graph, a detached leaf requiring grad where it has none)."""
    leaves, spec = tree_flatten(state)
    out = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)
        out.append(t)
    return tree_unflatten(out, spec)


def _floating_leaves(state: Hidden, protocol: StateProtocol, batch: int) -> List[Tuple[torch.Tensor, int]]:
    """The floating leaves of ``state`` with their batch axes (checked to hold ``batch`` samples)."""
    named = named_leaves(state)
    out = []
    for (name, t), batch_dim in zip(named, protocol._dims(state, len(named))):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append((t, _batch_axis(t, name, batch_dim, batch)))
    return out


def _fit_decay(norms: torch.Tensor) -> Tuple[float, float]:
    """``(beta, scale)`` of the least-squares line ``log phi_k = log scale + k log beta`` (see :func:`gradient_horizon`)."""
    lags = torch.arange(len(norms), dtype=torch.float64)
    usable = torch.isfinite(norms) & (norms > 0)
    if int(usable.sum()) < 2:
        if bool(usable[0]) and bool((norms[1:] == 0).all()):
            return 0.0, float(norms[0])  # the gradient does not reach back past the last step
        return math.nan, math.nan
    k, log_phi = lags[usable], norms[usable].log()
    k_mean, log_mean = k.mean(), log_phi.mean()
    slope = ((k - k_mean) * (log_phi - log_mean)).sum() / (k - k_mean).pow(2).sum()
    intercept = log_mean - slope * k_mean
    return math.exp(float(slope)), math.exp(float(intercept))


def default_tail_start(max_lag: int) -> int:
    """``tau = floor(0.9 * max_lag)``: Aicher et al. sum the measured ``phi`` over the first 90% of the window and
    let the geometric tail stand for the rest, where the last lags measured are the noisiest."""
    return int(0.9 * max_lag)


def _check_lag(K: Any) -> None:
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an int >= 0, got {K!r}")


def _tail(phi_tau: float, beta: float, steps: int) -> float:
    """``sum_{j >= steps} phi_tau * beta**j``: the geometric tail from ``steps`` lags past ``tau`` on."""
    if phi_tau == 0:
        return 0.0
    if not beta < 1:  # >= 1 or nan: the tail does not converge, or there is none to extrapolate from
        return math.inf
    return phi_tau * beta ** steps / (1 - beta)


def _dropped_mass(norms: torch.Tensor, tau: int, beta: float) -> torch.Tensor:
    """``E(K)`` for ``K = 0..max_lag + 1``: ``sum_{k=K}^{tau} phi_k + phi_tau * beta / (1 - beta)`` for ``K <= tau``,
    the tail ``phi_tau * beta**(K - tau) / (1 - beta)`` beyond."""
    phi_tau = float(norms[tau])
    head = norms[:tau + 1].flip(0).cumsum(0).flip(0)  # head[K] = phi_K + ... + phi_tau
    beyond = [_tail(phi_tau, beta, K - tau) for K in range(tau + 1, len(norms) + 1)]
    return torch.cat([head + _tail(phi_tau, beta, 1), torch.tensor(beyond, dtype=norms.dtype)])


@contextlib.contextmanager
def _cudnn_off(on_cuda: bool) -> Iterator[None]:
    """cuDNN off for the block where the inputs are on CUDA: its RNN backward refuses to run in eval mode."""
    if not on_cuda:
        yield
        return
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled
