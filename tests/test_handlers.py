"""TbpttLoss and its usages, RunningAverage, loggers' global step, and the chunk progress bar."""

import importlib.util
import io
import math
import re
import sys

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Events
from ignite.exceptions import NotComputableError
from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine
from ignite.handlers.base_logger import BaseLogger, BaseOutputHandler
from ignite.metrics import RunningAverage
from ignite.metrics.metric import BatchWise, RunningBatchWise
from torch import nn

import ignite_tbptt.handlers
from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from ignite_tbptt.handlers import (
    ChunkProgressBar,
    ChunkUpdated,
    ChunkWise,
    ChunkedBatchWise,
    ChunkedEpochWise,
    TbpttLoss,
)
from tests.models import make_data, make_model

K1 = 4


def make_trainer(k1=K1, **kwargs):
    model = make_model("LSTM")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=k1, **kwargs)


def two_batches():
    """T = 10 and 7 with k1 = 4: short last chunks (2 and 3 steps), and batch sizes 3 and 5."""
    return [make_data(10, batch=3, seed=1), make_data(7, batch=5, seed=2)]


def record_chunks(trainer):
    """Every chunk as (epoch, batch iteration, loss, weight), the weight computed by hand from the batch."""
    chunks = []

    @trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED)
    def record(engine):
        batch_size, chunk = engine.state.batch[0].shape[1], engine.state.chunk
        weight = (chunk.stop - chunk.start) * batch_size
        chunks.append((engine.state.epoch, engine.state.iteration, float(engine.state.output), weight))

    return chunks


def weighted_mean(chunks):
    return sum(c[2] * c[3] for c in chunks) / sum(c[3] for c in chunks)


# ---------------------------------------------------------------- TbpttLoss values


def test_epoch_loss_is_the_weighted_mean_of_the_chunks():
    trainer = make_trainer()
    TbpttLoss().attach(trainer, "loss")
    chunks = record_chunks(trainer)
    state = trainer.run(two_batches(), max_epochs=1)
    assert [c[3] for c in chunks] == [12, 12, 6, 20, 15]
    expected = weighted_mean(chunks)
    assert state.metrics["loss"] == pytest.approx(expected, rel=1e-12)
    unweighted = sum(c[2] for c in chunks) / len(chunks)
    assert abs(expected - unweighted) > 1e-3  # the weighting matters in this case
    assert isinstance(state.metrics["loss"], float)


def test_every_usage_level():
    trainer = make_trainer()
    usages = {
        "chunk": ChunkWise(),
        "chunk_str": "chunk_wise",
        "block": ChunkWise(every=2),
        "batch": ChunkedBatchWise(),
        "batch_ignite": BatchWise(),
        "epoch": ChunkedEpochWise(),
        "epoch_default": None,
        "running": "running_batch_wise",
        "epoch_so_far": ChunkUpdated("single_epoch_running_batch_wise"),
    }
    for name, usage in usages.items():
        metric = TbpttLoss()
        metric.attach(trainer, name) if usage is None else metric.attach(trainer, name, usage=usage)
    chunks = record_chunks(trainer)
    seen = {name: [] for name in usages}

    def snapshot(names):
        def handler(engine):
            for name in names:
                seen[name].append(engine.state.metrics[name])

        return handler

    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, snapshot(["chunk", "chunk_str"]))
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(every=2), snapshot(["block"]))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, snapshot(["batch", "batch_ignite", "running", "epoch_so_far"])
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, snapshot(["epoch", "epoch_default"]))
    batch_outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: batch_outputs.append(engine.state.output))
    trainer.run(two_batches(), max_epochs=2)

    approx = lambda values: pytest.approx(values, rel=1e-12)  # noqa: E731
    assert len(chunks) == 10
    assert seen["chunk"] == seen["chunk_str"] == [c[2] for c in chunks]
    assert seen["block"] == approx([weighted_mean(chunks[i : i + 2]) for i in range(0, 10, 2)])
    batches = [[c for c in chunks if c[1] == it] for it in range(1, 5)]
    assert seen["batch"] == seen["batch_ignite"] == approx([weighted_mean(b) for b in batches])
    assert seen["batch"] == approx(batch_outputs)  # the trainer's batch loss
    assert seen["running"] == approx([weighted_mean(sum(batches[: i + 1], [])) for i in range(4)])
    so_far = [batches[0], batches[0] + batches[1], batches[2], batches[2] + batches[3]]
    assert seen["epoch_so_far"] == approx([weighted_mean(b) for b in so_far])
    epochs = [[c for c in chunks if c[0] == e] for e in (1, 2)]
    assert seen["epoch"] == seen["epoch_default"] == approx([weighted_mean(e) for e in epochs])


def test_attach_detach_and_bad_usages():
    trainer = make_trainer()
    metric = TbpttLoss()
    metric.attach(trainer, "loss", usage="batch_wise")
    assert metric.is_attached(trainer, usage=ChunkedBatchWise()) and metric.is_attached(trainer, usage=BatchWise())
    assert not metric.is_attached(trainer)
    metric.detach(trainer, usage="batch_wise")
    assert not metric.is_attached(trainer, usage="batch_wise")
    block = TbpttLoss()
    block.attach(trainer, "block", usage=ChunkWise(every=3))
    assert block.is_attached(trainer, usage=ChunkWise(every=3))
    state = trainer.run(two_batches(), max_epochs=1)
    assert "loss" not in state.metrics and "block" in state.metrics
    with pytest.raises(ValueError, match="chunk_wise"):
        TbpttLoss().attach(trainer, "x", usage="chunkwise")
    with pytest.raises(TypeError, match="MetricUsage"):
        TbpttLoss().attach(trainer, "x", usage=3)
    with pytest.raises(ValueError, match="every"):
        ChunkWise(every=0)


def test_a_chunk_without_weight_counts_nothing():
    # lengths 3, 2, 1 of T = 12: the chunks (4, 8] and (8, 12] are padding only.
    trainer = make_trainer()
    TbpttLoss().attach(trainer, "loss")
    TbpttLoss().attach(trainer, "chunk", usage=ChunkWise())
    per_chunk = []
    trainer.add_event_handler(
        Tbptt_Events.TIME_ITERATION_COMPLETED,
        lambda e: per_chunk.append((e.state.chunk_weight, float(e.state.output), e.state.metrics["chunk"])),
    )
    x, y = make_data(12, batch=3)
    state = trainer.run([(x, y, {"lengths": torch.tensor([3, 2, 1])})], max_epochs=1)
    assert [w for w, _, _ in per_chunk] == [6, 0, 0]
    assert per_chunk[0][2] == per_chunk[0][1] and all(math.isnan(m) for _, _, m in per_chunk[1:])
    assert state.metrics["loss"] == pytest.approx(per_chunk[0][1], rel=1e-12)


def test_weights_may_be_tensors_and_nan_losses_of_empty_chunks_vanish():
    metric = TbpttLoss()
    metric.update((torch.tensor(2.0), torch.tensor(3)))
    metric.update((torch.tensor(float("nan")), torch.tensor(0)))
    metric.update((torch.tensor(float("nan")), 0))
    metric.update((1.0, 1))
    assert metric.compute() == pytest.approx(7 / 4)
    metric.reset()
    with pytest.raises(NotComputableError, match="no chunk"):
        metric.compute()


def test_compute_all_reduces_the_sums(monkeypatch):
    # Another process saw one chunk of loss 5 and weight 2: the reduction must add all three sums.
    other = {"sum": 10.0, "weight": 2.0, "chunks": 1}
    calls = []

    def fake_all_reduce(value, op="SUM"):
        key = ["sum", "weight", "chunks"][len(calls)]
        calls.append(key)
        return value + other[key]

    metric = TbpttLoss()
    metric.update((torch.tensor(1.0), 6))
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "all_reduce", fake_all_reduce)
    assert metric.compute() == pytest.approx((6 + 10) / (6 + 2))
    assert calls == ["sum", "weight", "chunks"]
    assert float(metric._sum) == 6.0  # the local sums are kept


# ---------------------------------------------------------------- RunningAverage, loggers, checkpoints


def test_running_average_of_tbptt_loss():
    trainer = make_trainer()
    loss = TbpttLoss()
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, loss.iteration_completed)
    RunningAverage(loss, alpha=0.5).attach(trainer, "smooth")
    chunks = record_chunks(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.metrics["smooth"]))
    trainer.run(two_batches(), max_epochs=2)
    expected, value = [], None
    for it in range(1, 5):
        batch = weighted_mean([c for c in chunks if c[1] == it])
        value = batch if value is None else 0.5 * value + 0.5 * batch
        expected.append(value)
    assert seen == pytest.approx(expected, rel=1e-12)


def test_running_average_of_tbptt_loss_needs_the_chunks():
    trainer = make_trainer()
    RunningAverage(TbpttLoss()).attach(trainer, "smooth")  # updated per batch only: skipped
    with pytest.raises(NotComputableError, match="add_event_handler"):
        trainer.run(two_batches(), max_epochs=1)


def test_running_average_over_chunk_outputs():
    trainer = make_trainer()
    ema = RunningAverage(output_transform=lambda loss: loss, alpha=0.5)
    ema.attach(trainer, "ema", usage=ChunkUpdated(RunningBatchWise()))
    chunks = record_chunks(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.metrics["ema"]))
    trainer.run(two_batches(), max_epochs=1)
    value, expected = None, []
    for c in chunks:
        value = c[2] if value is None else 0.5 * value + 0.5 * c[2]
        if c is chunks[2] or c is chunks[-1]:  # the last chunk of each batch
            expected.append(value)
    assert seen == pytest.approx(expected, rel=1e-12)


class RecordingOutputHandler(BaseOutputHandler):
    """An Ignite logger's output handler that records (global step, metrics) instead of writing them."""

    def __call__(self, engine, logger, event_name):
        logger.records.append((self.global_step_transform(engine, event_name), dict(engine.state.metrics)))


class RecordingLogger(BaseLogger):
    def __init__(self):
        self.records = []

    def _create_output_handler(self, *args, **kwargs):
        return RecordingOutputHandler(*args, **kwargs)

    def _create_opt_params_handler(self, *args, **kwargs):
        raise NotImplementedError


def test_chunk_events_give_loggers_and_checkpoints_the_chunk_counter(tmp_path):
    trainer = make_trainer()
    TbpttLoss().attach(trainer, "loss", usage=ChunkWise(every=2))
    every_2 = Tbptt_Events.TIME_ITERATION_COMPLETED(every=2)
    logger = RecordingLogger()
    logger.attach_output_handler(trainer, event_name=every_2, tag="train", metric_names=["loss"])
    from_engine = global_step_from_engine(trainer)
    saver = DiskSaver(str(tmp_path), require_empty=False)
    checkpoint = Checkpoint({"model": nn.Linear(1, 1)}, saver, n_saved=None, global_step_transform=from_engine)
    trainer.add_event_handler(every_2, checkpoint)
    chunks = record_chunks(trainer)
    trainer.run(two_batches(), max_epochs=1)
    assert [step for step, _ in logger.records] == [2, 4]  # the loggers' default global step
    expected = [weighted_mean(chunks[0:2]), weighted_mean(chunks[2:4])]
    assert [m["loss"] for _, m in logger.records] == pytest.approx(expected, rel=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_2.pt", "model_4.pt"]


# ---------------------------------------------------------------- host syncs


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


@pytest.fixture
def count_syncs(monkeypatch):
    counts = {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def syncs_of_a_run(count_syncs, attach):
    trainer = make_trainer()
    attach(trainer)
    data = two_batches()
    before = count_syncs["n"]
    trainer.run(data, max_epochs=2)
    return count_syncs["n"] - before


def test_no_host_sync_per_chunk(count_syncs):
    bare = syncs_of_a_run(count_syncs, lambda trainer: None)
    epoch = syncs_of_a_run(count_syncs, lambda trainer: TbpttLoss().attach(trainer, "loss"))
    batch = syncs_of_a_run(count_syncs, lambda trainer: TbpttLoss().attach(trainer, "loss", usage="batch_wise"))
    # 10 chunks in 4 batches and 2 epochs: one transfer per report.
    assert (epoch - bare, batch - bare) == (2, 4)
    quiet_bar = lambda trainer: ChunkProgressBar(file=io.StringIO(), mininterval=1e9).attach(trainer)  # noqa: E731
    assert syncs_of_a_run(count_syncs, quiet_bar) - bare == 4  # drawn at the first and the last chunk of each epoch


# ---------------------------------------------------------------- the progress bar

FORMAT = "{desc}|{n_fmt}/{total_fmt}|{postfix}"


def frames(stream):
    """The bar's successive lines, as (desc, n, total, postfix)."""
    found = []
    for line in re.split(r"[\r\n]+", stream.getvalue()):
        if line.strip():
            desc, counts, postfix = line.split("|")
            n, total = counts.split("/")
            found.append((desc, int(n), total, postfix.strip(", ")))
    return found


def test_progress_bar_advances_per_chunk_and_shows_the_epoch_loss():
    trainer = make_trainer()
    out = io.StringIO()
    ChunkProgressBar(persist=True, file=out, mininterval=0, bar_format=FORMAT).attach(trainer)
    TbpttLoss().attach(trainer, "loss")
    losses = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: losses.append(e.state.metrics["loss"]))
    trainer.run([make_data(10, batch=3), make_data(10, batch=3, seed=2)], max_epochs=2)
    lines = frames(out)
    for epoch in (1, 2):
        mine = [f for f in lines if f[0] == f"Epoch [{epoch}/2]"]
        assert [f[1] for f in mine][:7] == [0, 1, 2, 3, 4, 5, 6]  # then the closing frames
        assert {f[2] for f in mine} == {"6"}
        assert [f[3].split(",")[0] for f in mine[1:7]] == ["batch=1/2"] * 3 + ["batch=2/2"] * 3
        assert mine[-1][3] == f"batch=2/2, loss={losses[epoch - 1]:.4g}"


def test_progress_bar_every_transform_and_total_estimate():
    trainer = make_trainer()
    out = io.StringIO()
    bar = ChunkProgressBar(file=out, mininterval=0, bar_format=FORMAT, desc="train")
    bar.attach(trainer, every=2, output_transform=lambda loss: 2 * loss)
    loss = TbpttLoss()
    loss.attach(trainer, "loss")
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=3), lambda e: bar.log_message("hello|3/3|"))
    state = trainer.run([make_data(10, batch=3), make_data(5, batch=3, seed=2)], max_epochs=1)  # 3 chunks, then 2
    assert "\rhello|3/3|\n" in out.getvalue()  # on its own line; then the bar is drawn again
    lines = [f for f in frames(out) if f[0] != "hello"]
    lines = [f for i, f in enumerate(lines) if i == 0 or f != lines[i - 1]]
    assert {f[0] for f in lines} == {"train"}
    assert [(f[1], f[2]) for f in lines[:3]] == [(0, "6"), (2, "6"), (4, "5")]
    assert (lines[-1][1], lines[-1][2]) == (5, "5")
    assert lines[-1][3] == f"batch=2/2, loss={2 * state.metrics['loss']:.4g}"


class RecordingBars:
    """Stands for the tqdm class and keeps the bars it makes."""

    def __init__(self, tqdm):
        self.tqdm, self.bars = tqdm, []

    def __call__(self, *args, **kwargs):
        self.bars.append(self.tqdm(*args, **kwargs))
        return self.bars[-1]


def failing_trainer(fail_at):
    def loss_fn(y_pred, y):
        if engine.state.time_iteration == fail_at:
            raise RuntimeError("boom")
        return nn.functional.mse_loss(y_pred, y)

    model = make_model("LSTM")
    engine = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), 0.1), loss_fn, tbtt_step=K1)
    return engine


def attach_recorded_bar(trainer):
    bar = ChunkProgressBar(file=io.StringIO(), mininterval=0)
    bar._tqdm = recorder = RecordingBars(bar._tqdm)
    bar.attach(trainer)
    return bar, recorder


def test_progress_bar_closes_on_exception_and_keeps_it_raised():
    trainer = failing_trainer(fail_at=5)
    bar, recorder = attach_recorded_bar(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run(two_batches(), max_epochs=1)
    assert bar.bar is None and len(recorder.bars) == 1 and recorder.bars[0].disable  # closed
    assert recorder.bars[0].n == 4 and recorder.bars[0].total == 5  # as it stood


def test_progress_bar_leaves_exceptions_to_other_handlers():
    trainer = failing_trainer(fail_at=2)
    handled = []
    trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: handled.append(str(e)))
    bar, recorder = attach_recorded_bar(trainer)
    trainer.run(two_batches(), max_epochs=1)  # the user's handler swallows it, as without the bar
    assert handled == ["boom"] and recorder.bars[0].disable


def test_progress_bar_closes_on_terminate():
    trainer = make_trainer()
    bar, recorder = attach_recorded_bar(trainer)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED(once=2), lambda engine: engine.terminate())
    trainer.run(two_batches(), max_epochs=2)
    assert bar.bar is None and len(recorder.bars) == 1 and recorder.bars[0].disable


def test_tqdm_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    spec = importlib.util.spec_from_file_location("handlers_without_tqdm", ignite_tbptt.handlers.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing the module needs no tqdm
    module.TbpttLoss()
    with pytest.raises(ModuleNotFoundError, match="pip install tqdm"):
        module.ChunkProgressBar()
