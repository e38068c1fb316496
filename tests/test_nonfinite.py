"""skip_nonfinite=True: an update whose loss or gradients are not finite is skipped, and nothing else changes."""

import warnings

import pytest
import torch
from ignite.engine import Events
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer
from tests.models import make_data, make_model


def batches(nan_batch=None, count=4, T=12):
    out = []
    for i in range(count):
        x, y = make_data(T, seed=10 + i)
        if i == nan_batch:
            x = torch.full_like(x, float("nan"))
        out.append((x, y))
    return out


def train(data, overlap="recompute", k2=5, loss_fn=nn.MSELoss(), model=None, **kwargs):
    model = model or make_model("LSTM")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # its state must not change either
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, loss_fn, tbtt_step=3, k2=k2, overlap=overlap, **kwargs
    )
    trainer.run(data, max_epochs=2)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, optimizer, trainer


def assert_same(a, b, atol=1e-12):
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("options", [{}, {"clip_grad_norm": 0.5}, {"gradient_accumulation_steps": 2}],
                         ids=["plain", "clip", "accumulate"])
def test_a_nan_batch_leaves_the_run_of_the_other_batches(overlap, options):
    with pytest.warns(UserWarning, match=r"skip_nonfinite: the update after chunk [01] of batch 3") as record:
        got, optimizer, trainer = train(batches(nan_batch=2), overlap, skip_nonfinite=True, **options)
    assert len([w for w in record if "skip_nonfinite" in str(w.message)]) == 1  # a warning once
    expected, expected_optimizer, _ = train(batches()[:2] + batches()[3:], overlap, **options)
    assert_same(got, expected)
    steps = [s["step"] for s in optimizer.state_dict()["state"].values()]
    assert steps == [s["step"] for s in expected_optimizer.state_dict()["state"].values()]
    chunks_in_nan_batch = 4 // options.get("gradient_accumulation_steps", 1)
    assert trainer.state.skipped_updates == 2 * chunks_in_nan_batch  # two epochs
    assert trainer.state_dict()["skipped_updates"] == trainer.state.skipped_updates


def test_off_by_default_the_nan_spreads():
    got, _, _ = train(batches(nan_batch=2))
    assert all(torch.isnan(p).all() for p in got.values())


def test_non_finite_gradients_alone_are_skipped():
    model = make_model("GRU")
    poison = {"on": False}
    model.head.weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    trainer_batches = batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=3, skip_nonfinite=True)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: poison.update(on=e.state.iteration == 2))
    with pytest.warns(UserWarning, match="skip_nonfinite"):
        trainer.run(trainer_batches)
    assert trainer.state.skipped_updates == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_an_infinite_loss_with_finite_gradients_is_skipped():
    def loss_fn(y_pred, y):  # a constant term: the gradient does not see it
        return nn.functional.mse_loss(y_pred, y) + torch.tensor(float("inf"))

    with pytest.warns(UserWarning, match="skip_nonfinite"):
        got, _, trainer = train(batches(count=1), loss_fn=loss_fn, skip_nonfinite=True)
    start = {n: p.detach() for n, p in make_model("LSTM").named_parameters()}
    assert_same(got, start)
    assert trainer.state.skipped_updates == 8


def test_with_a_grad_scaler_its_inf_check_decides():
    # On the CPU autocast runs in bfloat16; the scaler's powers of two scale and unscale exactly.
    with pytest.warns(UserWarning, match="skip_nonfinite"):
        got, _, trainer = train(batches(nan_batch=1), amp_mode="amp", scaler=True, skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scaler's warnings about CPU use, if any
        expected, _, _ = train(batches()[:1] + batches()[2:], amp_mode="amp", scaler=True)
    assert trainer.state.skipped_updates == 8
    assert_same(got, expected, atol=1e-6)


def test_a_fresh_run_counts_from_zero():
    with pytest.warns(UserWarning):
        _, _, trainer = train(batches(nan_batch=0, count=1), skip_nonfinite=True)
    assert trainer.state.skipped_updates == 8
    trainer.state.max_epochs = None  # a fresh run
    trainer.run(batches(count=1), max_epochs=1)
    assert trainer.state.skipped_updates == 0
