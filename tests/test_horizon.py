"""gradient_horizon: the gradient's decay with the lag, its geometric fit, the bias bound and the suggested K."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt import GradientHorizon, gradient_horizon


class LinearRNN(nn.Module):
    """``h' = rho * h + x W``, output ``h'``: the gradient entering the step ``k`` back is ``rho**k`` times the
    last step's. The state is ``(B, H)``, or ``(1, B, H)`` with ``layer_axis`` (batch at axis -2)."""

    def __init__(self, rho, size=3, layer_axis=False):
        super().__init__()
        self.rho, self.layer_axis = rho, layer_axis
        self.w = nn.Parameter(torch.eye(size, dtype=torch.float64) + 0.1)

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], self.w.shape[1]) if hidden is None else (hidden[0] if self.layer_axis else hidden)
        outs = []
        for t in range(x.shape[0]):
            h = self.rho * h + x[t] @ self.w
            outs.append(h)
        return torch.stack(outs), (h.unsqueeze(0) if self.layer_axis else h)


class LSTMNet(nn.Module):
    def __init__(self, layers=2, dropout=0.0):
        super().__init__()
        self.rnn = nn.LSTM(2, 4, num_layers=layers, dropout=dropout).double()
        self.head = nn.Linear(4, 2).double()

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


class DictCellNet(nn.Module):
    """Batch-first, a dict state ``{"h": (B, H), "c": (B, H)}`` from an LSTM cell; called as ``net(x, state=...)``."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(2, 4).double()
        self.head = nn.Linear(4, 2).double()

    def forward(self, x, state=None):
        hc = None if state is None else (state["h"], state["c"])
        outs = []
        for t in range(x.shape[1]):
            hc = self.cell(x[:, t], hc)
            outs.append(self.head(hc[0]))
        return torch.stack(outs, 1), {"h": hc[0], "c": hc[1]}


def reference_norms(model, x, y, loss_fn, max_lag, dim=0, batch_axes=-2, hidden=None, call=None):
    """phi_k step by step: for each k, the state entering step T-1-k as a detached leaf, the last k+1 steps rebuilt
    from it, the gradient of B times the last step's loss, per-sample norm over the leaves, mean over the batch."""
    call = call or (lambda m, x_t, h: m(x_t) if h is None else m(x_t, h))
    length, batch = x.shape[dim], x.shape[1 if dim == 0 else 0]
    states = [hidden]  # states[t]: the state entering step t
    with torch.no_grad():
        for t in range(length):
            states.append(call(model, x.narrow(dim, t, 1), states[-1])[1])
    norms = []
    for k in range(max_lag + 1):
        start = length - 1 - k
        leaves, spec = tree_flatten(states[start])
        if states[start] is None:  # the first step from no state: a zero state, as the model's own start
            leaves, spec = tree_flatten(states[1])
            leaves = [torch.zeros_like(t) for t in leaves]
        leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
        h = tree_unflatten(leaves, spec)
        for t in range(start, length):
            y_pred, h = call(model, x.narrow(dim, t, 1), h)
        loss = loss_fn(y_pred, y.narrow(dim, length - 1, 1)) * batch
        grads = torch.autograd.grad(loss, leaves)
        axes = tree_flatten(batch_axes)[0] if not isinstance(batch_axes, int) else [batch_axes] * len(leaves)
        squares = sum(g.movedim(a, 0).reshape(batch, -1).pow(2).sum(1) for g, a in zip(grads, axes))
        norms.append(squares.sqrt().mean().item())
    return torch.tensor(norms, dtype=torch.float64)


def _data(length, batch=3, features=2, dim=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (length, batch, features) if dim == 0 else (batch, length, features)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rho", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("layer_axis", [False, True], ids=["state (B, H)", "state (1, B, H)"])
def test_an_exactly_geometric_decay_gives_the_closed_form(rho, layer_axis):
    """phi_k = c rho**k: E(K) = c rho**K / (1 - rho) at every K (head and tail alike) and the best lower bound
    on the mass is at K' = max_lag + 1, D = c (1 - 2 rho**(max_lag + 1)) / (1 - rho): E(K) / D in closed form."""
    model = LinearRNN(rho, layer_axis=layer_axis)
    x, y = _data(30, features=3)
    max_lag = 20
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=max_lag, hidden_batch_dim=-2 if layer_axis else 0)
    assert isinstance(horizon, GradientHorizon)
    assert horizon.norms.dtype == torch.float64 and horizon.norms.shape == (21,)
    assert horizon.decay == pytest.approx(rho, rel=1e-9)  # exactly geometric: the fit recovers it to rounding
    assert horizon.tail_start == 18
    ratios = horizon.norms[1:] / horizon.norms[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, rho), rtol=1e-9)
    c = float(horizon.norms[0])
    window = 1 - 2 * rho ** (max_lag + 1)
    assert horizon.mass == pytest.approx(c * window / (1 - rho), rel=1e-9)
    for K in [0, 1, 7, 18, 19, 21, 40]:  # in the head, at tau, in the measured tail, beyond the measured lags
        assert horizon.absolute_bias(K) == pytest.approx(c * rho ** K / (1 - rho), rel=1e-9)
        assert horizon.relative_bias(K) == pytest.approx(rho ** K / window, rel=1e-9)
    for delta in [0.3, 0.1, 0.01, 1e-3]:
        expected = math.ceil(math.log(delta * window) / math.log(rho) - 1e-9)
        assert horizon.suggest(delta) == expected
        assert horizon.relative_bias(expected) <= delta < horizon.relative_bias(expected - 1)


def test_no_geometric_decay_is_reported():
    model = LinearRNN(1.1)
    x, y = _data(12, features=3)
    with pytest.warns(UserWarning, match=r"do not decay geometrically over lags 0..8 \(fitted decay beta = 1.1"):
        horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=8, hidden_batch_dim=0)
    assert horizon.decay == pytest.approx(1.1)
    assert horizon.absolute_bias(5) == math.inf and horizon.relative_bias(5) == math.inf
    with pytest.raises(ValueError, match="no geometric decay was measured"):
        horizon.suggest(0.1)


class NoRecurrence(nn.Module):
    """Reads the state it is given (``y = h + x``) but makes the next one from ``x`` alone: lag 0 only."""

    def forward(self, x, hidden=None):
        h = torch.zeros_like(x[0]) if hidden is None else hidden
        return h + x, x[-1] * 2


class IgnoresState(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, hidden=None):
        return x * self.w, x[-1]


def test_a_gradient_that_does_not_reach_back_and_one_that_is_not_there():
    x, y = _data(6)
    horizon = gradient_horizon(NoRecurrence(), x, y, nn.MSELoss(), max_lag=4, hidden_batch_dim=0)
    assert horizon.norms[0] > 0 and (horizon.norms[1:] == 0).all()
    assert horizon.decay == 0.0 and horizon.relative_bias(1) == 0.0 and horizon.suggest(1e-6) == 1
    assert horizon.relative_bias(0) == 1.0  # everything dropped
    horizon = gradient_horizon(IgnoresState(), x, y, nn.MSELoss(), max_lag=4, hidden_batch_dim=0)
    assert (horizon.norms == 0).all() and math.isnan(horizon.decay) and horizon.relative_bias(3) == math.inf
    with pytest.raises(ValueError, match="the gradient of the last step's loss is zero at every lag"):
        horizon.suggest(0.1)


@pytest.mark.parametrize("length, tbtt_step, with_hidden", [
    (14, None, False), (14, 3, False), (14, 4, True), (7, None, False), (7, None, True),
], ids=["warm-up in one call", "warm-up in calls of 3", "from a given state", "no warm-up", "no warm-up, given state"])
def test_lstm_norms_equal_a_step_by_step_autograd_computation(length, tbtt_step, with_hidden):
    torch.manual_seed(0)
    model = LSTMNet()
    x, y = _data(length)
    hidden = (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)) if with_hidden else None
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=6, tbtt_step=tbtt_step, hidden=hidden)
    expected = reference_norms(model, x, y, nn.MSELoss(), 6, hidden=hidden)
    assert (expected > 0).all()
    torch.testing.assert_close(horizon.norms, expected, rtol=0, atol=1e-10)
    assert 0 < horizon.decay < 1


def test_it_changes_nothing():
    torch.manual_seed(0)
    model = LSTMNet(dropout=0.5).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    x, y = _data(12)
    hidden = (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64))
    saved_hidden = [h.clone() for h in hidden]
    first = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, hidden=hidden, train_mode=False)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and torch.equal(p.grad, grads[n]), n
    assert all(torch.equal(h, s) and not h.requires_grad for h, s in zip(hidden, saved_hidden))
    # In eval mode: no dropout noise, the same twice and as the eval-mode reference.
    second = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, hidden=hidden, train_mode=False)
    assert torch.equal(first.norms, second.norms)
    # In train mode by default, as the trainer runs the model: dropout draws, the same under the same seed.
    torch.manual_seed(1)
    noisy = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, hidden=hidden)
    torch.manual_seed(1)
    assert torch.equal(noisy.norms, gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, hidden=hidden).norms)
    assert not torch.allclose(noisy.norms, first.norms) and model.training
    model.eval()
    torch.testing.assert_close(first.norms, reference_norms(model, x, y, nn.MSELoss(), 5, hidden=hidden), rtol=0, atol=1e-10)
    gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5)
    assert not model.training
    model.train()
    with pytest.raises(RuntimeError, match="boom"):  # restored after an error too
        gradient_horizon(model, x, y, lambda y_pred, y: (_ for _ in ()).throw(RuntimeError("boom")), max_lag=5)
    assert model.training


def test_dict_state_batch_first_with_model_fn():
    torch.manual_seed(0)
    model = DictCellNet()
    x, y = _data(10, dim=1)
    call = lambda m, x_t, h: m(x_t, state=h)  # noqa: E731
    by_leaf = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, dim=1, model_fn=call, hidden_batch_dim={"h": 0, "c": 0})
    one_int = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, dim=1, model_fn=call, hidden_batch_dim=0)
    assert torch.equal(by_leaf.norms, one_int.norms)
    expected = reference_norms(model, x, y, nn.MSELoss(), 5, dim=1, batch_axes={"c": 0, "h": 0}, call=call)
    torch.testing.assert_close(by_leaf.norms, expected, rtol=0, atol=1e-10)
    # Exactly max_lag + 1 steps: the first measured step starts from the fresh (zero) state.
    short = gradient_horizon(model, x[:, 4:], y[:, 4:], nn.MSELoss(), max_lag=5, dim=1, model_fn=call, hidden_batch_dim=0)
    assert short.norms.shape == (6,) and (short.norms > 0).all()


def test_bad_input():
    model = LSTMNet()
    x, y = _data(6)
    mse = nn.MSELoss()
    with pytest.raises(ValueError, match=r"max_lag must be >= 1, got 0"):
        gradient_horizon(model, x, y, mse, max_lag=0)
    with pytest.raises(TypeError, match=r"max_lag must be an int, got float"):
        gradient_horizon(model, x, y, mse, max_lag=2.0)
    too_short = r"x has 6 time steps along dim=0: measuring lags 0..6 needs at least max_lag \+ 1 = 7"
    with pytest.raises(ValueError, match=too_short):
        gradient_horizon(model, x, y, mse, max_lag=6)
    with pytest.raises(TypeError, match=r"x must be a tensor with a time axis, got list"):
        gradient_horizon(model, x.tolist(), y, mse, max_lag=2)
    with pytest.raises(ValueError, match=r"y must have the length of x along the time axis dim=0 \(6\)"):
        gradient_horizon(model, x, y[:5], mse, max_lag=2)
    with pytest.raises(ValueError, match=r"x of shape \(6, 3, 2\) has no time axis dim=3"):
        gradient_horizon(model, x, y, mse, max_lag=2, dim=3)
    with pytest.raises(ValueError, match=r"tbtt_step must be an int >= 1 or None, got 0"):
        gradient_horizon(model, x, y, mse, max_lag=2, tbtt_step=0)
    no_batch = r"the state leaf hidden\[0\] of shape \(2, 3, 4\) has no batch axis of size 3 at hidden_batch_dim=0"
    with pytest.raises(ValueError, match=no_batch):
        gradient_horizon(model, x, y, mse, max_lag=2, hidden_batch_dim=0)
    horizon = gradient_horizon(model, x, y, mse, max_lag=2)
    for delta in [0, 1, -0.5, 1.5, float("nan"), True]:
        with pytest.raises(ValueError, match=r"delta, the tolerable relative bias, must be in \(0, 1\)"):
            horizon.suggest(delta)
    with pytest.raises(ValueError, match=r"K must be an int >= 0, got -1"):
        horizon.relative_bias(-1)


def test_plot():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    horizon = gradient_horizon(LinearRNN(0.7), *_data(12, features=3), nn.MSELoss(), max_lag=8, hidden_batch_dim=0)
    ax = Figure().subplots()
    assert horizon.plot(ax) is ax
    measured, fitted = ax.lines
    assert ax.get_yscale() == "log" and list(measured.get_xdata()) == list(range(9))
    assert fitted.get_ydata() == pytest.approx(horizon.norms.tolist(), rel=1e-8)  # exactly geometric: on the line
    import matplotlib.pyplot as plt

    ax = horizon.plot()
    plt.close(ax.figure)


def test_matplotlib_is_imported_only_by_plot():
    code = "import sys, ignite_tbptt.horizon; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
