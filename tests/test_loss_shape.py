"""loss_fn sees a chunk's rank and layout, masked or not: the losses users write for plain chunks train unchanged
on StreamBatches with document boundaries and on padded batches, in the trainer and the evaluator's metrics."""

import pytest
import torch
from ignite.metrics import Loss
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer
from ignite_tbptt.data import StreamBatches
from tests.models import make_data, make_model, token_loss
from tests.reference import reference_trajectory
from tests.test_data import whole_epoch
from tests.test_k1k2 import LR, assert_same_trajectory

CROSS_ENTROPIES = {
    "flattening": lambda yp, y: F.cross_entropy(yp.flatten(0, 1), y.flatten()),
    "time last": lambda yp, y: F.cross_entropy(yp.permute(1, 2, 0), y.t()),
}


def _trajectory(model, batches, loss_fn, k1, k2, overlap, **kwargs):
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), loss_fn, tbtt_step=k1,
                                              k2=k2, overlap=overlap, **kwargs)
    trajectory = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda _: trajectory.append(
        {n: p.detach().clone() for n, p in model.named_parameters()}))
    trainer.run(batches)
    return trajectory


def _token_documents():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 11, (n,), generator=g) for n in (9, 14, 5, 12)]


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("loss", CROSS_ENTROPIES)
def test_cross_entropies_train_unchanged_on_stream_batches_with_documents(loss, overlap):
    docs = _token_documents()
    x, y, valid, resets = whole_epoch(docs, 3)
    expected = reference_trajectory(make_model("tokens"), x, y, 3, 5, overlap, LR, token_loss, valid=valid, resets=resets)
    got = _trajectory(make_model("tokens"), StreamBatches(docs, 3, 6), CROSS_ENTROPIES[loss], 3, 5, overlap,
                      carry_state=True)
    assert_same_trajectory(got, expected)


@pytest.mark.parametrize("loss", ["mse", *CROSS_ENTROPIES])
def test_losses_train_unchanged_on_padded_batches(loss):
    lengths = torch.tensor([10, 6, 2])
    valid = torch.arange(10).unsqueeze(1) < lengths.unsqueeze(0)
    if loss == "mse":
        (x, y), kind, loss_fn, reference_loss = make_data(10), "GRU", nn.MSELoss(), nn.MSELoss()
    else:
        g = torch.Generator().manual_seed(4)
        tokens = torch.randint(0, 11, (11, 3), generator=g)
        (x, y), kind, loss_fn, reference_loss = (tokens[:-1], tokens[1:]), "tokens", CROSS_ENTROPIES[loss], token_loss
    expected = reference_trajectory(make_model(kind), x, y, 3, 5, "recompute", LR, reference_loss, valid=valid)
    got = _trajectory(make_model(kind), [(x, y, {"lengths": lengths})], loss_fn, 3, 5, "recompute")
    assert_same_trajectory(got, expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_masked_pairs_come_with_a_batch_of_one_along_the_layout(batch_first):
    shapes = []

    def loss_fn(y_pred, y):
        shapes.append((tuple(y_pred.shape), tuple(y.shape)))
        return F.mse_loss(y_pred, y)

    model = make_model("GRU", batch_first=batch_first)
    x, y = make_data(6, batch_first=batch_first)
    lengths = torch.tensor([6, 4, 6])
    create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), loss_fn, tbtt_step=3,
                                    dim=int(batch_first)).run([(x, y, {"lengths": lengths})])
    unmasked = (3, 3, 2)  # (time, batch) or (batch, time): 3 and 3 either way
    masked = (1, 7, 2) if batch_first else (7, 1, 2)  # 3 + 3 + 1 valid pairs in the second chunk
    assert shapes == [(unmasked, unmasked), (masked, masked)]


def test_the_evaluator_metric_takes_the_flattening_cross_entropy_on_documents():
    docs = _token_documents()
    model = make_model("tokens")
    flat = CROSS_ENTROPIES["flattening"]
    # Ignite's Loss weighs an update by len(y), the steps of a time-first chunk: the evaluator counts pairs
    evaluator = create_supervised_tbptt_evaluator(model, {"loss": Loss(flat)}, tbtt_step=3, carry_state=True)
    got = evaluator.run(StreamBatches(docs, 3, 4)).metrics["loss"]
    x, y, valid, resets = whole_epoch(docs, 3)
    reference = create_supervised_tbptt_evaluator(model, {"loss": Loss(token_loss)}, tbtt_step=100)
    expected = reference.run([(x, y, {"mask": valid, "resets": resets})]).metrics["loss"]
    assert got == pytest.approx(expected, rel=1e-6)  # Ignite's Loss sums in float32
