"""The state the trainer keeps is the trainer's, whatever the model does: containers written into, ``None`` and
integer leaves, outputs of the wrong length, states returned detached, ambiguous batch axes."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, check_state_passing, create_supervised_tbptt_trainer
from tests.reference import reference_chunked_trajectory
from tests.state_models import make_state_model

T, B = 12, 3


def _data(seed=1, batch=B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, batch, 2, generator=g, dtype=torch.float64),
            torch.randn(T, batch, 2, generator=g, dtype=torch.float64))


def _trainer(model, k1, k2, overlap, lr=0.1, **kwargs):
    return create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=lr), nn.MSELoss(),
                                           tbtt_step=k1, k2=k2, overlap=overlap, **kwargs)


def _assert_matches(model, reference):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("counter", [False, True], ids=["list", "list, int and None leaves"])
def test_a_model_that_writes_into_its_state_list_trains_as_the_reference(overlap, carried, counter):
    """mambapy's Mamba.step assigns caches[i] = ... into the list it is given: the list the trainer keeps at the
    next window start must not change with it (it did: k2 > k1 gradients off by 2.9e-4 in recompute)."""
    model = make_state_model("caches", counter=counter)
    x, y = _data()
    twin = make_state_model("caches", counter=counter, writes=False)  # the same function, writing into no list
    expected = reference_chunked_trajectory(twin, x, y, 3, 9, overlap, 0.1, F.mse_loss)[-1]
    batches = [(x[:6], y[:6]), (x[6:], y[6:])] if carried else [(x, y)]
    _trainer(model, 3, 9, overlap, carry_state=carried).run(batches)
    _assert_matches(model, expected)


def _alone(model, x, start, sample):
    """The state of ``sample`` after running its document ``x[start:]`` alone, from a fresh state."""
    return model(x[start:, sample:sample + 1])[1]


def test_the_default_reset_covers_integer_leaves_and_carries_none():
    """A per-sample step counter (an integer leaf) starts at 0 again at a reset, as a document run alone does;
    the optional memory left None stays None."""
    model = make_state_model("caches", counter=True)
    x, y = _data()
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[5, 1] = True  # sample 1 starts its second document at step 5
    trainer = _trainer(model, 3, 3, "recompute", lr=0.0, carry_state=True, hidden_batch_dim=0)
    trainer.run([(x, y, {"resets": resets})])
    kept = trainer.carried_state.window.state_at_stop()
    alone = _alone(model, x, 5, 1)
    assert kept["memory"] is None
    assert kept["step"].tolist() == [T, T - 5, T]
    for (h, conv), (h_alone, conv_alone) in zip(kept["caches"], alone["caches"]):
        torch.testing.assert_close(h[1:2], h_alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(conv[1:2], conv_alone, rtol=0, atol=1e-12)


class LastStepOnce(nn.Module):
    """minGRU-pytorch's minLM pattern: given a state, it returns the output of the last step only."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, 3), nn.Linear(3, 2)

    def forward(self, x, hidden=None):
        out, new = self.rnn(x, hidden)
        return self.head(out if hidden is None else out[-1:]), new


def test_an_output_shorter_than_its_chunk_is_refused_naming_both_lengths():
    model = LastStepOnce().double()
    x, y = _data()
    trainer = _trainer(model, 3, 3, "recompute")
    losses = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    with pytest.raises(ValueError, match=r"returned an output of 1 time steps \(shape \(1, 3, 2\)\) for an input chunk "
                                         r"of 3 steps \(shape \(3, 3, 2\)\)"):
        trainer.run([(x, y)])
    assert len(losses) == 1  # the second chunk, the first given a state, never reached its loss or its update


def test_check_state_passing_names_an_output_shorter_than_its_chunk():
    """Not a memory effect: it said the model's output depends on where the sequence is cut."""
    with pytest.raises(AssertionError, match="returned an output of 1 time steps"):
        check_state_passing(LastStepOnce().double(), _data()[0], 3)


class Detaching(nn.Module):
    """Returns its state detached, as x-transformers does with detach_mems=True."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, 3), nn.Linear(3, 2)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden.detach()


def _detaching():
    torch.manual_seed(0)
    return Detaching().double()


def _grads(model, k1, k2, overlap):
    trainer = _trainer(model, k1, k2, overlap, lr=0.0)
    grads = []
    trainer.add_event_handler(Tbptt_Events.GRADIENTS_COMPUTED, lambda e: grads.append(
        [p.grad.clone() for p in model.parameters()]))
    trainer.run([_data()])
    return grads


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_a_state_returned_detached_warns_that_k2_has_no_effect(overlap):
    with pytest.warns(UserWarning, match=r"k2 > tbtt_step has no effect on this model: the state it returns has no gradient path"):
        long = _grads(_detaching(), 3, 9, overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = _grads(_detaching(), 3, 3, overlap)  # k2 = k1: nothing to warn about
        _grads(make_state_model("caches"), 3, 9, overlap)  # a state with its graph: no warning
    for a, b in zip(long, short):  # what the warning says: k2 = 9 gives exactly the k2 = 3 gradients
        for g1, g2 in zip(a, b):
            torch.testing.assert_close(g1, g2, rtol=0, atol=0)
