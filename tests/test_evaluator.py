"""The chunked evaluator gives the metrics of a whole-sequence pass, with memory bounded by the chunk."""

import pytest
import torch
from ignite.metrics import Loss, MeanAbsoluteError
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_evaluator
from tests.models import make_data, make_model


REL = 1e-6  # Ignite's metrics accumulate in float32


def flat(x, y, y_pred):
    return y_pred.flatten(0, 1), y.flatten(0, 1)


def metrics():
    return {"mse": Loss(nn.MSELoss()), "mae": MeanAbsoluteError()}


def whole_pass_metrics(model, pieces):
    """Metrics of one forward pass over the whole stream, per sample (pieces are consecutive)."""
    x, y = (torch.cat(parts) for parts in zip(*pieces))
    with torch.no_grad():
        y_pred, _ = model(x)
    return {"mse": float(nn.functional.mse_loss(y_pred, y)), "mae": float((y_pred - y).abs().sum(-1).mean())}


@pytest.mark.parametrize("kind", ["LSTM", "cell"])
@pytest.mark.parametrize("k1,lengths", [(4, [17]), (3, [6, 7, 4]), (1, [3, 2]), (50, [9, 9])])
def test_stream_metrics_equal_a_whole_pass(kind, k1, lengths):
    model = make_model(kind)
    x, y = make_data(sum(lengths))
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    pieces = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    evaluator = create_supervised_tbptt_evaluator(model, metrics(), tbtt_step=k1, carry_state=True, output_transform=flat)
    chunks = []
    evaluator.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: chunks.append(e.state.chunk.length))
    got = evaluator.run(pieces).metrics
    expected = whole_pass_metrics(model, pieces)
    assert got == pytest.approx(expected, rel=REL)
    assert sum(chunks) == sum(lengths) and max(chunks) <= k1
    # Running the same evaluator again starts a fresh stream and gives the same numbers.
    assert evaluator.run(pieces).metrics == pytest.approx(expected, rel=REL)


def test_without_carry_state_every_batch_starts_afresh():
    model = make_model("GRU")
    pieces = [make_data(6, seed=s) for s in (1, 2)]
    evaluator = create_supervised_tbptt_evaluator(model, metrics(), tbtt_step=4, output_transform=flat)
    got = evaluator.run(pieces).metrics
    with torch.no_grad():
        preds = [model(x)[0] for x, _ in pieces]
    mse = sum(float(((p - y) ** 2).sum()) for p, (_, y) in zip(preds, pieces)) / sum(y.numel() for _, y in pieces)
    assert got["mse"] == pytest.approx(mse, rel=REL)


def test_padded_batches_score_valid_steps_only():
    model = make_model("LSTM")
    T, lengths = 10, [10, 3, 7]
    x, y = make_data(T)
    evaluator = create_supervised_tbptt_evaluator(model, metrics(), tbtt_step=4)
    got = evaluator.run([(x, y, {"lengths": torch.tensor(lengths)})]).metrics
    with torch.no_grad():
        errors = [model(x[:n, b : b + 1])[0] - y[:n, b : b + 1] for b, n in enumerate(lengths)]
    squared = torch.cat([e.flatten() for e in errors])
    assert got["mse"] == pytest.approx(float(squared.pow(2).mean()), rel=REL)
    rows = sum(lengths)  # Ignite's MeanAbsoluteError: summed over features, averaged over rows
    assert got["mae"] == pytest.approx(float(squared.abs().sum()) / rows, rel=REL)


def test_evaluation_leaves_parameters_and_gradients_alone():
    model = make_model("LSTM")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    create_supervised_tbptt_evaluator(model, metrics(), tbtt_step=3, output_transform=flat).run([make_data(8)])
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not model.training
