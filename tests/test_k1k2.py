"""TBPTT(k1, k2) in both overlap modes against the brute-force reference, in float64."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.reference import reference_trajectory

LR = 0.1
MODES = ["recompute", "retain"]


def batches_trajectory(model, batches, k1, k2, overlap, **trainer_kwargs):
    """Parameters after every SGD update of the trainer over ``batches`` (one epoch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap, **trainer_kwargs
    )
    trajectory = []

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def record(_):
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.run(batches)
    return trajectory


def train_trajectory(model, x, y, k1, k2, overlap, dim=0):
    return batches_trajectory(model, [(x, y)], k1, k2, overlap, dim=dim)


def assert_same_trajectory(got, expected):
    assert len(got) == len(expected)
    for update, (a, b) in enumerate(zip(got, expected)):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-10, msg=f"update {update + 1}, {name}")


def check(kind, T, k1, k2, overlap, dim=0, **model_kwargs):
    x, y = make_data(T, batch_first=model_kwargs.get("batch_first", False))
    expected = reference_trajectory(make_model(kind, **model_kwargs), x, y, k1, k2, overlap, LR, nn.MSELoss(), dim)
    got = train_trajectory(make_model(kind, **model_kwargs), x, y, k1, k2, overlap, dim=dim)
    assert_same_trajectory(got, expected)


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM", "cell"])
@pytest.mark.parametrize("T,k1,k2", [(10, 3, 5), (12, 2, 6), (11, 4, 4), (9, 2, 7)])
def test_matches_reference(kind, overlap, T, k1, k2):
    check(kind, T, k1, k2, overlap)


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize(
    "T,k1,k2",
    [
        (7, 3, 3),  # T not a multiple of k1, k2 == k1
        (7, 3, 4),  # T not a multiple of k1, short last chunk with overlap
        (5, 2, 9),  # k2 >= T: every window reaches back to the start
        (6, 6, 8),  # one chunk
        (3, 5, 5),  # k1 > T
        (9, 1, 1),  # k1 = 1, no overlap
        (9, 1, 4),  # k1 = 1, sliding window
        (8, 1, 20),  # k1 = 1, window longer than the sequence
        (1, 1, 3),  # a single step
    ],
)
def test_edge_cases(overlap, T, k1, k2):
    check("LSTM", T, k1, k2, overlap)


@pytest.mark.parametrize("overlap", MODES)
def test_batch_first(overlap):
    check("GRU", 10, 3, 5, overlap, dim=1, batch_first=True)


@pytest.mark.parametrize("overlap", MODES)
def test_two_layer_lstm_tuple_hidden(overlap):
    check("LSTM", 10, 2, 5, overlap, layers=2)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 14),
    k1=st.integers(1, 5),
    extra=st.integers(0, 8),
    overlap=st.sampled_from(MODES),
    kind=st.sampled_from(["RNN", "LSTM"]),
)
def test_property_matches_reference(T, k1, extra, overlap, kind):
    check(kind, T, k1, k1 + extra, overlap)


def test_modes_agree_when_k2_equals_k1_and_differ_otherwise():
    x, y = make_data(12)
    same = [train_trajectory(make_model("GRU"), x, y, 3, 3, mode)[-1] for mode in MODES]
    assert_same_trajectory([same[0]], [same[1]])
    differ = [train_trajectory(make_model("GRU"), x, y, 3, 6, mode)[-1] for mode in MODES]
    assert any(not torch.allclose(differ[0][n], differ[1][n]) for n in differ[0])


def test_overlap_changes_the_gradient():
    # Guards the reference itself: a longer window must give a different trajectory.
    x, y = make_data(10)
    short = train_trajectory(make_model("RNN"), x, y, 3, 3, "recompute")[-1]
    long = train_trajectory(make_model("RNN"), x, y, 3, 6, "recompute")[-1]
    assert any(not torch.allclose(short[n], long[n]) for n in short)


@pytest.mark.parametrize("overlap", MODES)
def test_adam_steps_in_place_without_inplace_errors(overlap):
    # The forum recipe's crash: optimizer.step() changes parameters that a retained graph saved.
    model = make_model("LSTM").float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=2, k2=7, overlap=overlap)
    x, y = (t.float() for t in make_data(20))
    trainer.run([(x, y)] * 2, max_epochs=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("k1,k2", [(2, 7), (1, 5), (4, 4)])
def test_kept_window_is_bounded_by_k2_not_t(overlap, k1, k2):
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap,
        carry_state=True,
    )
    window = trainer.carried_state.window
    spans = []

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def measure(engine):
        kept = window.segments if overlap == "retain" else window.inputs.chunks
        spans.append((engine.state.chunk.stop - min((k[0] for k in kept), default=engine.state.chunk.stop), len(kept)))

    trainer.run([make_data(60)] * 4)  # one stream of 240 steps
    # Kept: what the next window needs, from its start (k2 - k1 before the next chunk) on, rounded down to
    # a whole input chunk for recompute: never more than k2 - 1 steps back.
    assert max(span for span, _ in spans) <= k2 - 1
    assert max(count for _, count in spans) <= 2 * k2


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["LSTM", "cell"])
@pytest.mark.parametrize("T,k1,k2,every", [(20, 4, 12, 3), (12, 12, 12, 5), (15, 2, 9, 1), (10, 3, 5, 100)])
def test_checkpointed_windows_match_reference(kind, overlap, T, k1, k2, every):
    x, y = make_data(T)
    expected = reference_trajectory(make_model(kind), x, y, k1, k2, overlap, LR, nn.MSELoss())

    def counted(calls):
        def model_fn(model, x, hidden):
            calls.append(x.shape[0])
            return model(x) if hidden is None else model(x, hidden)

        return model_fn

    calls, plain_calls = [], []
    # The calls fixed (recompute), so that only checkpointing changes them: the automatic choice adds calls of its own.
    fixed = {"merge_calls": False} if overlap == "recompute" else {}
    got = batches_trajectory(make_model(kind), [(x, y)], k1, k2, overlap, checkpoint_every=every, model_fn=counted(calls),
                             **fixed)
    assert_same_trajectory(got, expected)
    assert max(calls) <= every  # no model call spans more than one checkpointed segment
    batches_trajectory(make_model(kind), [(x, y)], k1, k2, overlap, model_fn=counted(plain_calls), **fixed)
    if every < k2:  # each segment runs again in the backward pass
        assert sum(calls) > sum(plain_calls)
