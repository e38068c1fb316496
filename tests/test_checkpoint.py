"""The carried stream in state_dict(): a run resumed from Ignite's Checkpoint continues exactly."""

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer
from ignite_tbptt.carry import CARRIED_STATE_KEY
from tests.models import make_data, make_model

K1, K2 = 3, 7  # windows reach across batch boundaries


def stream_batches(n=5, length=6):
    x, y = make_data(n * length, seed=3)
    return [(x[i * length : (i + 1) * length], y[i * length : (i + 1) * length]) for i in range(n)]


def setup(overlap, deterministic):
    model = make_model("LSTM")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # its state must be saved too
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, nn.MSELoss(), tbtt_step=K1, k2=K2, overlap=overlap, carry_state=True,
        deterministic=deterministic,
    )
    return model, optimizer, trainer


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_with_checkpoints(tmp_path, overlap, deterministic, event, max_epochs=2):
    model, optimizer, trainer = setup(overlap, deterministic)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
    trainer.add_event_handler(event, Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False), n_saved=None))
    trainer.run(stream_batches(), max_epochs=max_epochs)
    return params_of(model)


def resume(path, overlap, deterministic, drop_stream=False, max_epochs=2):
    model, optimizer, trainer = setup(overlap, deterministic)
    checkpoint = torch.load(path, weights_only=False)
    if drop_stream:
        checkpoint["trainer"][CARRIED_STATE_KEY] = None
    Checkpoint.load_objects({"model": model, "optimizer": optimizer, "trainer": trainer}, checkpoint)
    trainer.run(stream_batches(), max_epochs=max_epochs)
    return params_of(model)


def assert_same(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_resume_mid_epoch_with_a_deterministic_engine(tmp_path, overlap):
    uninterrupted = run_with_checkpoints(tmp_path, overlap, True, Events.ITERATION_COMPLETED)
    path = tmp_path / "checkpoint_3.pt"  # after the 3rd of 5 batches: windows reach back into batch 3
    assert path.exists()
    assert_same(resume(path, overlap, True), uninterrupted)
    # The test can fail: without the carried stream the resumed run trains differently.
    lost = resume(path, overlap, True, drop_stream=True)
    assert any(not torch.allclose(lost[n], uninterrupted[n]) for n in lost)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_resume_at_an_epoch_boundary(tmp_path, overlap):
    uninterrupted = run_with_checkpoints(tmp_path, overlap, False, Events.EPOCH_COMPLETED)
    assert_same(resume(tmp_path / "checkpoint_5.pt", overlap, False), uninterrupted)


def test_state_dict_loads_with_weights_only_and_counts_chunks(tmp_path):
    model, optimizer, trainer = setup("retain", False)
    trainer.run(stream_batches(2), max_epochs=1)
    torch.save(trainer.state_dict(), tmp_path / "t.pt")
    saved = torch.load(tmp_path / "t.pt")  # weights_only: only tensors and plain containers
    assert saved["time_iteration"] == 4 and saved[CARRIED_STATE_KEY]["position"] == 12
    # Parameter versions of the retained segments are saved, so their graphs can be rebuilt exactly.
    assert len(saved[CARRIED_STATE_KEY]["window"]["versions"]) >= 1


def test_without_carry_state_nothing_is_carried_or_saved():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1)
    trainer.run(stream_batches(2), max_epochs=1)
    assert trainer.state_dict()[CARRIED_STATE_KEY] is None
