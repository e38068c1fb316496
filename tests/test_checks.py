"""check_state_passing: passes for models that hand their state on, names the failure of those that do not."""

from unittest import mock

import pytest
import torch
from torch import nn

import ignite_tbptt.trainer
from ignite_tbptt import check_state_passing, create_supervised_tbptt_trainer
from tests.models import CellNet, SeqNet, make_data, make_model


class Forgetful(nn.Module):
    """Ignores the state it is given (what Ignite's trainer once did by not passing it, pytorch/ignite#255)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, 3), nn.Linear(3, 2)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x)
        return self.head(out), hidden


class ForgetsTheCell(nn.Module):
    """Uses the hidden state but starts its LSTM cell state afresh inside forward."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(2, 3), nn.Linear(3, 2)

    def forward(self, x, hidden=None):
        if hidden is not None:
            hidden = (hidden[0], torch.zeros_like(hidden[1]))
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


X = make_data(25, batch=3)[0].float()


@pytest.mark.parametrize("model", [SeqNet("RNN"), SeqNet("GRU"), SeqNet("LSTM"), SeqNet("LSTM", layers=2), CellNet()],
                         ids=["RNN", "GRU", "LSTM", "LSTM 2 layers", "GRUCell loop"])
@pytest.mark.parametrize("k1", [1, 4, 10])
def test_models_that_pass_their_state_pass(model, k1):
    model.train()
    check_state_passing(model, X, k1)
    assert model.training  # its mode is restored


def test_batch_first_and_model_fn():
    model = SeqNet("GRU", batch_first=True)
    check_state_passing(model, X.transpose(0, 1), 6, dim=1)
    check_state_passing(model.rnn, X.transpose(0, 1), 6, dim=1, model_fn=lambda m, x, h: m(x, h))


class Restarts(Forgetful):
    """Takes the state it is given, then starts afresh inside forward anyway."""

    def forward(self, x, hidden=None):
        hidden = torch.zeros(1, x.shape[1], 3)
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


@pytest.mark.parametrize("model", [Forgetful(), Restarts()], ids=["drops its state", "restarts its state"])
def test_a_model_that_ignores_its_state_fails(model):
    with pytest.raises(AssertionError, match="the state passed in is ignored"):
        check_state_passing(model, X, 5)


def test_a_model_that_restarts_part_of_its_state_fails_and_names_the_leaf():
    with pytest.raises(AssertionError, match=r"the state leaf hidden\[1\] passed in is ignored"):
        check_state_passing(ForgetsTheCell(), X, 5)


def test_a_bidirectional_layer_differs_in_the_first_chunk():
    model = nn.GRU(2, 3, bidirectional=True)
    with pytest.raises(AssertionError, match=r"chunk 0 \(steps 0..4\) differs .*depend on later steps"):
        check_state_passing(model, X, 5, model_fn=lambda m, x, h: m(x, h))


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.tensor(1.0), 2), {}, "no time axis"),
        ((X, 2), {"dim": 3}, "no time axis dim=3"),
        ((X, 25), {}, "needs more than one chunk"),
        ((X, 0), {}, "tbtt_step must be an int >= 1"),
        (([1, 2], 2), {}, "x must be a tensor"),
    ],
)
def test_bad_input(args, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_state_passing(SeqNet("GRU"), *args, **kwargs)


def test_the_trainer_checks_the_first_batch_before_any_update():
    model = Forgetful().double()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=3, check_state=True
    )
    with pytest.raises(AssertionError, match="ignored"):
        trainer.run([make_data(12)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    good = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(
        good, torch.optim.SGD(good.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=3, check_state=True
    )
    with mock.patch.object(ignite_tbptt.trainer, "check_state_passing", wraps=check_state_passing) as check:
        trainer.run([make_data(2), make_data(12), make_data(12)])  # a one-chunk batch first: checked on the second
    assert check.call_count == 1 and check.call_args.args[1].shape[0] == 12
