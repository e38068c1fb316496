"""The carried stream in state_dict(): a run resumed from Ignite's Checkpoint continues exactly."""

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer
from ignite_tbptt.carry import CARRIED_STATE_KEY
from tests.models import make_data, make_model, make_tokens, token_loss

K1, K2 = 3, 7  # windows reach across batch boundaries


VARIANTS = {  # name: (model, trainer options)
    "LSTM": ("LSTM", {}),
    # retain: the segments keep parameter versions, which the checkpointed re-runs read
    "checkpoint_every": ("LSTM", {"checkpoint_every": 2}),
    # retain: the embedding's and decoder's clones are not kept; the graphs' saved tensors are restored
    "embedding LM": ("tokens", {}),
}
VARIANT = "LSTM"


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    monkeypatch.setattr(f"{__name__}.VARIANT", request.param)
    return request.param


def stream_batches(n=5, length=6):
    x, y = make_tokens(n * length, seed=3) if VARIANTS[VARIANT][0] == "tokens" else make_data(n * length, seed=3)
    return [(x[i * length : (i + 1) * length], y[i * length : (i + 1) * length]) for i in range(n)]


def setup(overlap, deterministic):
    kind, options = VARIANTS[VARIANT]
    model = make_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # its state must be saved too
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, token_loss if kind == "tokens" else nn.MSELoss(), tbtt_step=K1, k2=K2, overlap=overlap,
        carry_state=True, deterministic=deterministic, **options,
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
def test_resume_mid_epoch_with_a_deterministic_engine(tmp_path, overlap, variant):
    uninterrupted = run_with_checkpoints(tmp_path, overlap, True, Events.ITERATION_COMPLETED)
    path = tmp_path / "checkpoint_3.pt"  # after the 3rd of 5 batches: windows reach back into batch 3
    assert path.exists()
    assert_same(resume(path, overlap, True), uninterrupted)
    # The test can fail: without the carried stream the resumed run trains differently.
    lost = resume(path, overlap, True, drop_stream=True)
    assert any(not torch.allclose(lost[n], uninterrupted[n]) for n in lost)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_resume_at_an_epoch_boundary(tmp_path, overlap, variant):
    uninterrupted = run_with_checkpoints(tmp_path, overlap, False, Events.EPOCH_COMPLETED)
    assert_same(resume(tmp_path / "checkpoint_5.pt", overlap, False), uninterrupted)


def test_state_dict_loads_with_weights_only_and_counts_chunks(tmp_path):
    model, optimizer, trainer = setup("retain", False)
    trainer.run(stream_batches(2), max_epochs=1)
    torch.save(trainer.state_dict(), tmp_path / "t.pt")
    saved = torch.load(tmp_path / "t.pt")  # weights_only: only tensors and plain containers
    assert saved["time_iteration"] == 4 and saved[CARRIED_STATE_KEY]["position"] == 12
    # What the retained segments' graphs saved is in the checkpoint, so their graphs can be rebuilt exactly.
    segments = saved[CARRIED_STATE_KEY]["window"]["segments"]
    assert segments and all(tensors for *_, tensors in segments)


def test_without_carry_state_nothing_is_carried_or_saved():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), K1)
    trainer.run(stream_batches(2), max_epochs=1)
    assert trainer.state_dict()[CARRIED_STATE_KEY] is None


def test_retain_keeps_clones_of_the_state_path_parameters_only():
    model = make_model("tokens")
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), token_loss, tbtt_step=K1, k2=K2, overlap="retain",
        carry_state=True,
    )
    trainer.run([make_tokens(12)])
    window = trainer.carried_state.window
    assert sorted(window.saved_params) == ["model.rnn.weight_hh_l0", "model.rnn.weight_ih_l0"]
    assert window.segments and all(seg.params is None for seg in window.segments)


def test_a_window_that_does_not_rebuild_to_its_saved_graph_is_refused():
    _, _, trainer = setup("retain", False)
    trainer.run(stream_batches(2), max_epochs=1)
    saved = trainer.state_dict()
    start, stop, h_in, x, version, tensors, factor = saved[CARRIED_STATE_KEY]["window"]["segments"][0]
    saved[CARRIED_STATE_KEY]["window"]["segments"][0] = (start, stop, h_in, x, version, tensors[:-1], factor)
    with pytest.raises(ValueError, match="does not rebuild to the graph it was saved from"):
        setup("retain", False)[2].load_state_dict(saved)
