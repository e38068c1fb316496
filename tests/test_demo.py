"""The main job's command line: a tiny real run, and clear errors for bad input."""

import argparse
import re

import pytest
import torch

from ignite_tbptt import demo

TOY = ["--epochs", "1", "--hidden", "16", "--seq-len", "20", "--batch-size", "4", "--k1", "5", "--no-progress"]
FEW = TOY + ["--batch-size", "8", "--seq-len", "40", "--k1", "10"]  # fewer, longer chunks: for runs made several times


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


# ---------------------------------------------------------------- the main job keeps its work


def interrupt_at(monkeypatch, iteration):
    """Ctrl-C after the trainer's ``iteration``-th batch: a handler raising KeyboardInterrupt, as SIGINT does."""
    attach = demo.attach_progress

    def attach_and_interrupt(trainer, every, bar):
        attach(trainer, every, bar)

        @trainer.on(demo.Events.ITERATION_COMPLETED(once=iteration))
        def ctrl_c(engine):
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "attach_progress", attach_and_interrupt)


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("where,message", [("no_such_dir/model.pt", "--save: no such directory"),
                                           (".", "--save: .* is a directory")])
def test_the_save_path_is_checked_before_training(tmp_path, monkeypatch, capsys, where, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "train", lambda *a: pytest.fail("trained before checking --save"))
    assert demo.main(two_documents(tmp_path) + TOY + ["--save", where]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_save_overwrites_only_with_force(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_text("precious")
    assert demo.main(two_documents(tmp_path) + TOY + ["--save", str(path)]) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err and path.read_text() == "precious"
    assert demo.main(two_documents(tmp_path) + FEW + ["--save", str(path), "--force"]) == 0
    assert demo.load_model(str(path))[0].lstm.hidden_size == 16


def test_ctrl_c_saves_a_file_that_score_loads_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    """Interrupted at the 3rd batch of epoch 2 and resumed, the run ends with the uninterrupted run's weights:
    the epoch, the optimizer, the cosine schedule with warm-up and the carried stream all continue."""
    run = two_documents(tmp_path) + FEW + ["--k2", "20", "--shuffle", "--schedule", "cosine", "--warmup", "3",
                                           "--clip", "0.5"]
    straight, stopped = tmp_path / "straight.pt", tmp_path / "stopped.pt"
    assert demo.main(run + ["--epochs", "2", "--save", str(straight)]) == 0
    batches_per_epoch = torch.load(straight, weights_only=True)["training"]["trainer"]["epoch_length"]
    interrupt_at(monkeypatch, batches_per_epoch + 3)
    assert demo.main(run + ["--epochs", "2", "--save", str(stopped)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: saved {stopped} after 1 epoch(s) and 3 batch(es); continue with --resume {stopped}" in err
    assert "Traceback" not in err
    assert demo.main(["score", "--load", str(stopped), "--text", run[1]]) == 0
    monkeypatch.undo()
    assert demo.main(["--resume", str(stopped), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed after 1 epoch(s) and 3 batch(es)" in out and "epoch 2:" in out and "epoch 1:" not in out
    assert_same_weights(stopped, straight)


def test_resume_trains_only_the_remaining_epochs(tmp_path, capsys):
    run = two_documents(tmp_path) + FEW
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert demo.main(run + ["--epochs", "3", "--save", str(straight)]) == 0
    assert demo.main(run + ["--epochs", "1", "--save", str(resumed)]) == 0
    capsys.readouterr()
    assert demo.main(["--resume", str(resumed), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^epoch (\d+):", out, re.M) == ["2", "3"]
    assert_same_weights(resumed, straight)
    training = torch.load(resumed, weights_only=True)["training"]
    history, batches_per_epoch = training["history"], training["trainer"]["epoch_length"]
    assert len(history["valid_bits"]) == 3 and len(history["batch_bits"]) == 3 * batches_per_epoch


def test_the_best_model_by_validation_is_kept(tmp_path):
    path = tmp_path / "model.pt"
    assert demo.main(two_documents(tmp_path) + FEW + ["--epochs", "3", "--save", str(path)]) == 0
    history = torch.load(path, weights_only=True)["training"]["history"]
    best = torch.load(tmp_path / "model.best.pt", weights_only=True)
    assert best["validation_bits"] == min(history["valid_bits"]) == history["best_valid"]
    assert best["epoch"] == 1 + history["valid_bits"].index(best["validation_bits"])
    assert "training" not in best and demo.load_model(str(tmp_path / "model.best.pt"))[1] == best["vocab"]


def test_the_loss_curve_is_written_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(two_documents(tmp_path) + FEW + ["--save", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_what_it_cannot_continue(saved_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--resume", str(saved_model), "--hidden", "8"])
    assert exit_info.value.code == 2
    assert "--resume continues the saved run with its own settings: leave out --hidden" in capsys.readouterr().err
    assert demo.main(["--resume", str(saved_model), "--epochs", "1"]) == 2
    assert "has trained 1 epoch(s) already; pass --epochs above 1" in capsys.readouterr().err


def test_resume_of_a_best_file_is_refused(tmp_path, capsys):
    path = tmp_path / "model.pt"
    demo.save_model(path, demo.CharLSTM(3, 4), list("abc"))
    with pytest.raises(SystemExit):
        demo.main(["--resume", str(path)])
    assert "holds a model but no training state" in capsys.readouterr().err


def saved_with(tmp_path, change):
    record = demo.model_record(demo.CharLSTM(3, 4), list("abc"))
    change(record)
    path = tmp_path / "changed.pt"
    torch.save(record, path)
    return str(path)


def not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait. ".encode("latin-1") * 100)
    return str(path)


@pytest.mark.parametrize(
    "command,message",
    [
        (lambda t: ["score", "--load", saved_with(t, lambda r: r.pop("settings")), "--text", not_utf8(t)],
         r"--load: .*changed.pt lacks the model's settings"),
        (lambda t: ["score", "--load", saved_with(t, lambda r: r["settings"].update(hidden_size=5)), "--text", "x"],
         r"--load: .*changed.pt: the weights disagree with the settings .*size mismatch"),
        (lambda t: ["score", "--load", str(t), "--text", "x"], r"--load: .* is a directory"),
        (lambda t: ["score", "--load", saved_with(t, lambda r: None), "--text", str(t)], r"--text: .* is a directory"),
        (lambda t: ["score", "--load", saved_with(t, lambda r: None), "--text", not_utf8(t)],
         r"--text: .*latin1.txt is not UTF-8 text .*b'\\xe9'"),
        (lambda t: ["--text", not_utf8(t)], r"--text: .*latin1.txt is not UTF-8 text"),
        (lambda t: ["--text", str(t)], r"--text: .* is a directory"),
        (lambda t: ["prepare", "--text", not_utf8(t), "--out", str(t / "c")], r".*latin1.txt is not UTF-8 text"),
    ],
)
def test_each_bad_input_gets_one_error_line(tmp_path, command, message, capsys):
    assert demo.main(command(tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err


def test_score_of_an_empty_file(saved_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert demo.main(["score", "--load", str(saved_model), "--text", str(empty)]) == 2
    assert f"error: --text: {empty} has 0 character(s) to read: scoring needs 2 or more" in capsys.readouterr().err


def test_an_unsafe_file_is_refused_naming_what_it_holds(tmp_path, capsys):
    path = tmp_path / "unsafe.pt"
    torch.save({"format": demo.SAVED_FORMAT, "payload": argparse.Namespace}, path)
    assert demo.main(["sample", "--load", str(path), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "holds a Python object (argparse.Namespace), which only unpickling could rebuild" in err
    assert "weights_only=False" not in err and len(err.splitlines()) == 1


def test_a_corpus_whose_files_disagree_is_refused(tmp_path, capsys):
    text = two_documents(tmp_path)
    corpus = tmp_path / "corpus"
    assert demo.main(["prepare", "--text", *text[1:], "--out", str(corpus)]) == 0
    assert demo.main(["prepare", "--text", *text[1:], "--out", str(corpus)]) == 2
    assert "already holds a corpus (tokens.bin, offsets.npy, vocab.json); pass --force" in capsys.readouterr().err
    tokens = (corpus / "tokens.bin").read_bytes()
    for changed, message in [(tokens + tokens[:10], r"tokens.bin holds 2,385 uint8 tokens, vocab.json says 2,375"),
                             (tokens[:-100], r"tokens.bin holds 2,275 uint8 tokens, vocab.json says 2,375")]:
        (corpus / "tokens.bin").write_bytes(changed)
        assert demo.main(["--corpus", str(corpus)] + TOY) == 2
        assert re.search(message, capsys.readouterr().err)
    (corpus / "tokens.bin").write_bytes(tokens)
    assert demo.main(["prepare", "--text", text[1], "--out", str(corpus), "--force"]) == 0
    assert demo.main(["prepare", "--text", *text[1:], "--out", str(tmp_path / "other")]) == 0
    (corpus / "tokens.bin").write_bytes((tmp_path / "other" / "tokens.bin").read_bytes())
    assert demo.main(["--corpus", str(corpus)] + TOY) == 2
    assert "is not one corpus" in capsys.readouterr().err


def test_sample_top_k_and_several_samples(saved_model, capsys):
    args = ["sample", "--load", str(saved_model), "--prompt", "the ", "--length", "30"]
    assert demo.main(args + ["--top-k", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- sample 1 (seed 0)" and out[2] == "--- sample 2 (seed 1)"
    assert out[1] == out[3]  # top-k 1: the likeliest character every time, whatever the seed
    assert demo.main(args + ["--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err


def test_help_shows_defaults_and_no_markup(capsys):
    for command in ([], ["score"], ["sample"], ["prepare"]):
        with pytest.raises(SystemExit):
            demo.main(command + ["--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 25)" in out and "(default: constant)" in out and "--resume PATH" in out
