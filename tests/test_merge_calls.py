"""The automatic choice of recompute's calls: merged for a model that does not depend on where the stream is cut,
the forward pass's calls for one that does, and the gradient of the float64 reference either way."""

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from ignite_tbptt.window import merging_changes_nothing
from tests.models import make_data, make_model
from tests.reference import reference_chunked_trajectory, reference_trajectory
from tests.state_models import make_state_model
from tests.test_k1k2 import LR, assert_same_trajectory


class LSTMCellNet(nn.Module):
    """A step-wise LSTMCell loop with a linear head; the state is the cell's ``(h, c)`` pair."""

    def __init__(self, n_in=2, n_hidden=3, n_out=2):
        super().__init__()
        self.cell, self.head, self.n_hidden = nn.LSTMCell(n_in, n_hidden), nn.Linear(n_hidden, n_out), n_hidden

    def forward(self, x, hidden=None):
        outs = []
        for x_t in x.unbind(0):
            hidden = self.cell(x_t, hidden)
            outs.append(self.head(hidden[0]))
        return torch.stack(outs), hidden


class Counting(nn.Module):
    """A model that counts its calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args):
        self.calls += 1
        return self.model(*args)


def _model(kind):
    if kind == "LSTMCell":
        torch.manual_seed(0)
        return LSTMCellNet().double()
    return make_model(kind)


def _trainer(model, k1, k2, **kwargs):
    return create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                           tbtt_step=k1, k2=k2, **kwargs)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "cell"])  # "cell": a GRUCell loop
@pytest.mark.parametrize("T,k1,k2", [(12, 2, 7), (11, 3, 9)])
def test_the_default_merges_for_a_cut_independent_model_with_the_reference_gradient(kind, T, k1, k2):
    x, y = make_data(T)
    expected = reference_trajectory(_model(kind), x, y, k1, k2, "recompute", LR, nn.MSELoss())
    model = _model(kind)
    trainer = _trainer(model, k1, k2)
    assert trainer.state.merge_calls is None  # not known before the first window with several calls
    got, merged = [], []

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def record(engine):
        got.append({n: p.detach().clone() for n, p in model.named_parameters()})
        merged.append(engine.state.merge_calls)

    trainer.run([(x, y)])
    assert_same_trajectory(got, expected)
    # unknown until the first window that merging changes, merged from there on
    decided = merged.index(True)
    assert merged == [None] * decided + [True] * (len(got) - decided)


@pytest.mark.parametrize("k1,k2", [(3, 9), (2, 6)])
def test_the_default_keeps_the_calls_of_a_cut_dependent_model_with_the_reference_gradient(k1, k2):
    x, y = make_data(12)
    expected = reference_chunked_trajectory(make_state_model("memory"), x, y, k1, k2, "recompute", LR, F.mse_loss)
    model = make_state_model("memory")
    trainer = _trainer(model, k1, k2, hidden_batch_dim=0)
    trainer.run([(x, y)])
    assert trainer.state.merge_calls is False
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[-1][name], rtol=0, atol=1e-10, msg=name)


def test_merged_calls_are_fewer_and_forcing_either_way_is_obeyed():
    x, y = make_data(12)
    calls = {}
    for merge in (None, True, False):
        model = Counting(make_model("LSTM"))
        trainer = _trainer(model, 2, 7, merge_calls=merge)
        assert trainer.state.merge_calls is merge
        trainer.run([(x, y)])
        calls[merge] = model.calls
        assert trainer.state.merge_calls is (merge is not False)
    # the check runs once, at the first chunk (0, 2]: cut at 1, where the third window starts, and merged (3 calls),
    # at the current and at perturbed parameters
    assert calls[True] < calls[False] and calls[None] == calls[True] + 2 * 3
    memory = make_state_model("memory")
    trainer = _trainer(memory, 3, 9, hidden_batch_dim=0, merge_calls=True)
    trainer.run([(x, y)])
    assert trainer.state.merge_calls is True  # forced: even where it changes the forward pass


def test_the_choice_is_logged_once(caplog):
    x, y = make_data(12)
    trainer = _trainer(make_model("GRU"), 2, 6)
    with caplog.at_level(logging.INFO):
        trainer.run([(x, y)], max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if "merge_calls" in r.getMessage()]
    assert len(lines) == 1 and "engine.state.merge_calls=True" in lines[0]


def test_a_model_cut_dependent_only_once_trained_keeps_the_calls():
    """A memory whose attention branch starts at zero gives the same outputs merged or not at its initial
    parameters; the check at perturbed parameters still finds that it depends on the cuts."""
    model = make_state_model("memory")
    with torch.no_grad():
        model.v.weight.zero_()
        model.v.bias.zero_()
    before = [p.detach().clone() for p in model.parameters()]
    x = make_data(8)[0]

    def run(spans):
        hidden, outs = None, []
        for a, b in spans:
            out, hidden = model(x[a:b]) if hidden is None else model(x[a:b], hidden)
            outs.append(out)
        return torch.cat(outs), hidden

    with torch.no_grad():
        torch.testing.assert_close(run([(0, 2), (2, 4), (4, 8)]), run([(0, 8)]), rtol=0, atol=1e-12)
    assert not merging_changes_nothing(model, run, [(0, 2), (2, 4), (4, 8)], [(0, 8)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored bit for bit


def test_the_check_leaves_modes_parameters_and_random_state_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    model[1].eval()  # a mode of the user's own, below a module in training mode
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 2)
    run = lambda spans: (torch.cat([model(x[a:b]) for a, b in spans]), None)  # noqa: E731
    rng = torch.get_rng_state()
    assert merging_changes_nothing(model, run, [(0, 3), (3, 6)], [(0, 6)])  # dropout off: the same either way
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == [True, True, False]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batch_norm_in_training_keeps_the_calls():
    """In training, batch norm normalises over each call: merged calls would change the forward pass, although
    with dropout off (running statistics) both ways agree."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    x = torch.randn(6, 2)
    run = lambda spans: (torch.cat([model(x[a:b]) for a, b in spans]), None)  # noqa: E731
    assert not merging_changes_nothing(model, run, [(0, 3), (3, 6)], [(0, 6)])
    model.eval()
    assert merging_changes_nothing(model, run, [(0, 3), (3, 6)], [(0, 6)])


def test_merge_calls_must_be_a_bool_or_none():
    model = make_model("GRU")
    with pytest.raises(TypeError, match="merge_calls must be True, False or None"):
        _trainer(model, 2, 6, merge_calls="yes")
