"""Gradient accumulation, the GRADIENTS_COMPUTED hook and clipping, AMP, the deterministic engine."""

import pytest
import torch
from ignite.engine import DeterministicEngine
from torch import nn

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.reference import reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory, batches_trajectory


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("T,k1,k2,steps", [(12, 2, 5, 2), (13, 3, 3, 3), (10, 1, 3, 4)])
def test_gradient_accumulation_matches_reference(overlap, T, k1, k2, steps):
    x, y = make_data(T)
    expected = reference_trajectory(make_model("GRU"), x, y, k1, k2, overlap, LR, nn.MSELoss(), accumulate=steps)
    got = batches_trajectory(make_model("GRU"), [(x, y)], k1, k2, overlap, gradient_accumulation_steps=steps)
    assert_same_trajectory(got, expected)


def make_trainer(model, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=3, **kwargs)


def test_gradients_computed_fires_between_backward_and_step():
    model = make_model("LSTM")
    trainer = make_trainer(model, k2=5, gradient_accumulation_steps=2)
    seen = []

    @trainer.on(Tbptt_Events.GRADIENTS_COMPUTED)
    def inspect(engine):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen.append((engine.state.time_iteration, all(p.grad is not None for p in model.parameters()), before))

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def changed(engine):
        if seen and seen[-1][0] == engine.state.time_iteration:  # the step came after the handler
            assert any(not torch.equal(p, seen[-1][2][n]) for n, p in model.named_parameters())

    trainer.run([make_data(12)])  # 4 chunks, a step after every 2nd
    assert [(i, ok) for i, ok, _ in seen] == [(2, True), (4, True)]


def test_event_filters_work_on_gradients_computed():
    trainer = make_trainer(make_model("GRU"))
    fired = []
    trainer.add_event_handler(Tbptt_Events.GRADIENTS_COMPUTED(every=2), lambda e: fired.append(e.state.time_iteration))
    trainer.run([make_data(12)] * 2)
    assert fired == [2, 4, 6, 8]


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_clip_grad_norm_clips_after_the_hook_and_reports_the_norm(overlap):
    model = make_model("LSTM")
    trainer = make_trainer(model, k2=6, overlap=overlap, clip_grad_norm=0.05)
    raw, clipped = [], []

    @trainer.on(Tbptt_Events.GRADIENTS_COMPUTED)
    def record_raw(_):
        raw.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def record_clipped(engine):
        clipped.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        torch.testing.assert_close(engine.state.grad_norm, raw[-1])

    trainer.run([make_data(12)])
    assert max(raw) > 0.05  # the test would be vacuous otherwise
    assert all(c <= 0.05 + 1e-9 for c in clipped)


def test_clipping_changes_the_trajectory_only_when_norms_exceed():
    x, y = make_data(9)
    free = batches_trajectory(make_model("GRU"), [(x, y)], 3, 3, "recompute")
    loose = batches_trajectory(make_model("GRU"), [(x, y)], 3, 3, "recompute", clip_grad_norm=1e6)
    tight = batches_trajectory(make_model("GRU"), [(x, y)], 3, 3, "recompute", clip_grad_norm=1e-3)
    assert_same_trajectory(loose, free)
    assert any(not torch.allclose(tight[-1][n], free[-1][n]) for n in free[-1])


def test_deterministic_gives_ignites_deterministic_engine():
    assert isinstance(make_trainer(make_model("GRU"), deterministic=True), DeterministicEngine)
    assert not isinstance(make_trainer(make_model("GRU")), DeterministicEngine)


class Float32(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # A GRU: a fused LSTM has no bfloat16 kernel on CPUs without AVX-512 BF16 (tests/models.py)
        self.rnn, self.head = nn.GRU(4, 16), nn.Linear(16, 2)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


def amp_run(device, **kwargs):
    model = Float32().to(device)
    dtypes = []
    model.head.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.5), nn.MSELoss(), tbtt_step=5, k2=10, device=device, **kwargs
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, 4, generator=g)
    losses = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    trainer.run([(x, x[..., :2].roll(1, 0))], max_epochs=3)
    return model, set(dtypes), torch.stack(losses).float().cpu()


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_bfloat16_autocast_on_cpu(overlap):
    plain_model, plain_dtypes, plain = amp_run("cpu", overlap=overlap)
    amp_model, amp_dtypes, amp = amp_run("cpu", overlap=overlap, amp_mode="amp")
    assert plain_dtypes == {torch.float32} and amp_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in amp_model.parameters())  # master weights stay float32
    assert amp[-6:].mean() < amp[:6].mean()  # it learns
    torch.testing.assert_close(amp, plain, atol=0.05, rtol=0.05)  # and follows the float32 run


def test_a_power_of_two_scaler_changes_nothing_when_nothing_overflows():
    unscaled, _, _ = amp_run("cpu", amp_mode="amp")
    scaled, _, _ = amp_run("cpu", amp_mode="amp", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for a, b in zip(unscaled.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_float16_autocast_with_grad_scaler_on_cuda(overlap):
    model, dtypes, losses = amp_run("cuda", overlap=overlap, amp_mode="amp", scaler=True)
    assert dtypes == {torch.float16}
    assert torch.isfinite(losses).all() and losses[-6:].mean() < losses[:6].mean()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"amp_mode": "apex"}, ValueError, 'amp_mode must be None or "amp"'),
        ({"scaler": True}, ValueError, 'a scaler needs amp_mode="amp"'),
        ({"amp_mode": "amp", "scaler": "yes"}, TypeError, "scaler must be a bool or a torch.amp.GradScaler"),
        ({"gradient_accumulation_steps": 0}, ValueError, "gradient_accumulation_steps must be >= 1"),
        ({"gradient_accumulation_steps": 1.5}, TypeError, "gradient_accumulation_steps must be an int"),
        ({"clip_grad_norm": -1.0}, ValueError, "clip_grad_norm must be a positive number"),
        ({"hidden_batch_dim": "1"}, TypeError, "hidden_batch_dim must be an int"),
    ],
)
def test_bad_feature_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_trainer(make_model("GRU"), **kwargs)
