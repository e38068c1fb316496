"""StreamBatches: the layout, shuffling and sharding of aligned streams, and the trainer's stream guard.

The layout is checked against brute-force constructions written here from the issue's definition: every
token carries a unique value (document * 1000 + step), so where each one lands can be read off the batches.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn
from torch.utils.data import DataLoader

from ignite_tbptt import StreamBatches, create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer, reset_state
from tests.models import make_model
from tests.reference import reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory, batches_trajectory

FORMS = ["tensor", "documents", "pairs"]


def documents(lengths, form):
    """Data of the given form whose every step is unique: value ``1000 * document + step``."""
    docs = [torch.arange(len_) + 1000 * d for d, len_ in enumerate(lengths)]
    if form == "tensor":
        return torch.cat(docs), [torch.cat(docs)]
    if form == "documents":
        return docs, docs
    return [(d, -d) for d in docs], docs  # aligned targets: the negated input


# --------------------------------------------------------------------------------------------------------
# The word-language-model example, as its README and main.py define batching (written here from them).


def wlm_batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def wlm_batches(source, bptt):
    for i in range(0, source.size(0) - 1, bptt):
        seq_len = min(bptt, len(source) - 1 - i)
        yield source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]


@pytest.mark.parametrize("n,batch_size,seq_len", [(100, 4, 7), (101, 4, 5), (64, 8, 7), (30, 3, 100), (9, 4, 1)])
def test_a_single_stream_gives_the_word_language_model_batches(n, batch_size, seq_len):
    tokens = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n))
    expected = list(wlm_batches(wlm_batchify(tokens, batch_size), seq_len))
    got = list(StreamBatches(tokens, batch_size, seq_len))
    assert len(got) == len(expected) == len(StreamBatches(tokens, batch_size, seq_len))
    for (x, y, info), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert set(got[0][2]) == {"position", "dim", "resets"} and all(set(b[2]) == {"position", "dim"} for b in got[1:])


# --------------------------------------------------------------------------------------------------------
# Properties of the layout, for every data form.


def rows_of(batches, batch_first=False):
    """Concatenate the batches along time: inputs, targets, resets and validity as ``(steps, rows)``."""
    xs, ys, resets, valid = [], [], [], []
    for x, y, info in batches:
        if batch_first:
            x, y = x.t(), y.t()
        xs.append(x)
        ys.append(y)
        shape = x.shape[:2]
        for out, key, default in ((resets, "resets", False), (valid, "mask", True)):
            mark = info.get(key, torch.full(shape, default) if not batch_first else torch.full(shape[::-1], default))
            out.append(mark.t() if batch_first else mark)
    return torch.cat(xs), torch.cat(ys), torch.cat(resets), torch.cat(valid)


def check_layout(lengths, form, batch_size, seq_len, world_size, batch_first, shuffle, seed, epoch):
    data, docs = documents(lengths, form)
    shards = []
    for rank in range(world_size):
        batches = StreamBatches(data, batch_size, seq_len, batch_first=batch_first, shuffle=shuffle, seed=seed,
                                rank=rank, world_size=world_size)
        batches.set_epoch(epoch)
        listed = list(batches)
        assert len(listed) == len(batches) == -(-batches.steps // seq_len)  # the same on every rank
        assert [b[2]["position"] for b in listed] == list(range(0, batches.steps, seq_len))
        assert all(b[0].shape[1 if batch_first else 0] <= seq_len for b in listed)
        shards.append(rows_of(listed, batch_first))
        order = batches.order(epoch)
    x, y, resets, valid = (torch.cat(parts, 1) for parts in zip(*shards))  # the ranks' rows side by side
    assert x.shape[1] == batch_size
    next_step = form != "pairs"
    # The epoch's stream: documents in the epoch's order, end to end; the tail that does not fill a row dropped.
    stream = torch.cat([docs[i] for i in order])
    n = len(stream) // batch_size
    assert len(stream) - n * batch_size < batch_size
    row_tokens = torch.cat([x, y[-1:]]) if next_step else x  # a row's last token appears only as a target
    assert torch.equal(row_tokens.t().reshape(-1), stream[: n * batch_size])  # nothing lost, repeated or moved
    if not next_step:
        assert torch.equal(y, -x)
    # Resets fall exactly at document starts; rejoining each row between resets gives document pieces in order.
    doc_of, step_of = x // 1000, x % 1000
    assert torch.equal(resets, step_of == 0)
    for j in range(batch_size):
        cuts = [0] + resets[:, j].nonzero().flatten().tolist()[int(bool(resets[0, j])):] + [len(x)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = row_tokens[a : b + (next_step and b == len(x)), j]
            doc = int(piece[0]) // 1000
            start = int(piece[0]) % 1000
            assert torch.equal(piece[piece // 1000 == doc], docs[doc][start : start + int((piece // 1000 == doc).sum())])
    # With next-step targets, exactly the pairs that cross two documents are masked.
    expected_valid = (y // 1000 == doc_of) if next_step else torch.ones_like(valid)
    assert torch.equal(valid, expected_valid)
    return x


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    form=st.sampled_from(FORMS),
    rows_per_rank=st.integers(1, 3),
    world_size=st.integers(1, 3),
    seq_len=st.integers(1, 9),
    batch_first=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_layout_properties(lengths, form, rows_per_rank, world_size, seq_len, batch_first, shuffle, seed, epoch):
    batch_size = rows_per_rank * world_size
    if form != "pairs":  # next-step targets need 2 steps per document; aligned pairs 1
        lengths = [max(2, len_) for len_ in lengths]
    if form == "tensor":
        lengths = [sum(lengths)]
    if sum(lengths) // batch_size < 2:
        return
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, batch_first=batch_first, shuffle=shuffle, seed=seed,
                  epoch=epoch)
    sharded = check_layout(lengths, form, world_size=world_size, **kwargs)
    alone = check_layout(lengths, form, world_size=1, **kwargs)
    assert torch.equal(sharded, alone)  # the shards together are the rows of one process


def test_seed_and_epoch_determine_the_order_and_shuffling_keeps_documents_whole():
    data, docs = documents([5 + i for i in range(12)], "documents")

    def epoch_rows(seed, epoch):
        batches = StreamBatches(data, 3, 4, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return batches.order(epoch), rows_of(batches)[0]

    order, rows = epoch_rows(1, 2)
    again_order, again_rows = epoch_rows(1, 2)
    assert order == again_order and torch.equal(rows, again_rows)
    orders = {tuple(epoch_rows(seed, epoch)[0]) for seed in range(3) for epoch in range(3)}
    assert len(orders) == 9 and all(sorted(o) == list(range(12)) for o in orders)
    unshuffled = StreamBatches(data, 3, 4)
    assert unshuffled.order(5) == list(range(12))


def test_an_epoch_builds_one_copy_and_batches_are_views():
    tokens = torch.arange(1000)
    batches = StreamBatches(tokens, 4, 10)
    x0, y0, _ = next(iter(batches))
    x1, y1, _ = next(iter(batches))
    assert x0.data_ptr() == x1.data_ptr()  # the same layout for a second pass, not a new copy
    assert x0.untyped_storage().data_ptr() == y0.untyped_storage().data_ptr()  # targets share the inputs' copy
    assert x0.untyped_storage().nbytes() == 1000 * 8
    shuffled = StreamBatches([tokens[:500], tokens[500:]], 4, 10, shuffle=True)
    first = next(iter(shuffled))[0].untyped_storage()
    shuffled.set_epoch(1)
    assert next(iter(shuffled))[0].untyped_storage().data_ptr() != first.data_ptr()


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        (([], 2, 4), {}, ValueError, "data is empty"),
        (([torch.arange(5), torch.arange(1)], 1, 4), {}, ValueError, "document 1 has 1 step"),
        (([(torch.zeros(3), torch.zeros(2))], 1, 4), {}, ValueError, "x and y of document 0 must have the same length"),
        (([(torch.zeros(3), torch.zeros(3)), (torch.zeros(0), torch.zeros(0))], 1, 4), {}, ValueError,
         "document 1 is empty"),
        (([torch.arange(5), [1, 2]], 1, 4), {}, TypeError, "document 1 must be a tensor"),
        (([(torch.zeros(3), torch.zeros(3)), torch.zeros(3)], 1, 2), {}, TypeError, r"document 1 must be an \(x, y\)"),
        (("text", 1, 4), {}, TypeError, "data must be a tensor"),
        ((torch.tensor(3), 1, 4), {}, ValueError, "0-d tensor"),
        ((torch.arange(10), 0, 4), {}, ValueError, "batch_size must be >= 1"),
        ((torch.arange(10), 2, 0), {}, ValueError, "seq_len must be >= 1"),
        ((torch.arange(10), 2.0, 4), {}, TypeError, "batch_size must be an int"),
        ((torch.arange(10), 6, 4), {}, ValueError, "10 steps cannot fill 6 rows"),
        ((torch.arange(100), 6, 4), {"world_size": 4, "rank": 0}, ValueError, "divisible by the world size"),
        ((torch.arange(100), 4, 4), {"world_size": 2, "rank": 2}, ValueError, r"rank must be an int in \[0, 2\)"),
        (([torch.zeros(5, 2), torch.zeros(5, 3)], 1, 4), {}, ValueError, "x of document 1 has shape"),
    ],
)
def test_bad_input_is_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        StreamBatches(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# With the trainer: exact against the step-by-step reference, and the stream guard.


def series_documents(lengths, form, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randn(len_, 2, generator=g, dtype=torch.float64) for len_ in lengths]
    return docs if form == "documents" else [(d, torch.randn(len(d), 2, generator=g, dtype=torch.float64)) for d in docs]


def whole_epoch(data, batch_size):
    """The epoch's rows built step by step from the definition: inputs, targets, validity and resets."""
    paired = isinstance(data[0], tuple)
    stream = []  # (input, target, starts a document) per step, the documents end to end
    for doc in data:
        xs, ys = doc if paired else (doc, doc)
        stream += [(xs[t], ys[t], t == 0) for t in range(len(xs))]
    n = len(stream) // batch_size
    rows = [stream[j * n : (j + 1) * n] for j in range(batch_size)]
    if paired:
        rows = [[(a[0], a[1], True, a[2]) for a in row] for row in rows]
    else:  # the next step is the target, within a row; a pair across two documents is not valid
        rows = [[(a[0], b[0], not b[2], a[2]) for a, b in zip(row[:-1], row[1:])] for row in rows]
    x = torch.stack([torch.stack([s[0] for s in row]) for row in rows], 1)
    y = torch.stack([torch.stack([s[1] for s in row]) for row in rows], 1)
    valid = torch.tensor([[s[2] for s in row] for row in rows]).t()
    resets = torch.tensor([[s[3] for s in row] for row in rows]).t()
    return x, y, valid, resets


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize(
    "form,lengths,batch_size,seq_len,k1,k2",
    [
        ("documents", [7, 12, 5, 9, 15], 3, 6, 3, 5),
        ("documents", [30, 4, 11], 2, 4, 2, 7),
        ("pairs", [6, 10, 3, 13], 2, 6, 3, 3),
        ("pairs", [9, 9, 9], 3, 3, 1, 4),
    ],
)
def test_carried_state_over_stream_batches_matches_the_reference(form, lengths, batch_size, seq_len, k1, k2, overlap):
    data = series_documents(lengths, form)
    x, y, valid, resets = whole_epoch(data, batch_size)
    expected = reference_trajectory(make_model("GRU"), x, y, k1, k2, overlap, LR, nn.MSELoss(), valid=valid,
                                    resets=resets)
    batches = StreamBatches(data, batch_size, seq_len)
    assert sum(b[0].shape[0] for b in batches) == x.shape[0]
    got = batches_trajectory(make_model("GRU"), batches, k1, k2, overlap, carry_state=True)
    assert_same_trajectory(got, expected)
    # The same rows as one batch train the same way (docs/contract.md, "Carried state").
    info = {"mask": valid, "resets": resets}
    assert_same_trajectory(batches_trajectory(make_model("GRU"), [(x, y, info)], k1, k2, overlap), expected)


def trainer_on(model, **kwargs):
    return create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), tbtt_step=3, k2=5, carry_state=True, **kwargs
    )


@pytest.mark.parametrize("fault", ["skipped", "repeated", "reordered"])
def test_a_batch_that_does_not_continue_the_stream_is_refused_before_any_update(fault):
    batches = list(StreamBatches(series_documents([40, 30], "documents"), 2, 6))
    feed = {"skipped": [0, 1, 3], "repeated": [0, 1, 1], "reordered": [0, 2, 1]}[fault]
    model = make_model("GRU")
    trainer = trainer_on(model)
    snapshot = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def keep(_):
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})

    stands = 6 if fault == "reordered" else 12  # where the refused batch should have started
    with pytest.raises(ValueError, match=rf"this batch starts at step \d+ of its stream, but the carried state stands at step {stands}"):
        trainer.run([batches[i] for i in feed])
    for n, p in model.named_parameters():
        assert torch.equal(p, snapshot[n])  # nothing of the refused batch ran
    # After a reset the stream may start anywhere; without carried state nothing is checked.
    trainer = trainer_on(make_model("GRU"))
    refused = 2 if fault == "reordered" else 3
    trainer.add_event_handler(Events.ITERATION_STARTED(event_filter=lambda _, i: i >= refused), reset_state)
    trainer.run([batches[i] for i in feed])
    create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), tbtt_step=3
    ).run([batches[i] for i in feed])


def test_the_evaluator_guards_its_stream_too():
    batches = list(StreamBatches(series_documents([40, 30], "documents"), 2, 6))
    evaluator = create_supervised_tbptt_evaluator(make_model("GRU"), tbtt_step=3, carry_state=True)
    evaluator.run(batches)
    with pytest.raises(ValueError, match="does not continue|carried state stands at step"):
        evaluator.run([batches[0], batches[2]])


def test_a_longer_epoch_than_the_data_is_refused():
    # Ignite restarts the data iterator mid-epoch: the stream would jump back to its start with the state carried.
    batches = StreamBatches(series_documents([40], "documents"), 2, 6)
    with pytest.raises(ValueError, match="starts at step 0 of its stream, but the carried state stands at step 19"):
        trainer_on(make_model("GRU")).run(batches, epoch_length=len(batches) + 1)


def test_a_shuffling_dataloader_with_carried_state_warns():
    x = torch.randn(8, 20, 2, dtype=torch.float64)
    data = DataLoader(list(zip(x, x)), batch_size=2, shuffle=True)
    with pytest.warns(UserWarning, match="DataLoader's RandomSampler shuffles"):
        trainer_on(make_model("GRU", batch_first=True), dim=1).run(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_on(make_model("GRU", batch_first=True), dim=1).run(DataLoader(list(zip(x, x)), batch_size=2))


def shuffled_run(tmp_path, resume_from=None):
    batches = StreamBatches(series_documents([7, 12, 5, 9, 15, 8, 11], "documents"), 2, 6, shuffle=True, seed=4)
    model = make_model("LSTM")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, nn.MSELoss(), tbtt_step=3, k2=5, carry_state=True, deterministic=True
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: batches.set_epoch(engine.state.epoch - 1))
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
    if resume_from is None:
        saver = DiskSaver(str(tmp_path), require_empty=False)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, Checkpoint(to_save, saver, n_saved=None))
    else:
        Checkpoint.load_objects(to_save, torch.load(resume_from, weights_only=False))
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch[0].sum().item()))
    trainer.run(batches, max_epochs=3)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, seen


def test_a_run_resumed_mid_epoch_sees_the_same_batches(tmp_path):
    uninterrupted, seen = shuffled_run(tmp_path)
    per_epoch = len(seen) // 3
    assert seen[:per_epoch] != seen[per_epoch : 2 * per_epoch]  # the epochs have different orders
    path = tmp_path / f"checkpoint_{per_epoch + 2}.pt"  # mid-way through the second epoch
    resumed, resumed_seen = shuffled_run(tmp_path, resume_from=path)
    assert resumed_seen == seen[per_epoch + 2 :]
    for n in uninterrupted:
        torch.testing.assert_close(resumed[n], uninterrupted[n], rtol=0, atol=1e-12, msg=n)
