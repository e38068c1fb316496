"""The trainer forces at most one device-to-host sync per batch: none per chunk.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...) or
running an op whose output size depends on the data (``nonzero``, ``masked_select``, ...) waits for the
device. These tests run on the CPU, so they count the calls that would sync instead of timing them:

- a ``TorchDispatchMode`` sees every aten op, also inside other torch functions and in the backward pass,
  and counts ``_local_scalar_dense`` (what ``item``, ``bool``, ``float`` and ``int`` run) and the ops with
  data-dependent output sizes;
- a ``TorchFunctionMode`` counts the Python-level reads that dispatch no aten op (``tolist``, ``numpy``,
  ``cpu``, and ``to`` the CPU from another device).

The default trainer reads the batch loss once (its ``output_transform`` calls ``loss.item()``). The second
half of the file shows that the check fails when a per-chunk read creeps in.
"""

import inspect
import traceback

import pytest
import torch
from ignite.contrib.engines import create_supervised_tbptt_trainer as ignite_trainer
from ignite.engine import Events
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ignite_tbptt.trainer
from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import CellNet, SeqNet

# aten ops that read a value on the host or size their output by the data
SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "repeat_interleave"}
# Python-level reads that dispatch no aten op
HOST_METHODS = {"tolist", "numpy", "cpu", "__array__"}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _where() -> str:
    """The innermost caller outside torch, for the failure message."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and __file__ != frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
    return "?"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.events.append((f"aten.{func.overloadpacket.__name__}", _where()))
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    """``t.to(cpu)`` for a tensor that is not on the CPU: a copy to the host. Device-generic code such as
    ``clip_grad_norm_`` calls ``norm.to(first_device)``, which is no sync where the device is the GPU."""
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    targets = list(args[1:]) + [kwargs.get("device")]
    to_cpu = any(isinstance(t, (str, torch.device)) and torch.device(t) == CPU for t in targets if t is not None)
    return to_cpu and source is not None and source.device != CPU


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS or (name == "to" and _to_host(args, kwargs)):
            self.events.append((f"Tensor.{name}", _where()))
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager recording every host-sync call as ``(what, where)`` in ``self.events``."""

    def __init__(self):
        self.events = []
        self._modes = [_FunctionCounter(self.events), _DispatchCounter(self.events)]

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def syncs_per_batch(trainer, batches, max_epochs=1):
    """Run ``trainer`` under a :class:`SyncCounter`; return the sync events of every batch."""
    per_batch, counter = [], SyncCounter()
    mark = []

    @trainer.on(Events.ITERATION_STARTED)
    def start(_):
        mark.append(len(counter.events))

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop(_):
        per_batch.append(counter.events[mark.pop():])

    with counter:
        trainer.run(batches, max_epochs=max_epochs)
    assert len(per_batch) == len(batches) * max_epochs
    return per_batch


def assert_at_most_one_sync_per_batch(per_batch):
    worst = max(per_batch, key=len)
    assert len(worst) <= 1, f"{len(worst)} host syncs in one batch (at most 1 allowed): {worst}"


def make_batches(n_in, n_out, T=12, batch=2, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, batch, n_in, generator=g), torch.randn(T, batch, n_out, generator=g)) for _ in range(count)]


def make(kind="LSTM"):
    torch.manual_seed(0)
    return CellNet() if kind == "cell" else SeqNet(kind)


def tbptt_trainer(model, k1=3, k2=None, **kwargs):
    return create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=k1, k2=k2, **kwargs
    )


@pytest.mark.parametrize("carry_state", [False, True])
@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("k2", [3, 5])
@pytest.mark.parametrize("kind", ["LSTM", "cell"])
def test_one_sync_per_batch(kind, k2, overlap, carry_state):
    per_batch = syncs_per_batch(
        tbptt_trainer(make(kind), k2=k2, overlap=overlap, carry_state=carry_state), make_batches(2, 2)
    )
    assert_at_most_one_sync_per_batch(per_batch)
    # and the one there is, is the default output_transform's loss.item()
    assert all(len(events) == 1 and events[0][0] == "aten._local_scalar_dense" for events in per_batch), per_batch


OPTIONS = [dict(checkpoint_every=2), dict(clip_grad_norm=1.0), dict(gradient_accumulation_steps=2)]


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda kw: ",".join(kw))
def test_one_sync_per_batch_with_options(options, overlap):
    known = inspect.signature(create_supervised_tbptt_trainer).parameters
    if not set(options) <= set(known):
        pytest.skip(f"the trainer has no {sorted(set(options) - set(known))}")
    per_batch = syncs_per_batch(tbptt_trainer(make(), k2=5, overlap=overlap, **options), make_batches(2, 2))
    assert_at_most_one_sync_per_batch(per_batch)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("options", [{}, dict(clip_grad_norm=1.0), dict(gradient_accumulation_steps=2)],
                         ids=["plain", "clip", "accumulate"])
def test_skip_nonfinite_reads_once_per_update(options, overlap):
    trainer = tbptt_trainer(make(), k2=5, overlap=overlap, skip_nonfinite=True, **options)
    updates = 4 // options.get("gradient_accumulation_steps", 1)  # 12 steps, k1 = 3
    for events in syncs_per_batch(trainer, make_batches(2, 2)):
        assert len(events) == updates + 1, events  # one per update, and the batch loss
        assert all(what == "aten._local_scalar_dense" for what, _ in events), events


def test_no_sync_at_all_without_reading_the_loss():
    trainer = tbptt_trainer(make(), k2=5, overlap="retain", output_transform=lambda x, y, y_pred, loss: loss)
    assert all(events == [] for events in syncs_per_batch(trainer, make_batches(2, 2)))


# --- the check can fail: each of these adds a host read per chunk -----------------------------------------


def _item_per_chunk_loss(y_pred, y):
    loss = nn.functional.mse_loss(y_pred, y)
    loss.item()
    return loss


def _tolist_per_chunk_loss(y_pred, y):
    loss = nn.functional.mse_loss(y_pred, y)
    loss.tolist()
    return loss


def _bool_in_detach(monkeypatch):
    detach = ignite_tbptt.trainer._detach_hidden

    def checking_detach(hidden):
        assert bool(torch.isfinite(torch.as_tensor(0.0)).all())  # a typical "sanity check" with a host read
        return detach(hidden)

    monkeypatch.setattr(ignite_tbptt.trainer, "_detach_hidden", checking_detach)


INJECTIONS = {  # name: (overlap mode, trainer changes)
    "loss_fn calls item": ("recompute", lambda mp: dict(loss_fn=_item_per_chunk_loss)),
    "loss_fn calls tolist": ("retain", lambda mp: dict(loss_fn=_tolist_per_chunk_loss)),
    "chunk handler calls float": ("retain", lambda mp: dict(chunk_handler=lambda engine: float(engine.state.output))),
    "patched _detach_hidden calls bool": ("recompute", lambda mp: (_bool_in_detach(mp), {})[1]),
}


@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_check_fails_on_a_per_chunk_sync(injection, monkeypatch):
    overlap, inject = INJECTIONS[injection]
    spec = inject(monkeypatch)
    model = make()
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), spec.get("loss_fn", nn.MSELoss()), tbtt_step=3, k2=5,
        overlap=overlap,
    )
    if "chunk_handler" in spec:
        trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, spec["chunk_handler"])
    per_batch = syncs_per_batch(trainer, make_batches(2, 2))
    assert min(len(events) for events in per_batch) >= 4  # 4 chunks of 3 steps per batch
    with pytest.raises(AssertionError, match="host syncs in one batch"):
        assert_at_most_one_sync_per_batch(per_batch)


def test_check_fails_on_ignites_trainer():
    """Ignite's own trainer reads every chunk's loss twice with ``.item()``: 8 syncs per batch of 4 chunks."""
    model = make()
    trainer = ignite_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=3)
    per_batch = syncs_per_batch(trainer, make_batches(2, 2))
    assert [len(events) for events in per_batch] == [8, 8, 8]
    with pytest.raises(AssertionError, match="8 host syncs in one batch"):
        assert_at_most_one_sync_per_batch(per_batch)
