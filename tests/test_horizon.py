"""gradient_horizon: the gradient's decay with the lag, its geometric fit, the bias bound and the suggested K."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ignite_tbptt import GradientHorizon, gradient_horizon
from tests.test_merge_calls import LSTMCellNet


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
    with pytest.raises(ValueError, match=r"tail_start must lie in \[0, max_lag\] = \[0, 2\], got 3"):
        GradientHorizon(horizon.norms, horizon.decay, horizon.scale, tail_start=3)


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


# ---- known answers: the estimate against the exact truncated gradient ----------------------------------------------


class LinearSystem(nn.Module):
    """``h' = act(A h + B x)``, output ``C h'``, state ``(B, H)``; ``act`` the identity or ``tanh``."""

    def __init__(self, A, n_in=2, n_out=2, tanh=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(A.clone())
        self.B = nn.Parameter(torch.randn(A.shape[0], n_in, generator=g, dtype=torch.float64) / n_in ** 0.5)
        self.C = nn.Parameter(torch.randn(n_out, A.shape[0], generator=g, dtype=torch.float64) / A.shape[0] ** 0.5)
        self.tanh = tanh

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], self.A.shape[0]) if hidden is None else hidden
        outs = []
        for x_t in x.unbind(0):
            h = h @ self.A.T + x_t @ self.B.T
            h = torch.tanh(h) if self.tanh else h
            outs.append(h @ self.C.T)
        return torch.stack(outs), h


def lstm_cell(forget_bias=0.0, size=8):
    """An ``nn.LSTMCell`` net (state ``(h, c)``, batch at 0) in float64, its forget gates' bias raised by
    ``forget_bias``."""
    torch.manual_seed(0)
    model = LSTMCellNet(n_hidden=size).double()
    with torch.no_grad():
        model.cell.bias_hh[size:2 * size] += forget_bias
    return model


def orthogonal(size, rho):
    """``rho`` times a random orthogonal matrix: every direction decays (or grows) by exactly ``rho`` a step."""
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return rho * q


def true_relative_errors(model, x, y, loss_fn):
    """``err[K] = ||g - g_K|| / ||g||`` for ``K = 0..T``, ``g`` the exact gradient of the last step's loss and
    ``g_K`` its truncation after ``K`` steps, from a parameter copy per time step: the gradient with respect to
    the copy used ``k`` steps before the last is exactly the term of lag ``k``, so ``g - g_K`` is the sum of the
    terms of lags ``>= K``."""
    names = [n for n, _ in model.named_parameters()]
    copies = [{n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()} for _ in x]
    hidden = None
    for t, params in enumerate(copies):
        args = (x[t:t + 1],) if hidden is None else (x[t:t + 1], hidden)
        y_pred, hidden = torch.func.functional_call(model, params, args)
    flat = [c[n] for c in copies for n in names]
    grads = torch.autograd.grad(loss_fn(y_pred, y[-1:]), flat, allow_unused=True)  # unused: the first step's weight_hh
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat)]
    terms = torch.stack([torch.cat([g.reshape(-1) for g in grads[i:i + len(names)]]) for i in range(0, len(grads), len(names))])
    # terms[t] is the term of step t, lag T - 1 - t: the sum over steps t <= T - 1 - K is that of the lags >= K.
    tails = torch.cat([terms.cumsum(0).flip(0), terms.new_zeros(1, terms.shape[1])])
    return tails.norm(dim=1) / tails[0].norm()


SYSTEMS = {  # name: (model, time steps); a sequence long enough for the full gradient to have converged
    "linear, rho = 0.5": (lambda: LinearSystem(orthogonal(6, 0.5)), 300),
    "linear, rho = 0.9": (lambda: LinearSystem(orthogonal(6, 0.9)), 400),
    "linear, rho = 0.99": (lambda: LinearSystem(orthogonal(6, 0.99)), 1200),
    "two timescales, 0.8 and 0.99": (lambda: LinearSystem(torch.diag(torch.tensor([0.8] * 3 + [0.99] * 3, dtype=torch.float64))), 1200),
    "tanh, rho = 1.2": (lambda: LinearSystem(orthogonal(16, 1.2), n_in=4, tanh=True), 400),
    "LSTM": (lambda: lstm_cell(), 300),
    "LSTM, forget bias 3": (lambda: lstm_cell(forget_bias=3.0), 400),
}


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_suggest_keeps_the_true_relative_error_within_delta(name):
    """At the default 100 lags, suggest(delta)'s truncation has a true relative error of at most delta on the
    batch measured, and is at most 2.5 times the smallest K that has."""
    make, length = SYSTEMS[name]
    model = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(length, 16, model.B.shape[1] if isinstance(model, LinearSystem) else 2, generator=g, dtype=torch.float64)
    y = torch.randn(length, 16, 2, generator=g, dtype=torch.float64)
    errors = true_relative_errors(model, x, y, nn.MSELoss())
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), hidden_batch_dim=0)
    for delta in [0.1, 0.03]:
        smallest = int((errors <= delta).nonzero()[0])
        K = horizon.suggest(delta)
        assert errors[K] <= delta and K <= 2.5 * smallest, (delta, K, float(errors[K]), smallest)


class InputGain(nn.Module):
    """``h' = 0.7 h + w x`` with ``w`` the only parameter, output ``h'``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, hidden=None):
        h = torch.zeros_like(x[0]) if hidden is None else hidden
        outs = []
        for x_t in x.unbind(0):
            h = 0.7 * h + self.w * x_t
            outs.append(h)
        return torch.stack(outs), h


def test_the_true_relative_error_of_a_geometric_decay():
    """The helper above, checked where the answer is known: with equal inputs the term of lag k is
    dL/dh_T * 0.7**k, all aligned, so err[K] = 0.7**K (less the 0.7**200 beyond the sequence)."""
    x, y = torch.ones(200, 1, 1, dtype=torch.float64), torch.zeros(200, 1, 1, dtype=torch.float64)
    errors = true_relative_errors(InputGain(), x, y, nn.MSELoss())
    assert errors[0] == 1 and errors[-1] == 0 and len(errors) == 201
    torch.testing.assert_close(errors[:40], 0.7 ** torch.arange(40, dtype=torch.float64), rtol=1e-9, atol=0)


# ---- resets, padding and ignored targets ----------------------------------------------------------------------------


def _alone(model, x, y, b, max_lag, **kwargs):
    """Sample ``b``'s own norms: the batch of that sample alone (its loss times 1 is its own gradient)."""
    return gradient_horizon(model, x[:, b:b + 1], y[:, b:b + 1], nn.MSELoss(), max_lag=max_lag, **kwargs).norms


def test_a_reset_stops_the_lags_that_cross_it():
    torch.manual_seed(0)
    model = LSTMNet()
    x, y = _data(20, batch=2)
    resets = torch.zeros(20, 2, dtype=torch.bool)
    resets[14] = True  # both samples start afresh before step 14 = T - 6: lags 5.. cross the reset
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=12, resets=resets)
    assert (horizon.norms[5:] == 0).all() and (horizon.norms[:5] > 0).all()
    fresh = gradient_horizon(model, x[14:], y[14:], nn.MSELoss(), max_lag=5)  # from the fresh state at step 14
    torch.testing.assert_close(horizon.norms[:5], fresh.norms[:5], rtol=0, atol=1e-12)
    assert horizon.relative_bias(5) == 0 and horizon.suggest(1e-3) <= 5
    # Without the resets the lags beyond them count, and a longer window is suggested.
    assert gradient_horizon(model, x, y, nn.MSELoss(), max_lag=12).suggest(1e-3) > 5
    # One sample's reset: its lags across the reset count 0, the other's as measured alone.
    resets[14, 1] = False
    one = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=12, resets=resets)
    first = torch.cat([_alone(model, x[14:], y[14:], 0, 5)[:5], torch.zeros(8, dtype=torch.float64)])
    torch.testing.assert_close(one.norms, (first + _alone(model, x, y, 1, 12)) / 2, rtol=0, atol=1e-12)


def test_padding_holds_the_state_and_its_lags_do_not_count():
    torch.manual_seed(0)
    model = LSTMNet()
    x, y = _data(20, batch=2)
    padding = torch.zeros(20, 2, dtype=torch.bool)
    padding[12:14, 0] = True  # sample 0 pads steps 12 and 13 (lags 7 and 6): its state is held over them
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=12, padding=padding)
    # Sample 0 is its sequence with the padding taken out, two lags shifted beyond it.
    kept = torch.cat([torch.arange(12), torch.arange(14, 20)])
    packed = _alone(model, x[kept], y[kept], 0, 10)
    sample0 = torch.cat([packed[:6], torch.zeros(2, dtype=torch.float64), packed[6:11]])
    torch.testing.assert_close(horizon.norms, (sample0 + _alone(model, x, y, 1, 12)) / 2, rtol=0, atol=1e-12)
    # Padding at the last step: the sample's target does not count, the mean is over the other one.
    padding[19, 0] = True
    torch.testing.assert_close(gradient_horizon(model, x, y, nn.MSELoss(), max_lag=12, padding=padding).norms,
                               _alone(model, x, y, 1, 12), rtol=0, atol=1e-12)


def test_ignored_targets_batch_first():
    torch.manual_seed(0)
    model = DictCellNet()
    x, y = _data(10, dim=1)  # (B, T, F)
    call = lambda m, x_t, h: m(x_t, state=h)  # noqa: E731
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, -1] = False
    horizon = gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, dim=1, model_fn=call, hidden_batch_dim=0, mask=mask)
    alone = [gradient_horizon(model, x[b:b + 1], y[b:b + 1], nn.MSELoss(), max_lag=5, dim=1, model_fn=call,
                              hidden_batch_dim=0).norms for b in (0, 2)]
    torch.testing.assert_close(horizon.norms, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-12)
    mask[:, -1] = False
    with pytest.raises(ValueError, match=r"nothing to measure: no sample's target at the last step counts"):
        gradient_horizon(model, x, y, nn.MSELoss(), max_lag=5, dim=1, model_fn=call, hidden_batch_dim=0, mask=mask)


@pytest.mark.parametrize("name, value, got", [
    ("resets", torch.zeros(6, 2, dtype=torch.bool), r"shape \(6, 2\) torch.bool"),
    ("padding", torch.zeros(6, 3), r"shape \(6, 3\) torch.float32"),
    ("mask", [[True] * 3] * 6, r"list"),
])
def test_bad_sequence_marks_are_named(name, value, got):
    x, y = _data(6)
    with pytest.raises(ValueError, match=rf"{name} must be a bool tensor of the shape of x's first two axes \(6, 3\), got {got}"):
        gradient_horizon(LSTMNet(), x, y, nn.MSELoss(), max_lag=2, **{name: value})
    with pytest.raises(TypeError, match=r"train_mode must be a bool, got str"):
        gradient_horizon(LSTMNet(), x, y, nn.MSELoss(), max_lag=2, train_mode="eval")
