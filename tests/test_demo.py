"""The main job's command line: a tiny real run, and clear errors for bad input."""

import re

import pytest
import torch

from ignite_tbptt import demo

TOY = ["--epochs", "1", "--hidden", "16", "--seq-len", "20", "--batch-size", "4", "--k1", "5", "--no-progress"]


def two_documents(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    second.write_text("Pack my box with five dozen liquor jugs! " * 25)
    return ["--text", str(first), str(second)]


def test_tiny_run_prints_a_result_line(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["--text", str(text), "--epochs", "1", "--hidden", "16", "--seq-len", "20", "--batch-size", "4",
            "--k1", "5", "--k2", "8", "--overlap", "retain"]
    assert demo.main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "result: train" in out and "validation" in out and "tokens/s" in out and "sample: " in out
    assert "chunk" in captured.err and "loss=" in captured.err  # the per-chunk progress bar
    assert demo.main(args + ["--no-progress"]) == 0
    assert "loss=" not in capsys.readouterr().err


def test_random_chunk_lengths_in_the_main_job(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    assert demo.main(["--text", str(text), "--bptt-random"] + TOY) == 0
    assert "TBPTT(k1=5 random, k2=5, recompute)" in capsys.readouterr().out


def test_unbiased_truncation_in_the_main_job(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    assert demo.main(["--text", str(text), "--artbp", "0.5", "--artbp-cap", "3"] + TOY) == 0
    assert "k2=ARTBP(p=0.5, cap=3, seed=0), recompute)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--text", "/no/such/file.txt"], "--text: no such text file: /no/such/file.txt"),
        (["--artbp", "1.0"], r"--artbp: ARTBP: p must be a probability in \[0, 1\)"),
        (["--artbp", "0.5", "--k2", "50"], "not both"),
        (["--artbp-cap", "4"], "--artbp-cap needs --artbp"),
        (["--artbp", "0.5", "--artbp-cap", "0"], "cap must be >= 1"),
        (["--k1", "0"], "--k1 must be >= 1"),
        (["--k1", "5", "--k2", "3"], r"--k2 \(3\) must be >= --k1 \(5\)"),
        (["--overlap", "keep"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
        (["--batch-size", "3", "--nproc", "2"], r"--batch-size \(3\) must be divisible by the number of processes \(2\)"),
        (["--nproc", "0"], "--nproc must be >= 1"),
    ],
)
def test_bad_input_exits_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = demo.main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_empty_text_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert demo.main(["--text", str(empty)]) == 2
    assert "need at least 1000 characters" in capsys.readouterr().err


def test_files_are_documents_and_the_run_matches_on_two_processes(tmp_path, capsys):
    """The main job on 2 gloo processes (2 rows each) ends with the parameters of 1 process on all 4 rows."""
    text = two_documents(tmp_path)
    alone, pair = tmp_path / "alone.pt", tmp_path / "pair.pt"
    assert demo.main(text + TOY + ["--k2", "8", "--save", str(alone)]) == 0
    assert "in 2 document(s)" in capsys.readouterr().out
    assert demo.main(text + TOY + ["--k2", "8", "--save", str(pair), "--nproc", "2"]) == 0
    alone, pair = torch.load(alone)["state_dict"], torch.load(pair)["state_dict"]
    for name, value in alone.items():
        torch.testing.assert_close(pair[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_split_stream_cuts_the_documents_at_a_stream_position():
    docs = [torch.arange(5), torch.arange(10, 13), torch.arange(20, 26)]
    before, after = demo.split_stream(docs, 6)
    assert [d.tolist() for d in before] == [[0, 1, 2, 3, 4]]  # the 1-token piece of the 2nd is dropped
    assert [d.tolist() for d in after] == [[11, 12], [20, 21, 22, 23, 24, 25]]


# ---------------------------------------------------------------- from training to text: save, score, sample


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("saved")
    path = tmp_path / "model.pt"
    assert demo.main(two_documents(tmp_path) + TOY + ["--save", str(path)]) == 0
    return path


def test_save_writes_one_file_that_loads_safely_into_the_model(saved_model):
    saved = torch.load(saved_model, weights_only=True)  # tensors, strings and ints only: nothing is unpickled
    assert saved["format"] == demo.SAVED_FORMAT and saved["settings"]["hidden_size"] == 16
    model, vocab = demo.load_model(str(saved_model))
    assert vocab == saved["vocab"] and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["state_dict"].items())


def test_score_prints_the_bits_per_character_of_each_file_with_the_state_carried(saved_model, tmp_path, capsys):
    text = tmp_path / "score.txt"
    text.write_text("the lazy dog jumps over the quick brown fox. " * 12)
    assert demo.main(["score", "--load", str(saved_model), "--text", str(text), str(text), "--chunk", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = float(re.search(r": ([0-9.]+) bits/char", lines[0]).group(1))
    model, vocab = demo.load_model(str(saved_model))
    ids = demo.encode_text(text.read_text(), vocab)
    with torch.no_grad():  # one pass over the whole text: what carrying the state across chunks must give
        y_pred, _ = model(ids[:-1].view(-1, 1))
        expected = torch.nn.functional.cross_entropy(y_pred.view(-1, len(vocab)), ids[1:]).item() * demo.LOG2E
    assert got == pytest.approx(expected, abs=1e-3) and lines[2].startswith("all: ")


def test_sample_continues_the_prompt_and_the_same_seed_gives_the_same_text(saved_model, capsys):
    args = ["sample", "--load", str(saved_model), "--prompt", "the quick ", "--length", "40", "--temperature", "0.8"]
    texts = []
    for seed in ("1", "1", "2"):
        assert demo.main(args + ["--seed", seed]) == 0
        texts.append(capsys.readouterr().out.rstrip("\n"))
    assert texts[0] == texts[1] != texts[2]
    assert all(t.startswith("the quick ") and len(t) == len("the quick ") + 40 for t in texts)


def test_sampling_continues_from_the_state_of_the_prompt(saved_model):
    model, vocab = demo.load_model(str(saved_model))
    ids = demo.encode_text("the quick brown ", vocab)
    _, logits, hidden = demo.read_text(model, ids, chunk=3, scored=False)
    with torch.no_grad():
        y_pred, whole = model(ids.view(-1, 1))
    torch.testing.assert_close(logits, y_pred[-1, 0])
    torch.testing.assert_close(hidden, whole)


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--prompt", "the é"], r"1 character\(s\) of the text are not in the model's vocabulary.*'é'"),
        (["sample", "--prompt", "the", "--temperature", "0"], "--temperature must be > 0"),
        (["sample", "--prompt", "é", "--skip-unknown"], "at least one character"),
        (["score", "--text", "/no/such/file.txt"], "--text: no such text file"),
    ],
)
def test_bad_input_to_score_and_sample_is_named(saved_model, args, message, capsys):
    assert demo.main(args[:1] + ["--load", str(saved_model)] + args[1:]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_file_that_is_not_a_saved_model_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(1, 1).state_dict(), path)
    assert demo.main(["sample", "--load", str(path), "--prompt", "a"]) == 2
    assert "is not a model saved by --save" in capsys.readouterr().err
