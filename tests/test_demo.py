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
    assert "result: train" in out and "validation" in out and "tokens/s" in out and "sample: The " in out
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
        (["--text", "/no/such/file.txt"], "no such file"),
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
    alone, pair = torch.load(alone), torch.load(pair)
    for name, value in alone.items():
        torch.testing.assert_close(pair[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_split_stream_cuts_the_documents_at_a_stream_position():
    docs = [torch.arange(5), torch.arange(10, 13), torch.arange(20, 26)]
    before, after = demo.split_stream(docs, 6)
    assert [d.tolist() for d in before] == [[0, 1, 2, 3, 4]]  # the 1-token piece of the 2nd is dropped
    assert [d.tolist() for d in after] == [[11, 12], [20, 21, 22, 23, 24, 25]]
