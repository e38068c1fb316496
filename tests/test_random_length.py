"""tbtt_step=RandomLength(bptt): AWD-LSTM's random chunk lengths, the scaled learning rate, and exact updates."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import RandomLength, Tbptt_Events, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer
from ignite_tbptt.schedule import batch_plan
from tests.models import make_data, make_model
from tests.reference import reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory

MODES = ["recompute", "retain"]


def test_the_length_distribution_follows_the_rule():
    bptt, n = 70, 40000
    lengths = RandomLength(bptt, seed=3)
    draws = [lengths.next() for _ in range(n)]
    half = [d for d in draws if d < 0.75 * bptt]  # the bptt / 2 draws: 35 +- 5, far from 70 +- 5
    share = len(half) / n
    assert abs(share - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    mean = 0.95 * bptt + 0.05 * bptt / 2 - 0.5  # int() truncates a normal draw by 0.5 on average
    assert abs(statistics.fmean(draws) - mean) < 4 * statistics.pstdev(draws) / math.sqrt(n)
    assert abs(statistics.fmean(half) - (bptt / 2 - 0.5)) < 0.2
    small = RandomLength(6, seed=1)
    draws = [small.next() for _ in range(5000)]
    assert min(draws) == 5 and draws.count(5) > 0.4 * len(draws)  # max(5, ...) holds the floor
    capped = RandomLength(70, max_length=72, std=10, seed=0)
    assert max(capped.next() for _ in range(2000)) == 72


def test_the_same_seed_draws_the_same_lengths_and_peek_uses_none_up():
    a, b = RandomLength(30, seed=5), RandomLength(30, seed=5)
    peeked = a.peek(3)
    assert peeked == [b.next() for _ in range(3)] == [a.next() for _ in range(3)]
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)] and a.peek(1) == b.peek(1)
    assert [RandomLength(30, seed=6).next() for _ in range(5)] != [RandomLength(30, seed=5).next() for _ in range(5)]


def bounds_of(trainer_run):
    """The (start, stop) of every chunk the trainer ran, from state.chunk."""
    return [(c.start, c.stop) for c in trainer_run]


def trainer_for(model, bptt, k2, overlap, seed=0, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, nn.MSELoss(), tbtt_step=RandomLength(bptt, std=2.0, min_length=1, seed=seed), k2=k2,
        overlap=overlap, **kwargs
    )
    record = {"params": [], "chunks": [], "lr": []}
    optimizer.register_step_pre_hook(lambda opt, *_: record["lr"].append(opt.param_groups[0]["lr"]))

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def keep(engine):
        record["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        record["chunks"].append(engine.state.chunk)
        assert optimizer.param_groups[0]["lr"] == LR  # handlers see the rate as set

    return trainer, optimizer, record


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("bptt,k2", [(4, 4), (4, 7), (3, 9)])
@pytest.mark.parametrize("kind", ["GRU", "cell"])
def test_updates_match_the_reference_replaying_the_same_chunks(kind, bptt, k2, overlap):
    x, y = make_data(31)
    trainer, optimizer, record = trainer_for(make_model(kind), bptt, k2, overlap)
    trainer.run([(x, y)])
    bounds = bounds_of(record["chunks"])
    assert bounds[0][0] == 0 and bounds[-1][1] == 31 and len(set(t - s for s, t in bounds)) > 1
    assert all(c.window_start == max(0, c.start - (k2 - bptt)) for c in record["chunks"])
    expected = reference_trajectory(make_model(kind), x, y, bptt, k2, overlap, LR, nn.MSELoss(), bounds=bounds)
    assert_same_trajectory(record["params"], expected)
    assert record["lr"] == pytest.approx([LR * (t - s) / bptt for s, t in bounds])
    assert optimizer.param_groups[0]["lr"] == LR


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("bptt,k2", [(4, 4), (3, 8)])
def test_carried_state_cuts_a_chunk_at_every_batch_end(bptt, k2, overlap):
    x, y = make_data(30)
    pieces = [(x[:11], y[:11]), (x[11:19], y[11:19]), (x[19:], y[19:])]
    trainer, _, record = trainer_for(make_model("LSTM"), bptt, k2, overlap, carry_state=True)
    trainer.run(pieces)
    bounds = bounds_of(record["chunks"])
    assert {11, 19} <= {t for _, t in bounds}  # batch ends cut chunks; the next batch starts a new one
    expected = reference_trajectory(make_model("LSTM"), x, y, bptt, k2, overlap, LR, nn.MSELoss(), bounds=bounds)
    assert_same_trajectory(record["params"], expected)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 25), bptt=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 50),
       overlap=st.sampled_from(MODES))
def test_property_random_chunks_match_the_reference(T, bptt, extra, seed, overlap):
    x, y = make_data(T, batch=2)
    trainer, _, record = trainer_for(make_model("GRU"), bptt, bptt + extra, overlap, seed=seed)
    trainer.run([(x, y)])
    bounds = bounds_of(record["chunks"])
    expected = reference_trajectory(make_model("GRU"), x, y, bptt, bptt + extra, overlap, LR, nn.MSELoss(),
                                    bounds=bounds)
    assert_same_trajectory(record["params"], expected)


def test_the_plan_draws_ahead_for_windows_that_reach_into_the_next_batch():
    lengths = RandomLength(4, p_full=1.0, std=0.0, min_length=1)  # always 4
    chunks, later_of, _ = batch_plan(6, 0, lengths, k2=9, stream=True)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 6)]
    assert later_of(chunks[1]) == [1, 5]  # the next batch's chunks start at 6 and 10: windows from 1 and 5


def test_a_resumed_run_draws_the_lengths_of_the_uninterrupted_run(tmp_path):
    x, y = make_data(40, seed=2)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def run(resume_from=None):
        model = make_model("LSTM")
        trainer, optimizer, record = trainer_for(model, 4, 6, "retain", carry_state=True, deterministic=True)
        to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
        if resume_from is None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False), n_saved=None))
        else:
            checkpoint = torch.load(resume_from, weights_only=False)  # the deterministic engine's numpy RNG state
            draws = checkpoint["trainer"]["tbptt_chunk_lengths"]
            torch.save(draws, tmp_path / "draws.pt")
            assert set(torch.load(tmp_path / "draws.pt", weights_only=True)) == {"rng", "ahead"}  # plain ints
            Checkpoint.load_objects(to_save, checkpoint)
        trainer.run(batches, max_epochs=2)
        return record

    whole = run()
    resumed = run(tmp_path / "checkpoint_6.pt")  # mid-way through epoch 2
    assert bounds_of(resumed["chunks"]) == bounds_of(whole["chunks"])[-len(resumed["chunks"]):]
    assert_same_trajectory(resumed["params"][-1:], whole["params"][-1:])


def test_the_evaluator_keeps_its_fixed_chunks():
    model = make_model("GRU")
    x, y = make_data(20)
    trainer, _, _ = trainer_for(model, 4, 4, "recompute")
    evaluator = create_supervised_tbptt_evaluator(model, tbtt_step=5)
    seen = []
    evaluator.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: seen.append(e.state.chunk.length))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([(x, y)]))
    trainer.run([(x, y)])
    assert seen == [5, 5, 5, 5]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(bptt=0), ValueError, "bptt must be >= 1"),
        (dict(bptt=3.5), TypeError, "bptt must be an int"),
        (dict(bptt=10, p_full=1.5), ValueError, "p_full must be a probability"),
        (dict(bptt=10, std=-1), ValueError, "std must be a finite number"),
        (dict(bptt=10, min_length=0), ValueError, "min_length must be >= 1"),
        (dict(bptt=10, max_length=3), ValueError, "max_length must be an int >= min_length"),
    ],
)
def test_bad_random_lengths_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        RandomLength(**kwargs)


def test_k2_below_bptt_is_refused():
    model = make_model("GRU")
    with pytest.raises(ValueError, match=r"k2 \(5\) must be >= tbtt_step \(8\)"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                        tbtt_step=RandomLength(8), k2=5)
