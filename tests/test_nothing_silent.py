"""Nothing silent: resuming with the default arguments, running again after an exception, Ignite's own trainer left
alone, and misuse refused before the first update."""

import warnings

import pytest
import torch
from ignite.contrib.engines import Tbptt_Events as IgniteTbpttEvents
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from ignite.engine import Events, State
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer
from ignite_tbptt.data import StreamBatches
from ignite_tbptt.schedule import RandomLength
from tests.models import make_data, make_model

LR = 0.1


def _documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (30, 45, 17, 52, 38, 26)]


def _trainer(model, overlap="recompute", **kwargs):
    kwargs = {"tbtt_step": 3, "k2": 6, "carry_state": True, **kwargs}
    return create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                           overlap=overlap, **kwargs)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(before, model):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _shuffled_stream(trainer):
    batches = StreamBatches(_documents(), 3, 6, shuffle=True, seed=5)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: batches.set_epoch(e.state.epoch - 1))
    return batches


# --------------------------------------------------------------------------------------------------------
# Resuming from a checkpoint mid-epoch with the default arguments (deterministic=False)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_a_checkpoint_resumed_mid_epoch_continues_exactly_without_deterministic(overlap, tmp_path):
    whole = make_model("GRU")
    trainer = _trainer(whole, overlap)
    trainer.run(_shuffled_stream(trainer), max_epochs=2)

    model = make_model("GRU")
    trainer = _trainer(model, overlap)
    to_save = {"trainer": trainer, "model": model}
    checkpoint = Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), checkpoint)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda e: e.terminate())
    trainer.run(_shuffled_stream(trainer), max_epochs=2)
    assert trainer.state.iteration == 5

    resumed = make_model("GRU", seed=7)  # other weights: all of it must come from the checkpoint
    fresh = _trainer(resumed, overlap)
    saved = torch.load(tmp_path / checkpoint.last_checkpoint, weights_only=True)
    Checkpoint.load_objects({"trainer": fresh, "model": resumed}, saved)
    fresh.run(_shuffled_stream(fresh), max_epochs=2)
    assert fresh.state.iteration == 2 * len(StreamBatches(_documents(), 3, 6))
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_a_fresh_epoch_refuses_a_stream_that_does_not_start_at_its_beginning():
    model = make_model("GRU")
    before = _params(model)
    batches = list(StreamBatches(_documents(), 3, 6))
    with pytest.raises(ValueError, match=r"the epoch's first batch starts at step 18 of its stream, not at its "
                                         r"beginning.*epoch_length"):
        _trainer(model).run(batches[3:])
    assert _unchanged(before, model)
    evaluator = create_supervised_tbptt_evaluator(model, tbtt_step=3, carry_state=True)
    with pytest.raises(ValueError, match="the epoch's first batch starts at step 18"):
        evaluator.run(batches[3:])


def test_an_epoch_length_shorter_than_the_stream_is_refused_at_the_second_epoch():
    model = make_model("GRU")
    batches = StreamBatches(_documents(), 3, 6)
    trainer = _trainer(model)
    with pytest.raises(ValueError, match=r"the epoch's first batch starts at step 24 .*epoch_length"):
        trainer.run(batches, max_epochs=2, epoch_length=4)
    assert trainer.state.iteration == 4  # the second epoch's first batch, refused before any update, is not counted


# --------------------------------------------------------------------------------------------------------
# run() again after an exception


class Boom(Exception):
    pass


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, Boom])
def test_run_again_after_an_exception_continues_with_a_fresh_stream(error, overlap):
    x, y = make_data(60)
    batches = [(x[i:i + 12], y[i:i + 12]) for i in range(0, 60, 12)]

    def raise_once(engine):
        if engine.state.time_iteration == 10 and not raised:  # batch 3, its second chunk
            raised.append(True)
            raise error()

    model, raised = make_model("GRU"), []
    trainer = _trainer(model, overlap)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, raise_once)
    with pytest.raises(error):
        trainer.run(batches)
    state = trainer.run(batches)
    assert state is not None and state.iteration == 5 and state.time_iteration == 10 + 2 * 4  # on from batch 4

    # As after terminate() at the same chunk: the stream starts afresh with the next batch.
    expected = make_model("GRU")
    stopper = _trainer(expected, overlap)
    stopper.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=10), lambda e: e.terminate())
    stopper.run(batches)
    _trainer(expected, overlap).run(batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(expected.parameters(), model.parameters()))


def test_run_again_after_an_exception_between_batches_continues_the_stream():
    x, y = make_data(60)
    batches = [(x[i:i + 12], y[i:i + 12]) for i in range(0, 60, 12)]
    whole = make_model("GRU")
    _trainer(whole, "retain").run(batches)
    model, raised = make_model("GRU"), []
    trainer = _trainer(model, "retain")

    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def fail(_):
        if not raised:
            raised.append(True)
            raise Boom()

    with pytest.raises(Boom):
        trainer.run(batches)
    trainer.run(batches)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), model.parameters()))


# --------------------------------------------------------------------------------------------------------
# Ignite's own trainer is left alone


def _chunks_seen(factory):
    model = nn.RNN(1, 1)
    trainer = factory(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), tbtt_step=2)
    seen = []
    trainer.add_event_handler(IgniteTbpttEvents.TIME_ITERATION_COMPLETED(every=3), lambda e: seen.append(1))
    try:
        trainer.run([(torch.zeros(12, 1, 1), torch.zeros(12, 1, 1))])
    except RuntimeError as error:
        return str(error)[:18]
    return len(seen)


def test_ignite_s_own_trainer_behaves_the_same_before_and_after_ours():
    before = _chunks_seen(ignite_trainer)
    assert _chunks_seen(create_supervised_tbptt_trainer) == 2  # ours takes Ignite's events: 2 of 6 chunks
    assert _chunks_seen(ignite_trainer) == before == "Unknown event name"
    assert all(event not in State.event_to_attr for event in IgniteTbpttEvents)  # Ignite's shared table
    assert Tbptt_Events.TIME_ITERATION_COMPLETED in State.event_to_attr  # ours, under names of their own


# --------------------------------------------------------------------------------------------------------
# Misuse caught before the first update


@pytest.mark.parametrize("carry", [False, True])
def test_batch_first_stream_batches_are_refused_by_a_time_first_trainer(carry):
    model = make_model("GRU")
    before = _params(model)
    batches = StreamBatches(_documents(), 3, 6, batch_first=True)
    with pytest.raises(ValueError, match=r"time axis at dim=1, but the trainer or evaluator reads time along dim=0.*"
                                         r"Pass dim=1"):
        _trainer(model, carry_state=carry).run(batches)
    assert _unchanged(before, model)
    with pytest.raises(ValueError, match="Pass dim=1"):
        create_supervised_tbptt_evaluator(model, tbtt_step=3, carry_state=carry).run(batches)
    batch_first = make_model("GRU", batch_first=True)
    _trainer(batch_first, carry_state=carry, dim=1).run(batches)  # the fix works


def test_a_y_whose_batch_differs_from_x_is_refused():
    model = make_model("GRU")
    before = _params(model)
    x, y = make_data(12)
    with pytest.raises(ValueError, match=r"x and y must have the same batch size, got 3 and 1 .*broadcast"):
        _trainer(model, carry_state=False).run([(x, y[:, :1])])
    assert _unchanged(before, model)


def test_random_length_below_its_minimum_is_refused():
    with pytest.raises(ValueError, match=r"bptt=1 is below min_length=5.*scaled by length / bptt >= 5.*bptt >= 5"):
        RandomLength(1)
    RandomLength(2, min_length=2)


@pytest.mark.parametrize("carry", [False, True])
def test_a_burn_in_longer_than_every_sequence_warns_once_with_the_numbers(carry):
    model = make_model("GRU")
    x, y = make_data(12)
    batches = [(x, y)] if not carry else [(x[:6], y[:6]), (x[6:], y[6:])]
    trainer = _trainer(model, carry_state=carry, k2=3, burn_in=12)
    with pytest.warns(UserWarning, match=r"burn_in=12 is at least as long as every sequence of epoch 1, whose longest "
                                         r"ran 12 steps: .*no update was made") as caught:
        trainer.run(batches, max_epochs=2)
    assert len([w for w in caught if "burn_in=12" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(make_model("GRU"), carry_state=carry, k2=3, burn_in=11).run(batches, max_epochs=2)
