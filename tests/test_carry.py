"""carry_state=True: batches continue one stream, with the state and window carried across them."""

import warnings

import pytest
import torch
from ignite.engine import Events
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer, reset_state
from tests.models import make_data, make_model
from tests.test_k1k2 import assert_same_trajectory, batches_trajectory


def trajectory(batches, k1, k2, overlap, carry_state=True):
    return batches_trajectory(make_model("LSTM"), batches, k1, k2, overlap, carry_state=carry_state)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize(
    "k1,k2,lengths",
    [
        (3, 3, [6, 3, 9]),
        (3, 5, [6, 3, 9]),  # windows reach one chunk back into the previous batch
        (2, 9, [2, 4, 2, 6]),  # windows reach across several batches, some shorter than the overlap
        (1, 4, [3, 1, 5]),  # sliding window across batch boundaries
        (4, 6, [8, 8]),
    ],
)
def test_stream_in_batches_trains_like_one_batch(k1, k2, lengths, overlap):
    x, y = make_data(sum(lengths))
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    pieces = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    whole = trajectory([(x, y)], k1, k2, overlap)
    assert_same_trajectory(trajectory(pieces, k1, k2, overlap), whole)
    if k2 > k1 or len(pieces) > 1:  # without carrying, the batches train differently
        reset = trajectory(pieces, k1, k2, overlap, carry_state=False)
        assert any(not torch.allclose(reset[-1][n], whole[-1][n]) for n in whole[-1])


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_carried_state_starts_afresh_every_epoch_and_on_reset(overlap):
    model = make_model("GRU")
    first_calls = []
    model.register_forward_pre_hook(lambda m, args: first_calls.append(len(args) == 1))
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), tbtt_step=2, k2=3, overlap=overlap,
        carry_state=True,
    )
    trainer.run([make_data(4)] * 3, max_epochs=2)
    assert sum(first_calls) == 2  # one fresh start per epoch
    first_calls.clear()
    trainer.add_event_handler(Events.ITERATION_STARTED(every=2), reset_state)
    trainer.state.max_epochs = None
    trainer.run([make_data(4)] * 4)
    assert sum(first_calls) == 3  # the epoch start, then before batches 2 and 4


def test_changed_batch_size_resets_with_a_warning():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), tbtt_step=2, k2=4, carry_state=True
    )
    x, y = make_data(6, batch=5)
    with pytest.warns(UserWarning, match="batch size changed from 5 to 2"):
        trainer.run([(x, y), (x[:, :2], y[:, :2])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.state.max_epochs = None
        trainer.run([(x, y), (x, y)])
