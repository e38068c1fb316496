"""The state the trainer keeps is the trainer's, whatever the model does: containers written into, ``None`` and
integer leaves, outputs of the wrong length, states returned detached, ambiguous batch axes."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
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
