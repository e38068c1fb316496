"""The trainer as an Ignite engine: drop-in behaviour, events and counters, outputs, hooks, bad input."""

import weakref
from collections import namedtuple
from unittest import mock

import pytest
import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from torch import nn

import ignite_tbptt.trainer
from ignite_tbptt import Chunk, Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import make_data, make_model


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- drop-in for Ignite's trainer


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("T,k1,dim", [(12, 4, 0), (13, 5, 0), (9, 2, 1)])
def test_same_parameters_as_ignite(T, k1, dim, overlap):
    x, y = make_data(T, batch_first=dim == 1)
    data = [(x, y), (x.flip(dim), y)]
    models = [make_model("LSTM", batch_first=dim == 1) for _ in range(2)]
    for factory, model, kwargs in ((ignite_trainer, models[0], {}), (create_supervised_tbptt_trainer, models[1], {"overlap": overlap})):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        factory(model, optimizer, nn.MSELoss(), tbtt_step=k1, dim=dim, **kwargs).run(data, max_epochs=2)
    theirs, ours = (params_of(m) for m in models)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-12)


def test_call_protocol_with_mocks():
    # No parameters anywhere: the trainer must only call, never inspect, the model and optimizer.
    model, optimizer, loss = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    model.return_value = ("y_pred", "hidden")
    loss.return_value = torch.zeros((), requires_grad=True)  # a real loss: the trainer backpropagates it
    with mock.patch.object(ignite_tbptt.trainer, "_detach_hidden", side_effect=lambda h: ("cut", h)) as detach:
        trainer = create_supervised_tbptt_trainer(model, optimizer, loss, tbtt_step=3)
        trainer.run([(torch.zeros(8, 2, 1), torch.zeros(8, 2, 1))])
    assert detach.call_count == 2  # before chunks 2 and 3, never after the last
    assert [c.args[1:] for c in model.call_args_list] == [(), (("cut", "hidden"),), (("cut", "hidden"),)]
    assert [c.args[0].shape[0] for c in model.call_args_list] == [3, 3, 2]
    assert (loss.call_count, optimizer.zero_grad.call_count, optimizer.step.call_count) == (3, 3, 3)


def test_hidden_passed_on_is_a_leaf_and_state_resets_every_batch():
    model = make_model("GRU")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1] if len(args) > 1 else None))
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 2)
    trainer.run([make_data(6)] * 2)
    assert [h is None for h in seen] == [True, False, False] * 2
    assert all(h.is_leaf and not h.requires_grad for h in seen if h is not None)


# ---------------------------------------------------------------- events, counters and state


def test_chunk_counter_filters_and_state_dict():
    model = make_model("RNN")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 3)
    every_two, spans = [], []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(every=2), lambda e: every_two.append(e.state.time_iteration))
    trainer.add_event_handler(
        Tbptt_Events.TIME_ITERATION_STARTED, lambda e: spans.append((e.state.chunk, e.state.num_chunks))
    )
    trainer.run([make_data(7)] * 2, max_epochs=2)  # 3 chunks a batch, 4 batches
    assert every_two == [2, 4, 6, 8, 10, 12]
    assert spans[:3] == [(Chunk(0, 0, 3, 0), 3), (Chunk(1, 3, 6, 3), 3), (Chunk(2, 6, 7, 6), 3)]
    state = trainer.state_dict()
    assert state["time_iteration"] == 12
    trainer.state.max_epochs = None  # Ignite's way to start a fresh run: it counts chunks from 0 again
    trainer.run([make_data(7)], max_epochs=1)
    assert trainer.state.time_iteration == 3

    resumed = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 3)
    resumed.load_state_dict({**state, "max_epochs": 3})
    resumed.run([make_data(7)] * 2)
    assert resumed.state.time_iteration == 18


def test_chunk_output_is_the_chunk_loss_and_batch_output_is_length_weighted():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 3)
    chunk_losses = []

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def record(engine):
        assert isinstance(engine.state.output, torch.Tensor) and not engine.state.output.requires_grad
        chunk_losses.append((engine.state.output.item(), engine.state.chunk.length))

    trainer.run([make_data(7)])
    assert [n for _, n in chunk_losses] == [3, 3, 1]
    weighted = sum(loss * n for loss, n in chunk_losses) / 7
    assert isinstance(trainer.state.output, float)
    assert trainer.state.output == pytest.approx(weighted, rel=1e-12)
    assert trainer.state.output != pytest.approx(sum(loss for loss, _ in chunk_losses) / 3, rel=1e-6)


def test_output_transform_gets_the_whole_batch():
    model = make_model("GRU")
    x, y = make_data(8)
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 3,
        output_transform=lambda x, y, y_pred, loss: (x, y, y_pred, loss),
    )
    trainer.run([(x, y)])
    x_out, y_out, y_pred, loss = trainer.state.output
    assert x_out is x and y_out is y
    assert y_pred.shape == y.shape and not y_pred.requires_grad
    assert loss.dim() == 0 and not loss.requires_grad


def test_one_host_sync_per_batch():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 2, k2=4)
    calls = []
    real_item = torch.Tensor.item
    with mock.patch.object(torch.Tensor, "item", lambda t: calls.append(1) or real_item(t)):
        trainer.run([make_data(10)] * 3)  # 5 chunks a batch
    assert len(calls) == 3


# ---------------------------------------------------------------- hooks: model_fn, hidden nestings, prepare_batch


State = namedtuple("State", "h c")


class HiddenFirst(nn.Module):
    """A model with another signature, (hidden, x), and a dict state: a namedtuple and an integer tensor."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 3)

    def forward(self, hidden, x):
        out, (h, c) = self.lstm(x, None if hidden is None else (hidden["s"].h, hidden["s"].c))
        steps = x.shape[0] + (0 if hidden is None else hidden["steps"][0])
        return out[..., :2], {"s": State(h, c), "steps": [torch.as_tensor(steps)]}


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_model_fn_and_nested_hidden(overlap):
    model = HiddenFirst().double()
    seen = []

    def model_fn(model, x, hidden):
        seen.append(hidden)
        return model(hidden, x)

    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 2, k2=3, overlap=overlap, model_fn=model_fn
    )
    trainer.run([make_data(6)])
    assert seen[0] is None
    later = [h for h in seen if h is not None]
    assert later and all(isinstance(h["s"], State) for h in later)
    assert any(h["s"].h.is_leaf for h in later)  # window starts; inside a recomputed window the state flows on
    assert int(later[-1]["steps"][0]) in (4, 5)  # the state before the last chunk: after steps 4 (or 3 + 2)


def test_prepare_batch_is_called_per_chunk():
    model = make_model("RNN")
    shapes = []

    def prepare_batch(batch, device, non_blocking):
        x, y = batch
        shapes.append((tuple(x.shape), device, non_blocking))
        return x, y

    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 4, device="cpu", non_blocking=True,
        prepare_batch=prepare_batch,
    )
    trainer.run([make_data(10)])
    assert shapes == [((4, 3, 2), "cpu", True), ((4, 3, 2), "cpu", True), ((2, 3, 2), "cpu", True)]


# ---------------------------------------------------------------- bad input


def make_trainer(model, **kwargs):
    return create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tbtt_step": 0}, ValueError, "tbtt_step must be >= 1"),
        ({"tbtt_step": 2.0}, TypeError, "tbtt_step must be an int"),
        ({"tbtt_step": 3, "k2": 2}, ValueError, r"k2 \(2\) must be >= tbtt_step \(3\)"),
        ({"tbtt_step": 3, "overlap": "keep"}, ValueError, "overlap must be one of"),
        ({"tbtt_step": 3, "dim": "time"}, TypeError, "dim must be an int"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_trainer(make_model("RNN"), **kwargs)


class NoHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(2, 2)

    def forward(self, x, hidden=None):
        return self.rnn(x, hidden)[0]


x, y = make_data(6)


@pytest.mark.parametrize(
    "model,batch,dim,error,match",
    [
        (make_model("RNN"), (x, y[:5]), 0, ValueError, "same length along the time axis dim=0, got 6 and 5"),
        (make_model("RNN"), (x, y), 3, ValueError, "dim=3 is out of range"),
        (make_model("RNN"), x, 0, TypeError, r"must be an \(x, y\) pair or an \(x, y, sequence_info\) triple, got Tensor"),
        (make_model("RNN"), (x, y, y, y), 0, TypeError, r"triple, got a sequence of length 4"),
        (make_model("RNN"), (x, y, y), 0, TypeError, "third element of a batch must be a dict of sequence info"),
        (make_model("RNN"), (x, y, {"lengths": torch.tensor([6, 7, 1])}), 0, ValueError, r"'lengths' must lie in \[0, 6\]"),
        (make_model("RNN"), (x, y, {"mask": torch.ones(6, 2).bool()}), 0, ValueError, r"'mask' must have the shape \(6, 3\)"),
        (make_model("RNN"), (x, y, {"resets": torch.ones(3)}), 0, TypeError, "'resets' must be a bool tensor"),
        (make_model("RNN"), (x, y, {"reset": torch.ones(3)}), 0, ValueError, r"unknown sequence info keys \['reset'\]"),
        (make_model("RNN"), (x, [1, 2]), 0, TypeError, "y must be a tensor"),
        (make_model("RNN"), (x[:0], y[:0]), 0, ValueError, "no time steps"),
        (NoHidden().double(), (x, y), 0, TypeError, r"must return a pair \(y_pred, hidden\)"),
    ],
)
def test_bad_batches_fail_before_any_parameter_changes(model, batch, dim, error, match):
    before = params_of(model)
    with pytest.raises(error, match=match):
        make_trainer(model, tbtt_step=2, dim=dim).run([batch])
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_every_chunk_trains_in_train_mode_after_an_evaluation_in_a_chunk_handler(overlap):
    model = make_model("LSTM")
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append((m.training, m.rnn.training)))
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 2, k2=3, overlap=overlap
    )
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(every=2), lambda _: model.eval())
    model.eval()  # left in evaluation mode before the run: the batch starts in train mode anyway
    trainer.run([make_data(8)] * 2)
    assert modes and all(m == (True, True) for m in modes), modes


@pytest.mark.parametrize("overlap,k2", [("recompute", 2), ("recompute", 4), ("retain", 4)])
def test_a_chunks_graph_is_freed_before_the_next_chunk_runs(overlap, k2):
    # A chunk's predictions hold its autograd graph; kept alive through the next forward pass, they make that
    # graph fill fresh memory instead of the memory this one frees (measurably slower on CPU).
    model, outputs = make_model("GRU"), []

    def model_fn(model, x, hidden):
        y_pred, hidden = model(x) if hidden is None else model(x, hidden)
        outputs.append(weakref.ref(y_pred))
        return y_pred, hidden

    def no_earlier_output_alive(_):
        alive = [i for i, ref in enumerate(outputs) if ref() is not None]
        assert not alive, f"model outputs {alive} of earlier chunks are still alive"

    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), 2, k2=k2, overlap=overlap, model_fn=model_fn
    )
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED, no_earlier_output_alive)
    trainer.run([make_data(8)])
    assert len(outputs) >= 4  # the check ran against real outputs
