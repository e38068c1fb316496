"""Resuming and the edges of a run (issue 28): a ``Checkpoint`` on every kind of event resumed into a fresh
trainer and model from the file read with ``weights_only=True``; checkpoints refused inside a batch or under other
options; ``run()`` with other data after an exception; ``deterministic=True`` with dropout, ``terminate()`` and a
shuffling ``DataLoader``; padded steps holding NaN; ``skip_nonfinite`` with a scaler; the smaller checks.
"""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import StreamBatches, Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.test_lifecycle import DATA, EPOCHS, K1, K2, Boom, assert_same_params, params_of, with_data

CONFIGS = [  # (data, overlap, carry_state, deterministic)
    ("StreamBatches", "recompute", True, False), ("StreamBatches", "retain", True, True),
    ("DataLoader", "retain", False, True), ("DataLoader", "recompute", False, True),
]
BOUNDARY_EVENTS = [Events.STARTED, Events.EPOCH_STARTED, Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED,
                   Events.ITERATION_STARTED, Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED]


def adam_trainer(config, model=None, **options):
    kind, overlap, carry, deterministic = config
    model = model or make_model("GRU")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # its state must be saved too
    kwargs = dict(tbtt_step=K1, k2=K2, overlap=overlap, carry_state=carry, deterministic=deterministic)
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), **{**kwargs, **options})
    return model, optimizer, trainer


def uninterrupted(config):
    model, _, trainer = adam_trainer(config)
    trainer.run(with_data(config, trainer), max_epochs=EPOCHS)
    return params_of(model)


def raise_once(trainer, event):
    raised = []

    def boom(_):
        if not raised:
            raised.append(1)
            raise Boom(str(event))

    trainer.add_event_handler(event, boom)


def saved_files(directory):
    return sorted((os.path.join(directory, f) for f in os.listdir(directory)), key=os.path.getmtime)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_a_checkpoint_on_any_batch_boundary_event_resumes_exactly_in_a_fresh_trainer(config, tmp_path):
    expected = uninterrupted(config)
    model, optimizer, trainer = adam_trainer(config)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
    for event in BOUNDARY_EVENTS:
        directory = tmp_path / event.name
        step = lambda engine, _: int(engine.state_dict()["iteration"]) * 100 + len(os.listdir(directory))  # noqa: E731
        trainer.add_event_handler(event, Checkpoint(to_save, DiskSaver(str(directory), create_dir=True), n_saved=None,
                                                    global_step_transform=step))
    trainer.run(with_data(config, trainer), max_epochs=EPOCHS)
    for event in BOUNDARY_EVENTS:
        files = saved_files(tmp_path / event.name)
        assert files, event
        for path in files[:: max(1, len(files) // 3)]:  # the first, middles and the last
            saved, total = torch.load(path, weights_only=True), EPOCHS * len(DATA[config[0]]())
            if saved["trainer"]["iteration"] == total:
                continue  # a finished run: run() starts a new one, as Ignite's does
            model, optimizer, trainer = adam_trainer(config)
            torch.manual_seed(123)  # the saved seed and generator states decide, not this process' (after make_model's)
            Checkpoint.load_objects({"model": model, "optimizer": optimizer, "trainer": trainer}, saved)
            trainer.run(with_data(config, trainer), max_epochs=EPOCHS)
            assert trainer.state.iteration == total
            try:
                assert_same_params(params_of(model), expected)
            except AssertionError as error:
                raise AssertionError(f"{event} {os.path.basename(path)}: {error}") from None


@pytest.mark.parametrize("event", [Tbptt_Events.TIME_ITERATION_STARTED, Tbptt_Events.GRADIENTS_COMPUTED,
                                   Tbptt_Events.TIME_ITERATION_COMPLETED(every=2)])
def test_a_checkpoint_inside_a_batch_is_refused_when_it_is_saved(event, tmp_path):
    config = ("StreamBatches", "retain", True, False)
    model, optimizer, trainer = adam_trainer(config)
    trainer.add_event_handler(event, Checkpoint({"model": model, "trainer": trainer}, DiskSaver(str(tmp_path))))
    with pytest.raises(RuntimeError, match=r"inside batch 1 .*Events.ITERATION_COMPLETED\(every=n\)"):
        trainer.run(with_data(config, trainer), max_epochs=1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option,value", [("k2", 5), ("carry_state", False), ("burn_in", 2), ("overlap", "recompute"),
                                          ("tbtt_step", 3), ("gradient_accumulation_steps", 2)])
def test_a_checkpoint_is_refused_by_a_trainer_built_with_other_options(option, value):
    config = ("StreamBatches", "retain", True, False)
    model, optimizer, trainer = adam_trainer(config)
    trainer.run(with_data(config, trainer), max_epochs=1)
    saved = trainer.state_dict()
    other = adam_trainer(config, **{option: value})[2]
    before = other.state_dict()
    with pytest.raises(ValueError, match=rf"other options \({option}: saved"):
        other.load_state_dict(saved)
    assert other.state_dict() == before  # nothing was loaded


def test_deterministic_checkpoints_load_with_weights_only(tmp_path):
    config = ("DataLoader", "retain", False, True)
    model, optimizer, trainer = adam_trainer(config)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), Checkpoint({"trainer": trainer}, DiskSaver(str(tmp_path))))
    trainer.run(with_data(config, trainer), max_epochs=1)
    saved = torch.load(saved_files(tmp_path)[0], weights_only=True)
    assert saved["iteration"] == 2 and len(saved["rng_states"]) == 3


# ---------------------------------------------------------------------------------------- run() again, other data


def test_run_with_other_data_after_an_exception_starts_afresh():
    config = ("StreamBatches", "retain", True, False)
    model, optimizer, trainer = adam_trainer(config)
    raise_once(trainer, Events.ITERATION_COMPLETED(once=2))
    with pytest.raises(Boom):
        trainer.run(with_data(config, trainer), max_epochs=1)
    fresh = make_model("GRU")
    fresh.load_state_dict(model.state_dict())
    fresh, fresh_optimizer, fresh_trainer = adam_trainer(config, model=fresh)
    fresh_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing the moments' tensors
    other = with_data(config, trainer)
    with pytest.warns(UserWarning, match="other data than the run an exception stopped at iteration 2"):
        trainer.run(other, max_epochs=1)
    assert trainer.state.iteration == len(other)
    # The same as a fresh trainer from those weights and optimizer state on the other data: nothing of the old
    # stream flows in, no batch of the new data is skipped.
    fresh_trainer.run(with_data(config, fresh_trainer), max_epochs=1)
    assert_same_params(params_of(model), params_of(fresh))


# -------------------------------------------------------------------------------------------- deterministic=True


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.drop, self.head = nn.GRU(2, 4), nn.Dropout(0.5), nn.Linear(4, 2)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(self.drop(out)), hidden


def dropout_run(config, stop=None):
    torch.manual_seed(0)
    model = DropoutNet().double()
    _, _, trainer = adam_trainer(config, model=model)
    data = with_data(config, trainer)
    if stop == "exception":
        raise_once(trainer, Events.ITERATION_COMPLETED(once=2))
        with pytest.raises(Boom):
            trainer.run(data, max_epochs=EPOCHS)
    elif stop == "terminate":
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda engine: engine.terminate())
        trainer.run(data, max_epochs=EPOCHS)
    epochs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs.append(engine.state.epoch))
    trainer.run(data, max_epochs=EPOCHS)
    return params_of(model), trainer.state.iteration, epochs


@pytest.mark.parametrize("config", [("StreamBatches", "retain", True, True), ("DataLoader", "recompute", False, True)],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("stop", ["exception", "terminate"])
def test_deterministic_run_again_continues_the_data_and_the_dropout_draws(config, stop):
    expected, iterations, _ = dropout_run(config)
    got, got_iterations, epochs = dropout_run(config, stop)
    assert got_iterations == iterations and epochs == [1, 2]  # epoch 1 re-entered, not counted as epoch 2
    assert_same_params(got, expected)


# ---------------------------------------------------------------------------------------------- padded steps


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e308])
@pytest.mark.parametrize("key", ["lengths", "mask"])
def test_padded_steps_can_hold_anything(overlap, fill, key):
    x, y = make_data(12)
    lengths = torch.tensor([12, 7, 4])
    valid = torch.arange(12)[:, None] < lengths[None]
    info = {"lengths": lengths} if key == "lengths" else {"mask": valid}

    def train(x):
        model = make_model("LSTM")
        trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(),
                                                  tbtt_step=K1, k2=K2, overlap=overlap)
        trainer.run([(x, y, info)], max_epochs=2)
        return params_of(model)

    filled = torch.where(valid[..., None], x, fill)
    assert_same_params(train(filled), train(torch.where(valid[..., None], x, 0.0)))


# ----------------------------------------------------------------------------------- skip_nonfinite with a scaler


def test_skip_nonfinite_with_a_scaler_skips_a_gradient_a_handler_made_non_finite():
    x, y = make_data(12)
    x, y = x.float(), y.float()

    def train(poison):
        model = make_model("GRU").float()
        trainer = create_supervised_tbptt_trainer(
            model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), tbtt_step=K1, amp_mode="amp", scaler=True,
            skip_nonfinite=True,
        )

        @trainer.on(Tbptt_Events.GRADIENTS_COMPUTED(once=3))
        def write(_):
            for p in model.parameters():
                p.grad.fill_(poison)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.run([(x, y)], max_epochs=2)
        return params_of(model), trainer.state.skipped_updates

    got, skipped = train(float("nan"))
    expected, _ = train(0.0)  # plain SGD with a zero gradient leaves the parameters as a skip does
    assert skipped == 1
    assert_same_params(got, expected)


# ------------------------------------------------------------------------------------------------ smaller checks


@pytest.mark.parametrize("returned", [1.5, (torch.tensor(1.0), 2), torch.ones(3)])
def test_a_loss_fn_that_returns_no_scalar_tensor_is_named_before_any_update(returned):
    model = make_model("GRU")
    before = params_of(model)
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1),
                                              lambda y_pred, y: returned, tbtt_step=K1)
    with pytest.raises(TypeError, match=r"loss_fn\(y_pred, y\) must return a scalar tensor"):
        trainer.run([make_data(6)])
    assert_same_params(params_of(model), before)


@pytest.mark.parametrize("batch", ["all padding", "no samples"])
def test_a_batch_with_nothing_to_train_warns_once(batch):
    x, y = make_data(6)
    if batch == "no samples":
        batches = [(x[:, :0], y[:, :0])] * 2
    else:
        batches = [(x, y, {"lengths": torch.zeros(3, dtype=torch.long)})] * 2
    model = make_model("GRU")
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(),
                                              tbtt_step=K1)
    with pytest.warns(UserWarning, match="has no valid") as record:
        trainer.run(batches)
    assert sum("has no valid" in str(w.message) for w in record) == 1


def test_in_memory_stream_batches_check_the_vocabulary():
    docs = [torch.arange(10), torch.tensor([3, 4, 50, 2])]
    with pytest.raises(ValueError, match=r"document 1 holds token id 50 \(element 2\), outside the vocabulary \[0, 50\)"):
        StreamBatches(docs, batch_size=2, seq_len=3, vocab_size=50)
    assert len(StreamBatches(docs, batch_size=2, seq_len=3, vocab_size=51)) == 2
    with pytest.raises(TypeError, match="token ids"):
        StreamBatches([torch.randn(10)], batch_size=2, seq_len=3, vocab_size=50)


RESUME_IN_A_FRESH_PROCESS = """
import sys, torch
from ignite.handlers import Checkpoint
from tests.test_resume import adam_trainer, with_data, EPOCHS
config, path, out = eval(sys.argv[1]), sys.argv[2], sys.argv[3]
model, optimizer, trainer = adam_trainer(config)
torch.manual_seed(123)  # the saved seed and generator states decide (make_model seeds the process with 0)
Checkpoint.load_objects({"model": model, "optimizer": optimizer, "trainer": trainer}, torch.load(path, weights_only=True))
trainer.run(with_data(config, trainer), max_epochs=EPOCHS)
torch.save(model.state_dict(), out)
"""


def test_a_mid_epoch_checkpoint_resumes_exactly_in_a_fresh_process(tmp_path):
    # The process-wide state a resume could lean on (the seed, the generators, Ignite's event table) is not there.
    config = ("DataLoader", "retain", False, True)
    expected = uninterrupted(config)
    model, optimizer, trainer = adam_trainer(config)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), Checkpoint(to_save, DiskSaver(str(tmp_path))))
    trainer.run(with_data(config, trainer), max_epochs=EPOCHS)
    out = tmp_path / "resumed.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", RESUME_IN_A_FRESH_PROCESS, repr(config), saved_files(tmp_path)[0], str(out)],
                   check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    resumed = torch.load(out, weights_only=True)
    assert_same_params(resumed, expected)


def test_an_exception_in_the_middle_epochs_epoch_started_trains_every_iteration_with_the_right_epoch():
    # Issue 28's case: EPOCH_STARTED of epoch 2 of 3 raised, then run(): 20 of 30 iterations were trained and the
    # epoch numbered one ahead, so set_epoch laid out another epoch.
    config = ("StreamBatches", "recompute", True, False)
    model, _, trainer = adam_trainer(config)
    data = with_data(config, trainer)
    raise_once(trainer, Events.EPOCH_STARTED(once=2))
    laid_out = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: laid_out.append(data.epoch))
    with pytest.raises(Boom):
        trainer.run(data, max_epochs=3)
    trainer.run(data, max_epochs=3)
    assert trainer.state.iteration == 3 * len(data) and laid_out == [0, 1, 2]  # epoch 2's handlers ran again
    expected_model, _, expected = adam_trainer(config)
    expected.run(with_data(config, expected), max_epochs=3)
    assert_same_params(params_of(model), params_of(expected_model))
