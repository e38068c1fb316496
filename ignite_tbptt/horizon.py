"""How far back the gradient reaches: its decay with the lag, measured on one batch, for choosing ``k2``.

TBPTT with a window of ``k2`` steps drops every path of the gradient that runs back further than ``k2`` steps.
How much that costs depends on how fast the backpropagated gradient decays with the lag. Aicher, Foti and Fox
(UAI 2019, "Adaptively Truncating Backpropagation Through Time to Control Gradient Bias") measure that decay,
fit it as geometric, ``phi_k ~ c * beta**k``, and turn a tolerable relative bias ``delta`` into a truncation
length. :func:`gradient_horizon` does the measurement and the fit on one batch; the method is theirs, this
code our own. The formulas it implements are stated in its docstring.
"""

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt.batches import batch_size_of
from ignite_tbptt.state import BatchDims, ResetFn, StateProtocol, _batch_axis, named_leaves
from ignite_tbptt.window import call_model, default_model_fn, detached

__all__ = ["GradientHorizon", "gradient_horizon"]

Hidden = Any


class GradientHorizon:
    """What :func:`gradient_horizon` measured: the gradient norms by lag, their geometric decay, and the bias bound.

    Attributes:
        norms: ``phi_k`` for ``k = 0..max_lag``, a 1-D ``float64`` tensor (see :func:`gradient_horizon`).
        decay: ``beta``, the fitted geometric decay rate per step: ``exp`` of the least-squares slope of
            ``log phi_k`` against ``k``. ``>= 1``: no geometric decay over the lags measured; ``0.0``: the
            gradient vanishes after lag 0; ``nan``: nothing to fit (every ``phi_k`` zero or not finite).
        scale: ``exp`` of the fit's intercept: the fitted ``phi_0`` (for the plot).
    """

    def __init__(self, norms: torch.Tensor, decay: float, scale: float) -> None:
        self.norms, self.decay, self.scale = norms, decay, scale

    def __repr__(self) -> str:
        return f"GradientHorizon(max_lag={len(self.norms) - 1}, decay={self.decay:.4g})"

    def relative_bias(self, K: int) -> float:
        """The bound ``beta**K`` on the relative bias of truncating the gradient after ``K`` steps.

        ``inf`` where ``beta >= 1`` (no geometric decay: the bound is void), ``nan`` where nothing was fitted.
        ``K = 0`` gives ``1``: everything dropped.
        """
        if isinstance(K, bool) or not isinstance(K, int) or K < 0:
            raise ValueError(f"K must be an int >= 0, got {K!r}")
        if math.isnan(self.decay):
            return math.nan
        if self.decay >= 1:
            return math.inf
        return self.decay ** K

    def suggest(self, delta: float) -> int:
        """The smallest ``K >= 1`` with ``relative_bias(K) <= delta``: ``ceil(log(delta) / log(beta))``.

        Raises ``ValueError`` for ``delta`` outside ``(0, 1)``, and where the fit gave no geometric decay
        (``beta >= 1`` or ``nan``): no finite ``K`` is then backed by the bound.
        """
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta, the tolerable relative bias, must be in (0, 1), got {delta!r}")
        if math.isnan(self.decay) or self.decay >= 1:
            raise ValueError(
                f"no geometric decay was measured (decay beta = {self.decay:.4g}): the bias bound beta**K does not "
                "fall below delta for any K; measure over more lags (max_lag), or on a trained model"
            )
        if self.decay == 0:
            return 1
        K = max(1, math.ceil(math.log(delta) / math.log(self.decay)))
        # The formula in floating point may land one off where log(delta) / log(beta) is an integer: settle on the
        # defining property, so that suggest and relative_bias never disagree.
        while K > 1 and self.relative_bias(K - 1) <= delta:
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


def gradient_horizon(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    *,
    max_lag: int,
    tbtt_step: Optional[int] = None,
    model_fn: Optional[Callable] = None,
    dim: int = 0,
    hidden_batch_dim: BatchDims = -2,
    hidden: Optional[Hidden] = None,
    reset_hidden: Optional[ResetFn] = None,
) -> GradientHorizon:
    """Measure on one batch how the gradient decays with the lag, and bound the bias of truncating it.

    **What is measured.** Let ``T`` be the length of ``x`` along ``dim``, ``s_t`` the hidden state that enters
    step ``t`` and ``L`` the loss of the last step alone: ``loss_fn`` on the last step's prediction and target,
    each a slice of length 1 along ``dim`` (so a loss written for chunks works). Then for ``k = 0..max_lag``

        ``phi_k = mean_b || d(B * L) / d s_{T-1-k} [b] ||``

    the gradient with respect to the state entering the step ``k`` steps before the last (``k = 0``: the state
    the last step starts from), its norm taken per sample ``b`` over all floating leaves of the state together
    (each leaf's batch axis from ``hidden_batch_dim``), then averaged over the batch of ``B`` samples.
    Normalisation: ``loss_fn`` is taken to average over the batch, as Ignite's losses do, so the loss is
    multiplied by ``B`` and row ``b`` of the gradient is sample ``b``'s own gradient. (For a loss that sums, the
    norms come out ``B`` times larger; the decay and the bias bound do not depend on the scale.) The partial
    derivative holds the earlier states fixed: it is what backpropagation carries into ``s_{T-1-k}`` from the
    last step's loss, the quantity whose size decides what a truncation after ``k`` steps drops.

    **How.** The earlier ``T - max_lag - 1`` steps (if any) only warm the state up, under ``torch.no_grad``,
    in calls of ``tbtt_step`` steps (``None``: one call), starting from ``hidden`` (``None``: the model's own
    start, ``model(x)``). The last ``max_lag + 1`` steps then run **one step per call**, each call's input state
    a fresh node of the graph (each floating leaf an identity view of the previous output, or a leaf requiring
    grad where the model returned it without a graph), and one ``torch.autograd.grad`` gives the gradients with
    respect to all of them. Where no state enters the first measured step (``x`` exactly ``max_lag + 1`` steps
    long and no ``hidden``), it starts from the model's fresh state as the trainer's resets make it
    (``reset_hidden``, default zeros, in the structure the model returns). One step per call changes nothing for
    ``nn.RNN``/``GRU``/``LSTM`` and the like; a model whose output depends on where its input is cut into calls (a
    Transformer-XL memory) is measured as it runs step by step.

    **The decay.** ``beta = exp(slope)`` with ``slope`` the least-squares slope of ``log phi_k`` against ``k``
    over the lags where ``phi_k`` is positive and finite. Where only ``phi_0`` is positive and every later
    ``phi_k`` is zero (the gradient does not reach back), ``beta = 0``; where fewer than two points remain
    otherwise, ``beta`` is ``nan``. A fit with ``beta >= 1`` means no geometric decay over the lags measured: a
    ``UserWarning`` says so, ``relative_bias`` is ``inf`` and ``suggest`` raises.

    **The bias bound.** The gradient of the last step's loss with respect to the parameters is a sum over lags
    ``k`` of terms, the term of lag ``k`` from the parameters' use in the step ``k`` steps before the last: the
    gradient backpropagated to that step's output times the step's derivative with respect to the parameters.
    So the terms shrink with the lag as ``phi`` does (a term of lag ``k >= 1`` is at most ``M * phi_{k-1}``,
    ``M`` a bound on a step's parameter derivative: the same rate ``beta``). Truncating after ``K`` steps keeps
    lags ``0..K-1`` and drops the terms ``k >= K``. Under the geometric model, term sizes ``c * beta**k`` for all
    ``k >= 0``, the dropped mass relative to the total is

        ``relative_bias(K) = sum_{k >= K} beta**k / sum_{k >= 0} beta**k = beta**K``

    (for ``beta < 1``; ``c`` and the ``1 / (1 - beta)`` of both sums cancel). It is the share of the gradient's
    mass that the truncation drops: a bound on the relative bias ``||dropped|| / ||full gradient||`` as long as
    the terms do not cancel one another in the full gradient (where they do, the full gradient is smaller and
    the relative bias can be larger). It is computed from the fitted ``beta`` alone, not from the measured
    ``phi_k``, so that ``suggest`` is exactly the geometric rule below. Aicher et al.'s adaptive rule then takes the smallest
    truncation length whose bound is within the tolerance ``delta``:

        ``suggest(delta) = min {K >= 1 : beta**K <= delta} = ceil(log(delta) / log(beta))``.

    In the trainer's TBPTT(k1, k2) the last step of a chunk is backpropagated over ``k2`` steps (lags
    ``0..k2-1``) and its first step over ``k2 - k1 + 1``: ``k2 >= suggest(delta) + k1 - 1`` keeps every step's
    bound within ``delta``.

    **Nothing changes.** The gradients come from ``torch.autograd.grad``, which leaves the parameters' ``.grad``
    alone; the parameters are not touched; the model runs in **eval mode** (no dropout noise, batch statistics
    that do not mix the samples) and its train/eval mode is restored afterwards. On CUDA, cuDNN is off for the
    measured steps (its RNN backward refuses eval mode). ``hidden`` is not changed.

    Args:
        model: the recurrent model, in the trainer's protocol: ``model(x)`` on the first call, then
            ``model(x, hidden)``, returning ``(y_pred, hidden)``.
        x: the inputs, with a time axis ``dim`` of at least ``max_lag + 1`` steps.
        y: the targets, of the same length along ``dim``.
        loss_fn: ``loss_fn(y_pred, y) -> scalar`` on the last step (a slice of length 1 along ``dim``).
        max_lag: the largest lag measured, ``>= 1``.
        tbtt_step: the call length of the warm-up steps (``None``: one call).
        model_fn: ``model_fn(model, x, hidden) -> (y_pred, hidden)``, as for the trainer.
        dim: the time axis of ``x``, ``y`` and the predictions.
        hidden_batch_dim: the batch axis of every leaf of the hidden state: one int or a structure of ints
            matching it (:class:`~ignite_tbptt.state.StateProtocol`); ``-2`` fits ``nn.RNN``/``GRU``/``LSTM``.
        hidden: the state the sequence starts from; ``None``: the model's own start.
        reset_hidden: the model's fresh state, as for the trainer (used only where no state enters the first
            measured step).

    Returns:
        a :class:`~ignite_tbptt.horizon.GradientHorizon` with ``norms`` (the ``phi_k``), ``decay`` (``beta``), ``relative_bias(K)``,
        ``suggest(delta)`` and ``plot(ax=None)``.

    Example:
        A linear recurrence ``h' = 0.5 h + W x`` (``tanh`` at 0 is the identity, and the state stays at 0):
        the gradient halves at every step back.

        >>> model = torch.nn.RNN(1, 3, bias=False)
        >>> _ = model.weight_hh_l0.data.copy_(0.5 * torch.eye(3))
        >>> x, y = torch.zeros(20, 2, 1), torch.ones(20, 2, 3)
        >>> horizon = gradient_horizon(model, x, y, torch.nn.MSELoss(), max_lag=8)
        >>> tuple(horizon.norms.shape), round(horizon.decay, 6)
        ((9,), 0.5)
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
    dim = dim % x.dim()
    length = x.shape[dim]
    if length < max_lag + 1:
        raise ValueError(
            f"x has {length} time steps along dim={dim}: measuring lags 0..{max_lag} needs at least "
            f"max_lag + 1 = {max_lag + 1}"
        )
    if y.dim() <= dim or y.shape[dim] != length:
        raise ValueError(f"y must have the length of x along the time axis dim={dim} ({length}), got shape {tuple(y.shape)}")
    protocol = StateProtocol(hidden_batch_dim, reset_hidden)
    model_fn = model_fn or default_model_fn
    training = model.training if isinstance(model, nn.Module) else None
    if training:
        model.eval()
    try:
        norms = _measure(model, model_fn, x, y, loss_fn, max_lag, tbtt_step, dim, protocol, hidden)
    finally:
        if training:
            model.train()
    decay, scale = _fit_decay(norms)
    if decay >= 1:
        warnings.warn(
            f"gradient_horizon: the gradient norms do not decay geometrically over lags 0..{max_lag} (fitted decay "
            f"beta = {decay:.4g} >= 1): the bias bound beta**K is void (relative_bias gives inf, suggest raises)",
            UserWarning, stacklevel=2,
        )
    return GradientHorizon(norms, decay, scale)


def _measure(
    model: Any, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, max_lag: int,
    tbtt_step: Optional[int], dim: int, protocol: StateProtocol, hidden: Optional[Hidden],
) -> torch.Tensor:
    """``phi_0..phi_max_lag`` as a float64 tensor (see :func:`gradient_horizon`)."""
    length = x.shape[dim]
    first = length - (max_lag + 1)  # the first measured step
    state = detached(hidden)
    if first > 0:
        step = tbtt_step or first
        with torch.no_grad():
            for start in range(0, first, step):
                state = call_model(model_fn, model, x.narrow(dim, start, min(step, first - start)), state)[1]
        state = detached(state)
    if state is None:  # no state enters the window: the fresh one, in the structure the model returns
        with torch.no_grad():
            probe = call_model(model_fn, model, x.narrow(dim, first, 1), None)[1]
        state = detached(protocol.fresh_like(probe))
    batch = batch_size_of(x, dim)
    entering: List[Hidden] = []
    with _cudnn_off(x.is_cuda):
        with torch.enable_grad():
            for t in range(first, length):
                state = _entering(state)
                entering.append(state)
                y_pred, state = call_model(model_fn, model, x.narrow(dim, t, 1), state)
            loss = loss_fn(y_pred, y.narrow(dim, length - 1, 1))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                f"{f' of shape {tuple(loss.shape)}' if isinstance(loss, torch.Tensor) else ''}")
            per_step = [_floating_leaves(s, protocol, batch) for s in entering]
            inputs = [t for leaves in per_step for t, _ in leaves]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss.reshape(()) * batch, inputs, allow_unused=True)
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
        norms[max_lag - i] = squares.sqrt().mean().item()
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
