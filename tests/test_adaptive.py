"""``k2=AdaptiveK2(delta, ...)`` and retain's state-gradient monitor: the window the trainer adapts to is
``gradient_horizon``'s suggestion on the batches it saw, its updates are the step-by-step reference's with those
windows, it is reported in ``engine.state.k2``, saved and resumed; the monitor's norms are the state gradients an
independent autograd run computes."""

import math

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import (
    AdaptiveK2, ARTBP, GradientHorizon, RandomLength, Tbptt_Events, create_supervised_tbptt_trainer, gradient_horizon,
)
from tests.models import make_data, make_model
from tests.reference import reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory

MODES = ["recompute", "retain"]
K1, LENGTH, BATCHES = 3, 12, 4  # four batches of 12 steps of one carried stream, chunks of 3: 4 updates a batch

pytestmark = pytest.mark.usefixtures("one_thread")


def stream_batches(seed=1):
    x, y = make_data(LENGTH * BATCHES, seed=seed)
    return x, y, [(x[i:i + LENGTH], y[i:i + LENGTH]) for i in range(0, LENGTH * BATCHES, LENGTH)]


def train(model, batches, k2, overlap, lr=LR, **options):
    """The trainer's parameters after every update, its windows, and the trainer."""
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=lr), nn.MSELoss(),
                                              tbtt_step=K1, k2=k2, overlap=overlap, carry_state=True, **options)
    record = {"params": [], "windows": [], "k2": []}

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def keep(engine):
        record["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        record["windows"].append(engine.state.chunk.window_start)
        record["k2"].append(engine.state.k2)

    trainer.run(batches)
    return record, trainer


def windows_for(Ks, k1=K1, length=LENGTH):
    """Each update's window start from the K estimated at each batch's start, by the rule of ``adaptive_plan``,
    written out: batch b keeps the overlap batch b - 1 provided for (its own estimate's at the first batch), and
    its chunks start their windows no later than the next batch's first window, within this batch."""
    windows = []
    for b, K in enumerate(Ks):
        offset, stop = b * length, (b + 1) * length
        overlap = (Ks[b - 1] if b else K) - 1
        floor = 0 if b == 0 else max(offset - length, offset - overlap)
        ahead = max(offset, stop - (K - 1))
        windows += [max(0, floor, min(s - overlap, ahead)) for s in range(offset, stop, k1)]
    return windows


# ---- the window is the horizon's suggestion ------------------------------------------------------------------------


CLAMPED = "ignore:AdaptiveK2. the estimate wants"  # a small k_max on purpose: the clamp's warning is tested below


@pytest.mark.filterwarnings(CLAMPED)
@pytest.mark.parametrize("overlap", MODES)
def test_the_window_is_the_horizons_suggestion_on_the_batches_seen(overlap):
    """Learning rate 0: the state the trainer carries into batch b is the model run over the batches before it."""
    x, y, batches = stream_batches()
    delta, k_max = 0.05, 9
    record, trainer = train(make_model("LSTM"), batches, AdaptiveK2(delta, every=1, k_max=k_max, max_lag=8), overlap,
                            lr=0.0)
    model, expected = make_model("LSTM"), []
    for b in range(BATCHES):
        hidden = None if b == 0 else model(x[:b * LENGTH])[1]
        horizon = gradient_horizon(model, *batches[b], nn.MSELoss(), max_lag=8, tbtt_step=K1,
                                   hidden=None if hidden is None else tuple(h.detach() for h in hidden))
        expected.append(min(k_max, max(1, horizon.suggest(delta))))
    Ks = [K for _, K, _ in trainer.adaptive_k2.history]
    assert Ks == expected
    assert [u for u, _, _ in trainer.adaptive_k2.history] == [0, 4, 8, 12]  # every=1: at every batch's start
    assert record["windows"] == windows_for(Ks)


def test_an_estimate_averages_several_batches():
    """batches=3: the norms of three consecutive batches averaged, K from the mean so far at each of them."""
    x, y, batches = stream_batches()
    delta, k_max = 0.05, 50
    _, trainer = train(make_model("LSTM"), batches, AdaptiveK2(delta, every=100, k_max=k_max, max_lag=8, batches=3),
                       "recompute", lr=0.0)
    model, norms, expected = make_model("LSTM"), [], []
    for b in range(3):
        hidden = None if b == 0 else tuple(h.detach() for h in model(x[:b * LENGTH])[1])
        norms.append(gradient_horizon(model, *batches[b], nn.MSELoss(), max_lag=8, tbtt_step=K1, hidden=hidden).norms)
        mean = GradientHorizon.from_norms(torch.stack(norms).mean(0))
        expected.append((4 * b, min(k_max, mean.suggest(delta)), mean.decay))
    assert [(u, K) for u, K, _ in trainer.adaptive_k2.history] == [(u, K) for u, K, _ in expected]
    assert [beta for _, _, beta in trainer.adaptive_k2.history] == pytest.approx([beta for _, _, beta in expected], rel=1e-9)
    assert len({K for _, K, _ in expected}) > 1  # the mean moves K: the test sees the averaging
    assert trainer.adaptive_k2.last_at == 8 and trainer.state_dict()["tbptt_adaptive_k2"]["pending"] == []
    # Mid-estimate, the batches measured so far are saved and the estimate stays due.
    _, trainer = train(make_model("LSTM"), batches[:2], AdaptiveK2(delta, every=100, k_max=k_max, max_lag=8, batches=3),
                       "recompute", lr=0.0)
    saved = trainer.state_dict()["tbptt_adaptive_k2"]
    assert torch.tensor(saved["pending"], dtype=torch.float64).equal(torch.stack(norms[:2]))
    resumed = AdaptiveK2(delta, every=100, k_max=k_max, max_lag=8, batches=3)
    resumed.load_state_dict(saved)
    assert resumed.due(8) and resumed.K == expected[1][1]


@pytest.fixture
def scripted(monkeypatch):
    """Ks chosen by script, in place of the measured ones, to drive the schedule through growth and shrinkage."""
    def script(Ks):
        chosen = iter(Ks)
        monkeypatch.setattr(AdaptiveK2, "choose", lambda self, horizon: next(chosen))
    return script


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("Ks", [[2, 9, 1, 6], [7, 1, 12, 4], [4, 4, 4, 4]])
def test_the_updates_are_the_references_with_those_windows(overlap, Ks, scripted):
    scripted(Ks)
    x, y, batches = stream_batches()
    record, trainer = train(make_model("GRU"), batches, AdaptiveK2(0.1, every=4, k_max=12, max_lag=4), overlap)
    windows = windows_for(Ks)
    assert record["windows"] == windows
    for c, w in enumerate(windows):  # every loss term reaches back at least K steps (all K - 1 < LENGTH here)
        K = Ks[c // 4 - 1] if c >= 4 else Ks[0]
        assert c * K1 - w + 1 >= min(K, c * K1 + 1)
    assert windows == sorted(windows)
    expected = reference_trajectory(make_model("GRU"), x, y, K1, K1, overlap, LR, nn.MSELoss(), windows=windows)
    assert_same_trajectory(record["params"], expected)


@pytest.mark.parametrize("overlap", MODES)
def test_a_constant_K_trains_as_the_fixed_window(overlap):
    x, y, batches = stream_batches()
    adaptive, _ = train(make_model("LSTM"), batches, AdaptiveK2(0.1, every=10**6, k_max=9, initial=6), overlap)
    fixed, _ = train(make_model("LSTM"), batches, K1 + 6 - 1, overlap)
    assert adaptive["windows"] == fixed["windows"] and adaptive["k2"] == fixed["k2"] == [8] * 16
    assert_same_trajectory(adaptive["params"], fixed["params"])


def test_random_lengths_take_the_window_too(scripted):
    scripted([3, 8, 2, 5])
    _, _, batches = stream_batches()
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                              tbtt_step=RandomLength(4, min_length=2, std=1.0), carry_state=True,
                                              k2=AdaptiveK2(0.1, every=1, k_max=12, max_lag=4), overlap="retain")
    reach = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED,
                              lambda e: reach.append(e.state.chunk.start - e.state.chunk.window_start))
    trainer.run(batches)
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
    assert min(reach[1:3]) >= 2  # the first batch's own estimate, K = 3: two steps before each chunk but the first


# ---- engine.state.k2 and the state_dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("k2,expected", [(None, K1), (7, 7), (ARTBP(0.5), None)])
def test_every_trainer_reports_its_window(k2, expected):
    _, _, batches = stream_batches()
    model = make_model("GRU")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), K1, k2=k2)
    assert trainer.state.k2 == expected
    assert trainer.run(batches[:1]).k2 == expected


def test_the_adaptive_window_is_reported_per_batch(scripted):
    scripted([2, 5, 3, 6])
    _, _, batches = stream_batches()
    record, trainer = train(make_model("GRU"), batches, AdaptiveK2(0.1, every=4, k_max=8, max_lag=4), "recompute")
    # The first batch uses its own estimate (a fresh stream); every later batch the one made at the batch before.
    assert record["k2"] == [K1 + K - 1 for K in (2, 2, 5, 3) for _ in range(4)]
    fresh = create_supervised_tbptt_trainer(make_model("GRU"), torch.optim.SGD(make_model("GRU").parameters(), 0.1),
                                            nn.MSELoss(), K1, k2=AdaptiveK2(0.1, k_max=8))
    assert fresh.state.k2 is None  # no estimate yet, no initial
    assert create_supervised_tbptt_trainer(make_model("GRU"), torch.optim.SGD(make_model("GRU").parameters(), 0.1),
                                           nn.MSELoss(), K1, k2=AdaptiveK2(0.1, k_max=8, initial=4)).state.k2 == 6


def test_the_trainer_adapts_its_own_copy():
    adaptive = AdaptiveK2(0.1, every=2, k_max=8, max_lag=4)
    _, trainer = train(make_model("GRU"), stream_batches()[2], adaptive, "retain")
    assert adaptive.K is None and adaptive.history == [] and trainer.adaptive_k2.K is not None
    assert trainer.state_dict()["tbptt_adaptive_k2"]["K"] == trainer.adaptive_k2.K


@pytest.mark.parametrize("overlap", MODES)
def test_a_resumed_run_continues_with_the_window(overlap, tmp_path, scripted):
    scripted([2, 7, 3, 5, 8, 2, 6, 4] * 3)
    _, _, batches = stream_batches(seed=3)

    def run(resume_from=None):
        model = make_model("LSTM")
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=K1, overlap=overlap,
                                                  k2=AdaptiveK2(0.1, every=4, k_max=9, max_lag=4), carry_state=True,
                                                  deterministic=True)
        seen = []
        trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED,
                                  lambda e: seen.append((e.state.chunk.window_start, e.state.k2)))
        to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
        if resume_from is None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False), n_saved=None))
        else:
            Checkpoint.load_objects(to_save, torch.load(resume_from, weights_only=False))
            assert trainer.adaptive_k2.K == 2  # estimated at batch 6's start, for batch 7
        trainer.run(batches, max_epochs=2)
        return seen, {n: p.detach() for n, p in model.named_parameters()}

    whole, whole_params = run()
    scripted([6, 4] * 3)  # the estimates the resumed run makes: those after the checkpoint
    resumed, params = run(tmp_path / "checkpoint_6.pt")  # mid-way through epoch 2
    assert resumed == whole[-len(resumed):]
    for n in whole_params:
        torch.testing.assert_close(params[n], whole_params[n], rtol=0, atol=1e-12)


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((0.0,), {"k_max": 5}, ValueError, r"delta, the tolerable relative bias, must be in \(0, 1\), got 0.0"),
    ((1.5,), {"k_max": 5}, ValueError, r"must be in \(0, 1\), got 1.5"),
    (("0.1",), {"k_max": 5}, TypeError, r"AdaptiveK2: delta must be a float in \(0, 1\), got str"),
    ((0.1,), {"k_max": 5, "k_min": 6}, ValueError, r"AdaptiveK2: k_min \(6\) must be <= k_max \(5\)"),
    ((0.1,), {"k_max": 5, "k_min": 0}, ValueError, r"AdaptiveK2: k_min must be >= 1, got 0"),
    ((0.1,), {"k_max": 5, "max_lag": 0}, ValueError, r"AdaptiveK2: max_lag must be >= 1, got 0"),
    ((0.1,), {"k_max": 5.0}, TypeError, r"AdaptiveK2: k_max must be an int, got float"),
    ((0.1,), {"k_max": 5, "every": True}, TypeError, r"AdaptiveK2: every must be an int, got bool"),
    ((0.1,), {"k_max": 5, "initial": 7}, ValueError, r"initial \(7\) must lie in \[k_min, k_max\] = \[1, 5\]"),
    ((0.1,), {"train_mode": 1}, TypeError, r"AdaptiveK2: train_mode must be a bool, got int"),
    ((0.1,), {"batches": 0}, ValueError, r"AdaptiveK2: batches must be >= 1, got 0"),
])
def test_bad_input_is_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        AdaptiveK2(*args, **kwargs)


def test_the_defaults():
    adaptive = AdaptiveK2(0.1)
    assert (adaptive.k_min, adaptive.k_max, adaptive.max_lag, adaptive.every, adaptive.train_mode, adaptive.batches) == (
        1, 300, 100, 100, True, 1)


def test_a_first_batch_too_short_to_measure_is_named():
    model = make_model("GRU")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1,
                                              k2=AdaptiveK2(0.1))
    with pytest.raises(ValueError, match=r"first batch has 12 time steps, and measuring lags 0..100 needs max_lag \+ 1 = 101"):
        trainer.run(stream_batches()[2][:1])


@pytest.mark.parametrize("k2", [(ARTBP(0.2), AdaptiveK2(0.1)), [AdaptiveK2(0.1), ARTBP(0.2)]])
def test_artbp_and_adaptive_together_name_both(k2):
    model = make_model("GRU")
    with pytest.raises(TypeError, match=r"k2 takes one window kind, got a (tuple of ARTBP and AdaptiveK2|list of AdaptiveK2 and ARTBP)"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1, k2=k2)
    with pytest.raises(TypeError, match=r"k2 must be an int or ARTBP\(p\) \(random truncation\) or AdaptiveK2\(delta\) \(adaptive\), got str"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1, k2="adaptive")


def test_no_decay_takes_k_max_with_one_warning():
    model = LinearRNN()
    with torch.no_grad():
        model.A.copy_(1.1 * torch.eye(3, dtype=torch.float64))  # the gradient grows by 1.1 a step back
    _, _, batches = stream_batches()
    with pytest.warns(UserWarning, match=r"AdaptiveK2: no K can be estimated from this batch: no geometric decay was "
                      r"measured \(decay beta = 1.1\).*K = k_max = 7") as caught:
        _, trainer = train(model, batches, AdaptiveK2(0.1, every=1, k_max=7, max_lag=6), "retain", lr=0.0)
    assert [(K, round(beta, 6)) for _, K, beta in trainer.adaptive_k2.history] == [(7, 1.1)] * BATCHES
    assert sum("no geometric decay" in str(w.message) for w in caught) == 1


class Scaled(nn.Module):
    """The GRU test model with its output times ``scale``: ``inf`` overflows the loss, ``0`` leaves no gradient."""

    def __init__(self, scale):
        super().__init__()
        self.inner, self.scale = make_model("GRU"), scale

    def forward(self, x, hidden=None):
        y, hidden = self.inner(x, hidden)
        return y * self.scale, hidden


@pytest.mark.parametrize("scale, why", [
    (float("inf"), r"the gradient norms are not finite at lags \[0, 1, 2, 3, 4\]\.\.\.: the loss or the model overflowed"),
    (0.0, r"the gradient of the last step's loss is zero at every lag"),
])
def test_nothing_measurable_says_why(scale, why):
    _, _, batches = stream_batches()
    with pytest.warns(UserWarning, match=r"AdaptiveK2: no K can be estimated from this batch: " + why + r".*K = k_max = 9"):
        _, trainer = train(Scaled(scale), batches[:1], AdaptiveK2(0.1, every=1, k_max=9, max_lag=8), "recompute", lr=0.0)
    assert trainer.adaptive_k2.K == 9


def test_a_clamp_warns_with_the_K_it_wanted():
    """A linear recurrence of rate 0.9: the estimate wants K = 33 at delta = 0.05 (the closed form of
    test_horizon's geometric test with max_lag = 10); k_max = 7 clamps it, once with a warning."""
    model = LinearRNN()
    with torch.no_grad():
        model.A.copy_(0.9 * torch.eye(3, dtype=torch.float64))
    _, _, batches = stream_batches()
    wanted = math.ceil(math.log(0.05 * (1 - 2 * 0.9 ** 11)) / math.log(0.9))
    with pytest.warns(UserWarning, match=rf"the estimate wants K = {wanted} for delta = 0.05, clamped to k_max = 7") as caught:
        _, trainer = train(model, batches, AdaptiveK2(0.05, every=1, k_max=7, max_lag=10), "retain", lr=0.0)
    assert [K for _, K, _ in trainer.adaptive_k2.history] == [7] * BATCHES
    assert sum("clamped" in str(w.message) for w in caught) == 1
    with torch.no_grad():
        model.A.copy_(0.3 * torch.eye(3, dtype=torch.float64))  # 0.3 ** 1 <= 0.9 * (1 - 2 * 0.3 ** 11): K = 1
    with pytest.warns(UserWarning, match=r"the estimate wants K = 1 for delta = 0.9, clamped to k_min = 5"):
        train(model, batches[:1], AdaptiveK2(0.9, every=1, k_min=5, k_max=7, max_lag=10), "retain", lr=0.0)


def test_the_monitor_needs_retain():
    model = make_model("GRU")
    with pytest.raises(ValueError, match=r'monitor_state_grads=True needs overlap="retain"'):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1,
                                        monitor_state_grads=True)


# ---- the monitor ---------------------------------------------------------------------------------------------------


class LinearRNN(nn.Module):
    """``h_t = A h_{t-1} + B x_t``, ``y_t = C h_t``."""

    def __init__(self, n_in=2, n_hidden=3, n_out=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(0.6 * torch.randn(n_hidden, n_hidden, generator=g, dtype=torch.float64) / n_hidden ** 0.5)
        self.B = nn.Parameter(torch.randn(n_hidden, n_in, generator=g, dtype=torch.float64))
        self.C = nn.Parameter(torch.randn(n_out, n_hidden, generator=g, dtype=torch.float64))

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], self.A.shape[0]) if hidden is None else hidden
        outs = []
        for x_t in x.unbind(0):
            h = h @ self.A.T + x_t @ self.B.T
            outs.append(h @ self.C.T)
        return torch.stack(outs), h


def state_grad_norms_by_hand(model, x, y, s, t, w, k1):
    """The norms of d(loss of chunk (s, t]) / d(state at each chunk start in [w, s]), newest first, by autograd
    through a step-by-step run from the state at ``w`` (the model's at fixed parameters). None where the window is
    the chunk alone: the trainer then backpropagates no state gradient at all."""
    if w == s:
        return torch.zeros(0, dtype=torch.float64)
    h = model(x[:w])[1].detach() if w else None
    boundaries, outs = {}, []
    for i in range(w, t):
        if i % k1 == 0 and h is not None:
            h = h.detach().requires_grad_() if i == w else h
            boundaries[i] = h
        y_i, h = model(x[i:i + 1], h)
        if i >= s:
            outs.append(y_i)
    loss = nn.functional.mse_loss(torch.cat(outs), y[s:t])
    positions = sorted(boundaries, reverse=True)
    if not positions:
        return torch.zeros(0, dtype=torch.float64)
    grads = torch.autograd.grad(loss, [boundaries[p] for p in positions])
    return torch.stack([g.norm() for g in grads])


@pytest.mark.parametrize("k2", [3, 5, 9, 10])
def test_the_monitor_reports_the_state_gradient_at_each_chunk_start(k2):
    x, y = make_data(15, seed=4)
    model = LinearRNN()
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(), K1,
                                              k2=k2, overlap="retain", monitor_state_grads=True)
    seen = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: seen.append(e.state.state_grad_norms))
    trainer.run([(x, y)])
    for c, got in enumerate(seen):
        s, t = c * K1, (c + 1) * K1
        expected = state_grad_norms_by_hand(model, x, y, s, t, max(0, s - (k2 - K1)), K1)
        assert got.device == x.device
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, check_dtype=len(got) > 0, msg=f"update {c}")
    assert len(seen[-1]) == (1 + (k2 - K1) // K1 if k2 > K1 else 0)


@pytest.mark.filterwarnings(CLAMPED)
@pytest.mark.parametrize("k2", [6, AdaptiveK2(0.1, every=2, k_max=8, max_lag=4)])
def test_the_monitor_changes_nothing(k2):
    _, _, batches = stream_batches()
    plain, _ = train(make_model("LSTM"), batches, k2, "retain")
    monitored, trainer = train(make_model("LSTM"), batches, k2, "retain", monitor_state_grads=True)
    for a, b in zip(plain["params"], monitored["params"]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert trainer.state.state_grad_norms.dim() == 1


# ---- the estimate sees the batch's resets, padding, masks and burn-in -----------------------------------------------

SEQ_DELTA, SEQ_LAG, SEQ_T = 0.05, 12, 20  # one batch of 20 steps, lags 0..12: the estimate runs before any update


def first_estimate(batch, dim=0, **options):
    """The trainer's ``AdaptiveK2`` after its first estimate, on ``batch`` (at the initial parameters)."""
    model = make_model("LSTM", batch_first=dim == 1)
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), K1,
                                              k2=AdaptiveK2(SEQ_DELTA, k_max=50, max_lag=SEQ_LAG), dim=dim, **options)
    trainer.run([batch])
    return trainer.adaptive_k2


def measured(x, y, dim=0, max_lag=SEQ_LAG, **marks):
    """``gradient_horizon`` called directly, on the same initial model, with the trainer's options."""
    model = make_model("LSTM", batch_first=dim == 1)
    return gradient_horizon(model, x, y, nn.MSELoss(), max_lag=max_lag, tbtt_step=K1, dim=dim, **marks)


def assert_estimated_as(adaptive, horizon):
    torch.testing.assert_close(adaptive.horizon.norms, horizon.norms, rtol=0, atol=1e-12)
    assert adaptive.K == horizon.suggest(SEQ_DELTA)


@pytest.mark.parametrize("dim", [0, 1], ids=["time-first", "batch-first"])
def test_a_batch_whose_rows_all_reset_is_measured_from_the_resets(dim):
    """The issue's case: every row starts a new document 6 steps before the end. Lags 5.. reach the states from
    before the reset and count 0, lags 0..4 are the new documents' own: K is 5, the whole of them, not the 10 of
    the lags measured across the reset."""
    x, y = make_data(SEQ_T, batch_first=dim == 1)
    resets = torch.zeros(SEQ_T, 3, dtype=torch.bool)
    resets[SEQ_T - 6] = True
    resets = resets if dim == 0 else resets.t()
    adaptive = first_estimate((x, y, {"resets": resets}), dim)
    honest = measured(x, y, dim, resets=resets)
    assert_estimated_as(adaptive, honest)
    pieces = [t.narrow(dim, SEQ_T - 6, 6) for t in (x, y)]  # the documents after the reset, measured alone
    torch.testing.assert_close(honest.norms[:5], measured(*pieces, dim, max_lag=5).norms[:5], rtol=0, atol=1e-12)
    assert (honest.norms[5:] == 0).all()
    assert (adaptive.K, measured(x, y, dim).suggest(SEQ_DELTA)) == (5, 10)


@pytest.mark.parametrize("key", ["lengths", "mask"])
def test_padded_samples_are_left_out_of_the_estimate(key):
    """Sample 1 ends at step 15, and its padding is NaN (a float series padded with ``padding_value=nan``): the
    estimate is the other two samples' alone, not the ``k_max`` of non-finite norms. A ``"mask"`` holds the state
    as ``"lengths"`` does, so both are padding to the measurement."""
    x, y = make_data(SEQ_T)
    x[15:, 1], y[15:, 1] = float("nan"), float("nan")
    lengths = torch.tensor([SEQ_T, 15, SEQ_T])
    valid = torch.arange(SEQ_T).unsqueeze(1) < lengths
    adaptive = first_estimate((x, y, {"lengths": lengths} if key == "lengths" else {"mask": valid}))
    full = [0, 2]
    assert_estimated_as(adaptive, measured(x[:, full], y[:, full]))
    assert adaptive.K < adaptive.k_max
    assert not torch.isfinite(measured(x, y).norms).all()  # what the padded sample did to the estimate before


def test_burn_in_targets_are_left_out_of_the_estimate():
    """burn_in=3: sample 0 starts afresh 2 steps before the end and is still warming up at the last step, so its
    target there scores nothing and it is left out; the others' resets are made. (The cut at a burn-in's end is
    not applied: sample 2's lags 3..5 count, though the trainer's gradient stops 3 steps after its reset.)"""
    x, y = make_data(SEQ_T)
    resets = torch.zeros(SEQ_T, 3, dtype=torch.bool)
    resets[SEQ_T - 2, 0] = resets[SEQ_T - 6, 2] = True
    adaptive = first_estimate((x, y, {"resets": resets}), burn_in=3)
    scored = torch.ones(SEQ_T, 3, dtype=torch.bool)
    scored[:3] = False  # the stream's own burn-in
    scored[SEQ_T - 2:, 0] = scored[SEQ_T - 6:SEQ_T - 3, 2] = False
    assert_estimated_as(adaptive, measured(x, y, resets=resets, mask=scored))
    torch.testing.assert_close(adaptive.horizon.norms, measured(x[:, 1:], y[:, 1:], resets=resets[:, 1:]).norms,
                               rtol=0, atol=1e-12)


def test_a_batch_without_a_scored_last_step_waits():
    """No sample's target counts at the last step: gradient_horizon could measure nothing. At the first batch the
    error says why; later, the estimate waits for a batch that scores one there."""
    x, y = make_data(SEQ_T)
    lengths = torch.tensor([SEQ_T - 1, 15, 12])
    with pytest.raises(ValueError, match=r"the first batch scores no target at its last step .* pass initial=K"):
        first_estimate((x, y, {"lengths": lengths}))
    model = make_model("LSTM")
    adaptive = AdaptiveK2(SEQ_DELTA, every=1, max_lag=SEQ_LAG, initial=4)
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), K1,
                                              k2=adaptive)
    trainer.run([(x, y), (x, y, {"lengths": lengths}), (x, y)])  # 7 updates a batch; due from the second batch on
    assert [u for u, _, _ in trainer.adaptive_k2.history] == [14]  # not at the second batch: at the third
