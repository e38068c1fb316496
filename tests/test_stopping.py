"""Stopping at the chunk (docs/contract.md, "Stopping and running again"): no chunk starts after engine.terminate() or terminate_epoch().

With carried state, a batch stopped inside leaves no state from the wrong step: the next run starts the stream
afresh, and a run stopped at a batch's end continues it exactly.
"""

import pytest
import torch
from ignite.handlers import TerminateOnNan
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.test_k1k2 import LR, assert_same_trajectory, batches_trajectory

K1 = 3


def counting_trainer(model, k2=K1, overlap="recompute", **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(len(args) == 1))  # True: a fresh state
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=K1, k2=k2, overlap=overlap,
                                              **kwargs)
    return trainer, steps, calls


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("event", ["started", "completed"])
@pytest.mark.parametrize("stop", ["terminate", "terminate_epoch"])
def test_no_chunk_runs_after_a_stop_request(overlap, event, stop):
    x, y = make_data(30)  # 10 chunks in one batch
    model = make_model("GRU")
    trainer, steps, calls = counting_trainer(model, k2=5, overlap=overlap)
    fired = Tbptt_Events.TIME_ITERATION_STARTED if event == "started" else Tbptt_Events.TIME_ITERATION_COMPLETED
    trainer.add_event_handler(fired(once=4), lambda engine: getattr(engine, stop)())
    trainer.run([(x, y)], max_epochs=1)
    ran = 3 if event == "started" else 4
    assert len(steps) == ran
    assert trainer.state.time_iteration == 4
    # The parameters are those of training on the chunks that ran, alone.
    expected = batches_trajectory(make_model("GRU"), [(x[: ran * K1], y[: ran * K1])], K1, 5, overlap)[-1]
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-12)


def test_terminate_on_nan_stops_the_batch():
    x, y = make_data(30)
    x[10] = float("nan")  # chunk 4 (steps 9..11)
    model = make_model("LSTM")
    trainer, steps, _ = counting_trainer(model)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, TerminateOnNan())
    trainer.run([(x, y)] * 3, max_epochs=2)
    assert len(steps) == 4 and trainer.state.iteration == 1  # not 9 more steps on NaN parameters


def test_terminate_epoch_moves_on_to_the_next_epoch():
    x, y = make_data(12)
    model = make_model("GRU")
    trainer, steps, _ = counting_trainer(model)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=2), lambda engine: engine.terminate_epoch())
    trainer.run([(x, y)] * 2, max_epochs=2)
    assert len(steps) == 2 + 8  # epoch 1: 2 chunks; epoch 2: 2 batches of 4 chunks
    assert trainer.state.epoch == 2


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_a_stop_inside_a_batch_starts_the_carried_stream_afresh(overlap, deterministic):
    x, y = make_data(24)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    model = make_model("LSTM")
    trainer, steps, calls = counting_trainer(model, k2=5, overlap=overlap, carry_state=True,
                                             deterministic=deterministic)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=2), lambda engine: engine.terminate())
    trainer.run(batches, max_epochs=2)
    assert calls.count(True) == 1 and trainer.state.iteration == 1
    first_run = len(calls)
    # Ignite goes on: the deterministic engine with batch 2, the plain one with the data from its start. Either
    # way the next batch starts from a fresh state, not from the state at step 6 of batch 1. The deterministic
    # engine re-enters epoch 1 (Ignite would count it as epoch 2 and end the run an epoch short), so epoch 2
    # starts a fresh stream too.
    trainer.run(batches, max_epochs=2)
    assert calls[first_run] is True and calls.count(True) == (3 if deterministic else 2)
    assert (trainer.state.iteration, trainer.carried_state.position) == ((4, 24) if deterministic else (3, 24))


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_a_stop_at_the_end_of_a_batch_continues_the_stream_exactly_with_a_deterministic_engine(overlap):
    x, y = make_data(24)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    model = make_model("LSTM")
    trainer, steps, calls = counting_trainer(model, k2=5, overlap=overlap, carry_state=True, deterministic=True)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=4), lambda engine: engine.terminate())
    trainer.run(batches, max_epochs=2)
    trainer.run(batches, max_epochs=2)  # replays the data from batch 2, which continues the carried stream
    assert trainer.state.iteration == 4 and trainer.state.epoch == 2 and calls.count(True) == 2
    expected = make_model("LSTM")
    counting_trainer(expected, k2=5, overlap=overlap, carry_state=True, deterministic=True)[0].run(batches, max_epochs=2)
    assert_same_trajectory([params_of(model)], [params_of(expected)])


def test_a_plain_engine_restarting_its_data_mid_epoch_starts_the_stream_afresh():
    # Ignite's plain Engine, run again after terminate(), iterates the data from the first batch: the carried
    # stream (standing at the end of batch 1) must not flow into batch 1 again.
    x, y = make_data(24)
    model = make_model("LSTM")
    trainer, steps, calls = counting_trainer(model, k2=5, carry_state=True)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=4), lambda engine: engine.terminate())
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    trainer.run(batches, max_epochs=2)
    first_run = len(calls)
    trainer.run(batches, max_epochs=2)
    assert calls[first_run] is True


def test_the_evaluator_stops_at_the_chunk_too():
    x, y = make_data(30)
    model = make_model("GRU")
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    evaluator = create_supervised_tbptt_evaluator(model, tbtt_step=K1, carry_state=True)
    evaluator.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=3), lambda engine: engine.terminate())
    evaluator.run([(x, y)] * 2)
    assert len(calls) == 3 and evaluator.carried_state.position == 0


def test_a_stop_discards_a_half_accumulated_gradient():
    x, y = make_data(30)
    model = make_model("GRU")
    trainer, steps, _ = counting_trainer(model, gradient_accumulation_steps=4)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=6), lambda engine: engine.terminate())
    trainer.run([(x, y)], max_epochs=1)
    assert len(steps) == 1  # chunks 5 and 6 never step
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
