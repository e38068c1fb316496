"""Corpora larger than memory: StreamBatches.from_file against the in-memory batches, the token file's checks,
laziness, prepare_corpus and the main job from a prepared corpus.

Every equality test writes documents to a token file and compares the file-backed batches, element for
element and with their sequence information, with ``StreamBatches`` built in memory from the same documents
as ``int64`` tensors.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ignite_tbptt import StreamBatches, corpus as corpus_module, demo, prepare_corpus, read_corpus
from ignite_tbptt.corpus import TokenFile

DTYPES = ["uint8", "uint16", "int32"]


def token_documents(lengths, dtype="uint16", seed=0):
    """Documents of random token ids below the dtype's range (below 250, so that every dtype holds them)."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 250, size=n).astype(dtype) for n in lengths]


def write(tmp_path, docs, dtype, separator=None, name="tokens.bin"):
    """Write the documents end to end (each followed by ``separator`` if given); return the path and offsets."""
    path = tmp_path / name
    parts = [np.append(d, np.array([separator], dtype=dtype)) if separator is not None else d for d in docs]
    np.concatenate(parts).astype(dtype).tofile(path)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    return path, offsets


def in_memory(docs, *args, **kwargs):
    return StreamBatches([torch.from_numpy(d.astype(np.int64)) for d in docs], *args, **kwargs)


def assert_same_batches(got, expected):
    got, expected = list(got), list(expected)
    assert len(got) == len(expected)
    for (x, y, info), (ex, ey, einfo) in zip(got, expected):
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert list(info) == list(einfo)
        for key, value in einfo.items():
            assert torch.equal(info[key], value) if isinstance(value, torch.Tensor) else info[key] == value, key


def epochs(batches, n):
    for epoch in range(n):
        batches.set_epoch(epoch)
        yield list(batches)


LENGTHS = [37, 5, 120, 2, 64, 19, 81, 3, 44]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(shuffle=True, seed=3),
        dict(batch_first=True),
        dict(batch_first=True, shuffle=True, seed=1),
    ],
    ids=["plain", "shuffled", "batch_first", "batch_first_shuffled"],
)
def test_file_batches_equal_the_in_memory_batches(tmp_path, dtype, kwargs):
    docs = token_documents(LENGTHS, dtype)
    path, offsets = write(tmp_path, docs, dtype)
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        shard = dict(rank=rank, world_size=world_size, **kwargs)
        from_file = StreamBatches.from_file(path, 6, 7, dtype=dtype, offsets=offsets, **shard)
        expected = in_memory(docs, 6, 7, **shard)
        assert len(from_file) == len(expected) and from_file.steps == expected.steps
        for got, want in zip(epochs(from_file, 3), epochs(expected, 3)):
            assert_same_batches(got, want)


@pytest.mark.parametrize("form", ["list", "array", "tensor", "npy"])
def test_every_form_of_offsets(tmp_path, form):
    docs = token_documents(LENGTHS)
    path, offsets = write(tmp_path, docs, "uint16")
    given_offsets = {
        "list": offsets.tolist(),
        "array": offsets.astype(np.int32),
        "tensor": torch.from_numpy(offsets),
        "npy": tmp_path / "offsets.npy",
    }[form]
    np.save(tmp_path / "offsets.npy", offsets)
    batches = StreamBatches.from_file(str(path), 4, 9, dtype="uint16", offsets=given_offsets, shuffle=True)
    assert_same_batches(batches, in_memory(docs, 4, 9, shuffle=True))


def test_a_separator_is_dropped_and_empty_runs_are_no_documents(tmp_path):
    docs = token_documents(LENGTHS, seed=2)  # ids below 250
    path, _ = write(tmp_path, docs, "uint16", separator=255)  # every document followed by one: a trailing one
    tokens = np.insert(np.fromfile(path, dtype=np.uint16), [0, 0, 43, 50], 255)  # leading, doubled, one more cut
    tokens.tofile(path)
    expected_docs = list(_split_on(tokens, 255))
    assert len(expected_docs) == len(docs) + 1
    for kwargs in (dict(), dict(shuffle=True, batch_first=True, rank=1, world_size=2)):
        batches = StreamBatches.from_file(path, 4, 6, dtype="uint16", separator=255, **kwargs)
        assert_same_batches(batches, in_memory(expected_docs, 4, 6, **kwargs))


def _split_on(tokens, separator):
    """The runs between separators, by a plain loop."""
    run = []
    for t in tokens.tolist():
        if t == separator:
            if run:
                yield np.array(run)
            run = []
        else:
            run.append(t)
    if run:
        yield np.array(run)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_boundaries_is_one_document(tmp_path, dtype):
    docs = token_documents([203], dtype)
    path, _ = write(tmp_path, docs, dtype)
    assert_same_batches(StreamBatches.from_file(path, 5, 8, dtype=dtype), in_memory(docs, 5, 8))
    assert_same_batches(StreamBatches.from_file(path, 5, 8, dtype=np.dtype(dtype)), StreamBatches(
        torch.from_numpy(docs[0].astype(np.int64)), 5, 8))


def test_start_and_stop_cut_the_documents_there(tmp_path):
    docs = token_documents(LENGTHS)
    path, offsets = write(tmp_path, docs, "uint16")
    stream = np.concatenate(docs)
    start, stop = 30, 300  # inside documents 0 and 6
    bounds = [b for b in offsets.tolist() + [len(stream)] if start < b < stop]
    expected = [stream[a:b] for a, b in zip([start] + bounds, bounds + [stop])]
    batches = StreamBatches.from_file(path, 3, 5, dtype="uint16", offsets=offsets, start=start, stop=stop, shuffle=True)
    assert_same_batches(batches, in_memory(expected, 3, 5, shuffle=True))


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=8),
    rows_per_rank=st.integers(1, 3),
    world_size=st.integers(1, 2),
    seq_len=st.integers(1, 9),
    batch_first=st.booleans(),
    shuffle=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_equal_over_random_layouts(tmp_path_factory, lengths, rows_per_rank, world_size, seq_len, batch_first,
                                   shuffle, epoch):
    batch_size = rows_per_rank * world_size
    if sum(lengths) // batch_size < 2:
        return
    docs = token_documents(lengths, "uint8", seed=len(lengths))
    path, offsets = write(tmp_path_factory.mktemp("tokens"), docs, "uint8")
    for rank in range(world_size):
        kwargs = dict(batch_first=batch_first, shuffle=shuffle, seed=epoch, rank=rank, world_size=world_size)
        from_file, expected = StreamBatches.from_file(path, batch_size, seq_len, dtype="uint8", offsets=offsets,
                                                      **kwargs), in_memory(docs, batch_size, seq_len, **kwargs)
        from_file.set_epoch(epoch)
        expected.set_epoch(epoch)
        assert_same_batches(from_file, expected)


def test_sharding_defaults_to_idist(tmp_path, monkeypatch):
    docs = token_documents(LENGTHS)
    path, offsets = write(tmp_path, docs, "uint16")
    monkeypatch.setattr("ignite.distributed.get_world_size", lambda: 2)
    monkeypatch.setattr("ignite.distributed.get_rank", lambda: 1)
    batches = StreamBatches.from_file(path, 4, 6, dtype="uint16", offsets=offsets)
    assert (batches.rank, batches.world_size, batches.batch_size) == (1, 2, 2)
    assert_same_batches(batches, in_memory(docs, 4, 6, rank=1, world_size=2))


# --------------------------------------------------------------------------------------------------------
# Lazy: an epoch is laid out without a token read; a batch reads its own tokens only.


def test_an_epoch_reads_no_token_and_a_batch_only_its_own(tmp_path, monkeypatch):
    docs = token_documents([300 + 7 * i for i in range(40)])
    path, offsets = write(tmp_path, docs, "uint16")
    batches = StreamBatches.from_file(path, 8, 16, dtype="uint16", offsets=offsets, shuffle=True)
    reads = []
    original = TokenFile.read
    monkeypatch.setattr(TokenFile, "read", lambda self, d, a, b: reads.append(b - a) or original(self, d, a, b))
    batches.set_epoch(2)
    source = batches._epoch_of(2)  # the whole epoch's layout
    assert reads == [] and batches._source.tokens._fd is None  # not a token read, the file not even opened
    assert source.layout.starts.nbytes <= 8 * (len(docs) + 1)  # the index: O(documents)
    iterator = iter(batches)
    x, y, _ = next(iterator)
    assert sum(reads) == 8 * (16 + 1)  # one batch: its rows' steps and the one target step after them
    reads.clear()
    checks = []
    monkeypatch.setattr(TokenFile, "check", lambda self: checks.append(1))
    rest = list(iterator)
    assert sum(reads) == sum(8 * (b[0].shape[0] + 1) for b in rest)
    assert len(checks) == len(rest)  # the file checked after every batch


@pytest.mark.parametrize("change", ["truncated", "rewritten at the same size", "replaced"])
def test_a_token_file_changed_under_the_job_is_a_clear_error(tmp_path, change):
    # Read through a memory map, a truncated file killed the process with SIGBUS and a rewritten one trained on
    # its new contents; read with pread, both are a ValueError before the batch trains.
    docs = token_documents([400, 300])
    path, offsets = write(tmp_path, docs, "uint16")
    batches = StreamBatches.from_file(path, 2, 10, dtype="uint16", offsets=offsets)
    iterator = iter(batches)
    next(iterator)
    if change == "truncated":
        os.truncate(path, 100)
    elif change == "replaced":  # a new file renamed over it: the open one is still whole, and still read
        write(tmp_path, token_documents([400, 300], seed=1), "uint16", name="new.bin")[0].replace(path)
    else:
        write(tmp_path, token_documents([400, 300], seed=1), "uint16")
    if change == "replaced":
        assert_same_batches([next(iterator)], list(in_memory(docs, 2, 10))[1:2])
    else:
        with pytest.raises(ValueError, match="changed under the running job"):
            next(iterator)
    with pytest.raises(ValueError, match="changed under the running job"):
        next(iter(pickle.loads(pickle.dumps(batches))))  # a copy opens the file anew and checks it too


def test_a_copy_opens_the_file_anew_rather_than_carrying_its_tokens(tmp_path):
    docs = token_documents([5000, 7000])
    path, offsets = write(tmp_path, docs, "uint16")
    batches = StreamBatches.from_file(path, 4, 10, dtype="uint16", offsets=offsets)
    next(iter(batches))  # the file is open
    saved = pickle.dumps(batches)
    assert len(saved) < 10_000  # not the 24,000 bytes of tokens
    assert_same_batches(pickle.loads(saved), batches)


# --------------------------------------------------------------------------------------------------------
# Bad input, named before anything trains.


def bad_cases(tmp_path):
    good, offsets = write(tmp_path, token_documents([20, 30]), "uint16")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 41)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([0, "x"], dtype=object), allow_pickle=True)
    return [
        (tmp_path / "missing.bin", {}, ValueError, "no such token file"),
        (empty, {}, ValueError, "is empty"),
        (odd, {}, ValueError, "has 41 bytes, not a multiple of 2 \\(uint16\\): it is truncated, or was written with another dtype"),
        (good, {"dtype": "float32"}, ValueError, "unknown dtype 'float32'"),
        (good, {"dtype": "int64"}, ValueError, "unknown dtype"),
        (good, {"offsets": [0, 30, 20]}, ValueError, r"strictly increasing .*offsets\[1\] = 30, offsets\[2\] = 20"),
        (good, {"offsets": [0, 20, 20]}, ValueError, "strictly increasing"),
        (good, {"offsets": [5, 20]}, ValueError, "offsets must start at 0"),
        (good, {"offsets": [0, 20, 50]}, ValueError, "offsets run past the file: document 2 starts at token 50, but .* holds 50 tokens"),
        (good, {"offsets": [0, 20, 70]}, ValueError, "offsets run past the file"),
        (good, {"offsets": []}, ValueError, "non-empty 1-d array"),
        (good, {"offsets": [0.0, 20.0]}, TypeError, "offsets must be integers"),
        (good, {"offsets": tmp_path / "none.npy"}, ValueError, "offsets: no such file"),
        (good, {"offsets": pickled}, ValueError, "without pickle"),
        (good, {"offsets": offsets, "separator": 0}, ValueError, "not both"),
        (good, {"separator": 70000}, ValueError, r"separator must be in \[0, 65535\]"),
        (good, {"vocab_size": 100}, ValueError, r"token id \d+ at position \d+ is outside the vocabulary \[0, 100\)"),
        (good, {"stop": 60}, ValueError, r"stop must be in \[1, 50\]"),
        (good, {"offsets": [0, 49]}, ValueError, "document 1 has 1 step"),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_input_is_named(tmp_path, case):
    path, kwargs, error, message = bad_cases(tmp_path)[case]
    kwargs = {"dtype": "uint16", **kwargs}
    with pytest.raises(error, match=message):
        StreamBatches.from_file(path, 2, 4, **kwargs)


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_token_ids_are_checked_chunk_by_chunk(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(corpus_module, "CHUNK_TOKENS", 64)  # many chunks of a small file
    tokens = np.arange(1000) % 50
    tokens[777] = 60 if dtype == "uint8" else -3
    path, _ = write(tmp_path, [tokens], dtype)
    with pytest.raises(ValueError, match=f"token id {tokens[777]} at position 777 is outside the vocabulary"):
        StreamBatches.from_file(path, 2, 4, dtype=dtype, vocab_size=50)
    StreamBatches.from_file(path, 2, 4, dtype=dtype, vocab_size=61, separator=-3 if dtype == "int32" else None)
    tokens[777] = 7
    write(tmp_path, [tokens], dtype)
    StreamBatches.from_file(path, 2, 4, dtype=dtype, vocab_size=50)


def test_a_separator_outside_the_vocabulary_is_not_a_bad_token(tmp_path):
    path, _ = write(tmp_path, token_documents([10, 12]), "uint16", separator=65535)
    assert len(StreamBatches.from_file(path, 2, 4, dtype="uint16", separator=65535, vocab_size=250)._source.lengths) == 2


# --------------------------------------------------------------------------------------------------------
# Preparing a corpus, and the main job from one.


def test_prepare_corpus_writes_the_demos_encoding(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 7)  # files read in many chunks
    texts = ["the quick brown fox\r\njumps", "över the lazy dög 🦊"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(text.encode("utf-8"))
    prepared = prepare_corpus([paths[0], texts[1]], tmp_path / "corpus")
    read_back = [p.read_text(encoding="utf-8", errors="replace") for p in paths]  # as the demo reads --text
    encoded = demo.encode(read_back, held_out=0.0)
    assert prepared.vocab == encoded.vocab
    tokens = np.fromfile(prepared.tokens_path, dtype=prepared.dtype)
    assert tokens.tolist() == torch.cat(encoded.train).tolist()
    assert np.load(prepared.offsets_path, allow_pickle=False).tolist() == [0, len(read_back[0])]
    meta = json.loads((tmp_path / "corpus" / "vocab.json").read_text(encoding="utf-8"))
    assert meta == {"vocab": encoded.vocab, "vocab_size": len(encoded.vocab), "dtype": "uint8",
                    "tokens": len(tokens), "documents": 2}
    assert read_corpus(tmp_path / "corpus") == prepared


@pytest.mark.parametrize("distinct,dtype", [(256, "uint8"), (257, "uint16"), (65536, "uint16"), (65537, "int32")])
def test_the_smallest_dtype_that_holds_the_vocabulary(tmp_path, distinct, dtype):
    chars = [chr(c) for c in range(0x10FFFF) if not 0xD800 <= c < 0xE000][:distinct]
    prepared = prepare_corpus(["".join(chars)], tmp_path)
    assert prepared.dtype == dtype
    assert np.fromfile(prepared.tokens_path, dtype=dtype).tolist() == list(range(distinct))


def test_prepare_and_read_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no such text file"):
        prepare_corpus([Path(tmp_path / "missing.txt")], tmp_path / "out")
    with pytest.raises(ValueError, match="text 1 has 1 character"):
        prepare_corpus(["abc", "x"], tmp_path / "out")
    with pytest.raises(TypeError, match="a list of texts"):
        prepare_corpus("abc", tmp_path / "out")
    with pytest.raises(ValueError, match="not a prepared corpus: no vocab.json"):
        read_corpus(tmp_path)
    prepare_corpus(["abc"], tmp_path / "out")
    (tmp_path / "out" / "vocab.json").write_text('{"vocab": ["a"], "dtype": "uint8"}')
    with pytest.raises(ValueError, match="is not a corpus vocabulary"):
        read_corpus(tmp_path / "out")


TOY = ["--epochs", "1", "--hidden", "16", "--seq-len", "20", "--batch-size", "4", "--k1", "5", "--k2", "8",
       "--no-progress"]


@pytest.mark.usefixtures("one_thread")
def test_the_main_job_from_a_prepared_corpus_trains_as_from_its_text(tmp_path, capsys):
    """prepare, then --corpus: the same batches and held-out part as --text, so the same parameters."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    second.write_text("Pack my box with five dozen liquor jugs! " * 25)
    assert demo.main(["prepare", "--text", str(first), str(second), "--out", str(tmp_path / "corpus")]) == 0
    assert "prepared" in capsys.readouterr().out
    from_corpus, from_text = tmp_path / "corpus.pt", tmp_path / "text.pt"
    assert demo.main(["--corpus", str(tmp_path / "corpus"), "--shuffle", "--save", str(from_corpus)] + TOY) == 0
    out = capsys.readouterr().out
    assert "in 2 document(s), vocabulary 30" in out and "result: train" in out
    assert demo.main(["--text", str(first), str(second), "--shuffle", "--save", str(from_text)] + TOY) == 0
    assert out.splitlines()[:2] == capsys.readouterr().out.splitlines()[:2]  # the same corpus line and losses
    for name, value in torch.load(from_text)["state_dict"].items():
        assert torch.equal(torch.load(from_corpus)["state_dict"][name], value), name


def test_the_file_split_is_the_text_split(tmp_path):
    prepared = corpus_module.PreparedCorpus(tmp_path, ["a"], "uint8", 22, 3)
    offsets = [0, 5, 8]
    np.save(prepared.offsets_path, np.array(offsets))
    docs = [torch.arange(a, b) for a, b in zip(offsets, offsets[1:] + [22])]
    for held_out in (0.05, 0.3, 0.5, 0.66, 0.7, 0.75):
        at = int(22 * (1 - held_out))
        before, after = demo.split_stream(docs, at)
        split = demo.split_file(prepared, held_out)
        assert split.stop == (int(before[-1][-1]) + 1 if before else 0)
        assert split.start == int(after[0][0])
        assert split.documents == len(before)
        assert split.characters == sum(map(len, before)) + sum(map(len, after))


@pytest.mark.parametrize(
    "args,message",
    [
        (["prepare", "--text", "/no/such.txt", "--out", "x"], "no such text file"),
        (["prepare", "--out", "x"], "--text"),
        (["--corpus", "/no/such/corpus"], "not a prepared corpus"),
        (["--corpus", "x", "--text", "y"], "not allowed with argument"),
    ],
)
def test_bad_corpus_command_lines(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(demo.main(args))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
