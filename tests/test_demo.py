"""The main job's command line: a tiny real run, and clear errors for bad input."""

import re

import pytest

from ignite_tbptt import demo


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


@pytest.mark.parametrize(
    "args,message",
    [
        (["--text", "/no/such/file.txt"], "no such file"),
        (["--k1", "0"], "--k1 must be >= 1"),
        (["--k1", "5", "--k2", "3"], r"--k2 \(3\) must be >= --k1 \(5\)"),
        (["--overlap", "keep"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
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
