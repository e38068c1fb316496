"""burn_in=b (docs/contract.md, "Burn-in"): warm-up steps build the state, score nothing and take no gradient; exact against
the step-by-step float64 reference in both overlap modes, with every feature."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from ignite.metrics import Loss
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer
from ignite_tbptt.sequences import burn_in_marks
from tests.models import make_data, make_model
from tests.reference import _burn_in, reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory, batches_trajectory

MODES = ["recompute", "retain"]


def mask(T, lengths):
    return torch.arange(T).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)


def resets_at(T, B, places):
    r = torch.zeros(T, B, dtype=torch.bool)
    for t, b in places:
        r[t, b] = True
    return r


def check(kind, T, k1, k2, overlap, burn_in, valid=None, resets=None, pieces=None, **options):
    """The trainer on ``[x, y, info]`` (or on ``pieces`` lengths with carried state) against the reference."""
    x, y = make_data(T)
    expected = reference_trajectory(make_model(kind), x, y, k1, k2, overlap, LR, nn.MSELoss(), valid=valid,
                                    resets=resets, burn_in=burn_in, accumulate=options.get("gradient_accumulation_steps", 1))
    info = {k: v for k, v in (("mask", valid), ("resets", resets)) if v is not None}
    bounds = [0] + list(torch.tensor(pieces or [T]).cumsum(0).tolist())
    batches = [(x[a:b], y[a:b], {k: v[a:b] for k, v in info.items()}) for a, b in zip(bounds[:-1], bounds[1:])]
    got = batches_trajectory(make_model(kind), batches, k1, k2, overlap, burn_in=burn_in,
                             carry_state=pieces is not None, **options)
    assert_same_trajectory(got, expected)
    return got, expected


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "cell"])
@pytest.mark.parametrize(
    "T,k1,k2,b",
    [
        (12, 3, 3, 5),  # burn-in longer than a chunk
        (12, 3, 7, 4),  # windows that would reach back into the burn-in
        (12, 4, 4, 6),  # the contract's example: (0, 4] scores nothing, (4, 8] scores 7 and 8
        (10, 2, 9, 1),
        (9, 3, 5, 20),  # burn-in longer than the sequence: nothing is scored
    ],
)
def test_burn_in_matches_the_reference(kind, T, k1, k2, b, overlap):
    got, _ = check(kind, T, k1, k2, overlap, b)
    start = {n: p.detach() for n, p in make_model(kind).named_parameters()}
    warm_chunks = sum(1 for s in range(0, T, k1) if min(s + k1, T) <= b)
    for update in got[:warm_chunks]:  # chunks inside the burn-in make no update
        assert all(torch.equal(update[n], start[n]) for n in start)


@pytest.mark.parametrize("overlap", MODES)
def test_resets_and_padding_inside_the_burn_in(overlap):
    T = 14
    resets = resets_at(T, 3, [(2, 0), (6, 1), (9, 2), (12, 0)])  # some inside a warm-up, one restarting it late
    valid = mask(T, [14, 11, 8])
    valid[3:5, 2] = False  # padding inside sample 2's warm-up
    check("LSTM", T, 3, 6, overlap, 4, valid=valid, resets=resets)


@pytest.mark.parametrize("overlap", MODES)
def test_a_segment_without_a_graph_does_not_stop_the_chain(overlap):
    # Chunk (2, 4] is cut at the next window start 3, and its last segment is padding for every sample: it runs
    # without a graph, so no gradient reaches its input. retain's chain used to stop there, before the gradient
    # of step 3 reached step 2 (found by the property test below).
    check("GRU", 5, 2, 3, overlap, 1, valid=mask(5, [0, 0, 3]))


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("pieces", [[6, 6, 6], [3, 9, 6]])  # multiples of k1: one chunk grid
def test_a_burn_in_longer_than_a_batch_carries_over(overlap, pieces):
    check("GRU", 18, 3, 5, overlap, 8, resets=resets_at(18, 3, [(10, 1)]), pieces=pieces)


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("options", [{"checkpoint_every": 2}, {"gradient_accumulation_steps": 2}],
                         ids=["checkpoint_every", "accumulate"])
def test_burn_in_with_other_features(overlap, options):
    check("GRU", 16, 3, 7, overlap, 5, valid=mask(16, [16, 12, 9]), **options)


def test_burn_in_under_autocast_tracks_the_float32_run():
    x, y = (t.float() for t in make_data(16))
    runs = []
    for amp in (None, "amp"):
        model = make_model("GRU").float()
        batches_trajectory(model, [(x, y)], 4, 8, "retain", burn_in=5, amp_mode=amp)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 16), k1=st.integers(1, 5), extra=st.integers(0, 5), b=st.integers(0, 12),
       lengths=st.lists(st.integers(0, 16), min_size=3, max_size=3), reset_steps=st.lists(st.integers(0, 15), max_size=3),
       overlap=st.sampled_from(MODES))
def test_property_burn_in_matches_the_reference(T, k1, extra, b, lengths, reset_steps, overlap):
    valid = mask(T, [min(n, T) for n in lengths])
    resets = resets_at(T, 3, [(t, i % 3) for i, t in enumerate(reset_steps) if t < T])
    check("GRU", T, k1, k1 + extra, overlap, b, valid=valid, resets=resets)


def test_the_vectorised_marks_equal_the_step_by_step_ones():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        T, B, b = int(torch.randint(1, 30, (1,), generator=g)), 4, int(torch.randint(0, 8, (1,), generator=g))
        valid = torch.rand(T, B, generator=g) > 0.2
        resets = torch.rand(T, B, generator=g) > 0.85
        warm, cuts = _burn_in(T, B, valid, resets, b)
        got_warm, got_cut, _ = burn_in_marks(valid, resets, T, B, b, None)
        assert torch.equal(got_warm, warm)
        expected_cut = torch.stack([c if c is not None else torch.zeros(B, dtype=torch.bool) for c in cuts])
        assert torch.equal(got_cut, expected_cut)


def test_spans_where_every_sample_warms_up_run_without_a_graph():
    model = make_model("GRU")
    grad_modes = []
    model.register_forward_pre_hook(lambda m, args: grad_modes.append(torch.is_grad_enabled()))
    x, y = make_data(12)
    batches_trajectory(model, [(x, y)], 4, 4, "recompute", burn_in=6)
    assert grad_modes[:2] == [False, False] and grad_modes[-1] is True  # (0, 4], (4, 6] warm; then a graph


def test_the_spec_example_scores_steps_7_and_8_only():
    model = make_model("GRU")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                              tbtt_step=4, burn_in=6)
    weights = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: weights.append(e.state.chunk_weight))
    trainer.run([make_data(12)])
    assert weights == [0, 2 * 3, 4 * 3]  # 3 samples


def test_the_evaluator_leaves_the_burn_in_out_of_its_metrics():
    model = make_model("GRU")
    x, y = make_data(20)
    evaluator = create_supervised_tbptt_evaluator(
        model, {"mse": Loss(nn.MSELoss())}, tbtt_step=6, burn_in=7,
        output_transform=lambda x, y, y_pred: (y_pred, y),
    )
    got = evaluator.run([(x, y)]).metrics["mse"]
    with torch.no_grad():
        y_pred, _ = model(x)
    assert got == pytest.approx(float(nn.functional.mse_loss(y_pred[7:], y[7:])), rel=1e-6)  # Loss sums in float32


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_burn_in_is_refused_at_construction(bad, error):
    model = make_model("GRU")
    with pytest.raises(error, match="burn_in"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                        tbtt_step=3, burn_in=bad)
    with pytest.raises(error, match="burn_in"):
        create_supervised_tbptt_evaluator(model, tbtt_step=3, burn_in=bad)
