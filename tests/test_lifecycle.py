"""The run's lifecycle (issue 28): an exception at every event the trainer fires, and in the data iterator, then
``run()`` again; a ``Checkpoint`` on every kind of event, then a resume into a fresh trainer and model.

The reference follows docs/contract.md, "Stopping and running again", and is built here from the batches an
uninterrupted run of the same configuration trained (recorded, so that shuffled data need no second code
path): a batch that an exception stopped inside trains only the chunks whose update was made, and with carried
state the stream starts afresh at the next batch; an exception anywhere else loses nothing. The reference
trainer gets those batches as plain lists, with ``reset_state`` where the stream starts afresh.
"""

import itertools

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ignite_tbptt import StreamBatches, Tbptt_Events, create_supervised_tbptt_trainer, reset_state
from tests.models import make_model

K1, K2, SEQ_LEN, EPOCHS = 2, 3, 6, 2  # three chunks a batch; windows reach back across chunk boundaries


class Boom(Exception):
    pass


# ---------------------------------------------------------------------------------------------------- the data


def stream_batches():
    """Shuffled documents of random lengths in 2 rows: batches with resets, masks and stream positions."""
    g = torch.Generator().manual_seed(5)
    docs = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (7, 5, 9, 6, 8, 15)]
    return StreamBatches(docs, batch_size=2, seq_len=SEQ_LEN, shuffle=True, seed=3)


def tensor_batches():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3 * SEQ_LEN, 3, 2, generator=g, dtype=torch.float64), torch.randn(3 * SEQ_LEN, 3, 2, generator=g, dtype=torch.float64)
    return [(x[i : i + SEQ_LEN], y[i : i + SEQ_LEN]) for i in range(0, len(x), SEQ_LEN)]


def shuffling_loader():
    """A shuffling DataLoader of (x, y) sequences, batch-first, collated into time-first batches."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, SEQ_LEN, 2, generator=g, dtype=torch.float64), torch.randn(9, SEQ_LEN, 2, generator=g, dtype=torch.float64)

    def collate(items):
        return torch.stack([i[0] for i in items], 1), torch.stack([i[1] for i in items], 1)

    return DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, collate_fn=collate)


DATA = {"tensors": tensor_batches, "StreamBatches": stream_batches, "DataLoader": shuffling_loader}
CONFIGS = [  # (data, overlap, carry_state, deterministic): each overlap mode carried and not, on each kind of data
    ("tensors", "recompute", True, False), ("tensors", "retain", False, False),
    ("StreamBatches", "retain", True, False), ("StreamBatches", "recompute", True, True),
    ("StreamBatches", "recompute", False, False),
    ("DataLoader", "retain", False, True),  # a shuffling loader resumes exactly only with deterministic=True
]


def make_trainer(config, model=None):
    """A trainer for ``config``. ``make_model`` seeds the process' generator with 0, from which the deterministic
    engine draws its seed at ``run()``: every run here gets the same seed."""
    kind, overlap, carry, deterministic = config
    model = model or make_model("GRU")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=K1, k2=K2, overlap=overlap,
                                              carry_state=carry, deterministic=deterministic)
    return model, optimizer, trainer


def with_data(config, trainer):
    data = DATA[config[0]]()
    if isinstance(data, StreamBatches):  # the documented set_epoch handler
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: data.set_epoch(engine.state.epoch - 1))
    return data


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(got, expected):
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------- the reference


_recorded = {}


def recorded_batches(config):
    """The batches an uninterrupted run of ``config`` trains, per epoch, and its final parameters."""
    if config not in _recorded:
        model, _, trainer = make_trainer(config)
        data = with_data(config, trainer)
        epochs = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs.append([]))
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: epochs[-1].append(engine.state.batch))
        trainer.run(data, max_epochs=EPOCHS)
        _recorded[config] = epochs, params_of(model)
    return _recorded[config]


def cut_batch(batch, chunks):
    """The first ``chunks`` chunks of a time-first batch (its sequence information cut alike)."""
    steps = chunks * K1
    x, y, *info = batch
    if info:
        info = [{k: v[:steps] if isinstance(v, torch.Tensor) else v for k, v in info[0].items()}]
    return (x[:steps], y[:steps], *info)


def reference_params(config, stopped_in=None, chunks_trained=0):
    """The parameters of the run whose batch ``stopped_in`` (global iteration, 1-based) trained only its first
    ``chunks_trained`` chunks, the stream starting afresh after it; ``None``: the uninterrupted run."""
    epochs, uninterrupted = recorded_batches(config)
    if stopped_in is None:
        return uninterrupted
    epoch, index = divmod(stopped_in - 1, len(epochs[0]))
    epochs = [list(e) for e in epochs]
    if chunks_trained:
        epochs[epoch][index] = cut_batch(epochs[epoch][index], chunks_trained)
        index += 1
    else:
        epochs[epoch].pop(index)
    model, _, trainer = make_trainer(config[:3] + (False,))
    running = []

    @trainer.on(Events.ITERATION_STARTED)
    def start_afresh(engine):  # where the stopped batch would have continued the stream
        if running[-1] == epoch and engine.state.iteration == index + 1:
            reset_state(engine)

    for e, batches in enumerate(epochs):  # one fresh run per epoch: the epochs' lists differ in length
        running.append(e)
        trainer.state.max_epochs = None
        trainer.run(batches, max_epochs=1)
    return params_of(model)


# ------------------------------------------------------------------------------------------------- the faults


BATCH_EVENTS = [Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED, "data", Events.ITERATION_STARTED,
                Events.ITERATION_COMPLETED]
CHUNK_EVENTS = [Tbptt_Events.TIME_ITERATION_STARTED, Tbptt_Events.GRADIENTS_COMPUTED, Tbptt_Events.TIME_ITERATION_COMPLETED]


def fault_cases(length):
    """(event, batch, chunk index) for every event: the first, a middle and the last batch of the run (the last of
    the first epoch is its middle); chunk events at the first and last chunk."""
    batches = (1, length, EPOCHS * length)
    yield Events.STARTED, None, None
    yield Events.COMPLETED, None, None
    for event, epoch in itertools.product((Events.EPOCH_STARTED, Events.EPOCH_COMPLETED), (1, EPOCHS)):
        yield event, epoch, None
    for event, batch in itertools.product(BATCH_EVENTS, batches):
        yield event, batch, None
    for event, batch, chunk in itertools.product(CHUNK_EVENTS, batches, (0, SEQ_LEN // K1 - 1)):
        yield event, batch, chunk


def expected_loss(event, batch, chunk):
    """What the documented semantics lose: (the batch stopped inside, the chunks of it that trained), or none."""
    if event in CHUNK_EVENTS:
        trained = chunk + (event == Tbptt_Events.TIME_ITERATION_COMPLETED)
        if trained < SEQ_LEN // K1:
            return batch, trained
    return None, 0


class RaisingData:
    """``data`` whose iterator raises once, when it is asked for the run's ``batch``-th batch."""

    def __init__(self, data, trainer, batch):
        self.data, self.trainer, self.batch, self.raised = data, trainer, batch, False

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for item in self.data:
            if not self.raised and self.trainer.state.iteration + 1 == self.batch:
                self.raised = True
                raise Boom("data")
            yield item


def install_fault(trainer, data, event, batch, chunk):
    """Raise once at ``event`` of ``batch`` (an epoch for epoch events; ``chunk`` for chunk events)."""
    if event == "data":
        return RaisingData(data, trainer, batch)
    raised = []

    def at_target(engine):
        state = engine.state
        if event in (Events.EPOCH_STARTED, Events.EPOCH_COMPLETED):
            hit = state.epoch == batch
        elif event in (Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED):
            hit = state.iteration + 1 == batch
        elif event in CHUNK_EVENTS:
            hit = state.iteration == batch and state.chunk.index == chunk
        else:
            hit = batch is None or state.iteration == batch
        return hit and not raised

    def boom(engine):
        if at_target(engine):
            raised.append(1)
            raise Boom(str(event))

    trainer.add_event_handler(event, boom)
    return data


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_run_again_after_an_exception_at_any_event_continues_as_documented(config):
    length = len(recorded_batches(config)[0][0])
    for event, batch, chunk in fault_cases(length):
        if event == "data" and config[0] == "DataLoader":
            continue  # a wrapper is no DataLoader: Ignite would not make its shuffling reproducible
        model, _, trainer = make_trainer(config)
        data = install_fault(trainer, with_data(config, trainer), event, batch, chunk)
        epochs_started = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs_started.append(engine.state.epoch))
        case = f"{event} at {batch}, chunk {chunk}"
        with pytest.raises(Boom):
            trainer.run(data, max_epochs=EPOCHS)
            pytest.fail(f"{case}: nothing raised")
        trainer.run(data, max_epochs=EPOCHS)
        assert (trainer.state.iteration, trainer.state.epoch) == (EPOCHS * length, EPOCHS), case
        # Every epoch starts, in order; the one that an exception stopped starts again, never one ahead.
        assert epochs_started == sorted(epochs_started) and set(epochs_started) == set(range(1, EPOCHS + 1)), case
        stopped_in, trained = expected_loss(event, batch, chunk)
        expected = reference_params(config, stopped_in, trained)
        try:
            assert_same_params(params_of(model), expected)
        except AssertionError as error:
            raise AssertionError(f"{config} {case}: {error}") from None


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_the_recorded_reference_carries_the_stream_as_one_batch(overlap):
    # The reference above is the trainer on recorded batches: anchored here, independently of how it cuts batches,
    # by the contract's "a stream fed as consecutive batches trains exactly as the same stream fed as one batch".
    config = ("tensors", overlap, True, False)
    epochs, params = recorded_batches(config)
    model, _, trainer = make_trainer(config)
    whole = [(torch.cat([b[0] for b in epochs[0]]), torch.cat([b[1] for b in epochs[0]]))]
    trainer.run(whole, max_epochs=EPOCHS)
    assert_same_params(params, params_of(model))
