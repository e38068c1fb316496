"""The benchmarks keep working: the hand-written baselines compute what the trainer computes, and
``python benchmarks/overlap.py --quick`` prints every table."""

import importlib.util
import os

import pytest
import torch
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name):
    """Import ``benchmarks/<name>.py`` (the folder is not a package) under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overlap = load("overlap")  # puts benchmarks/ on sys.path for its bench_* modules
bench_stream = load("bench_stream")
bench_compile = load("bench_compile")
bench_burn_in = load("bench_burn_in")
bench_artbp = load("bench_artbp")
bench_adaptive = load("bench_adaptive")
bench_corpus = load("bench_corpus")
import bench_common as bc  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def params_after(kind, k1, k2, run):
    model = bc.make_model(kind, 3, 4, torch.device("cpu")).double()
    x, y = (t.double() for t in bc.make_data(11, 2, 3, torch.device("cpu")))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    run(model, optimizer, x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("k1,k2", [(3, 3), (3, 5), (2, 6), (4, 7), (2, 9), (1, 4), (5, 20)])
@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_hand_written_baselines_match_the_trainer(kind, k1, k2, mode):
    """Two batches, so that the second starts from parameters the first changed (``retain``'s clones matter)."""
    hand = bc.hand_written if k1 == k2 and mode == "recompute" else bc.HAND_WRITTEN[mode]

    def by_hand(model, opt, x, y):
        for _ in range(2):
            hand(model, opt, nn.MSELoss(), x, y, k1, k2)

    def by_trainer(model, opt, x, y):
        trainer = create_supervised_tbptt_trainer(model, opt, nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=mode)
        trainer.run([(x, y)] * 2)

    for a, b in zip(params_after(kind, k1, k2, by_hand), params_after(kind, k1, k2, by_trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_floor_parts_are_positive():
    model = bc.make_model("lstm", 3, 4, torch.device("cpu"))
    x, y = bc.make_data(8, 2, 3, torch.device("cpu"))
    forward, backward = bc.floor_parts(model, nn.MSELoss(), x, y, 3, lambda: None)
    assert forward > 0 and backward > 0
    assert all(p.grad is None for p in model.parameters())


def test_quick_run_prints_every_table(capsys):
    """Speed and memory, each case or measurement in a fresh process: what ``--quick`` runs, minus checkpointing."""
    overlap.main(["--quick", "--sections", "speed,memory"])
    out = capsys.readouterr().out
    for line in ("| model | k1 | k2 | contender | s/batch | ratio | ratio of medians | x floor |", "hand-written retain",
                 "ignite_tbptt retain", "ignite trainer", "floor: fwd + (k2/k1) bwd", "inputs growth MiB",
                 "hand-written loop, again", "hand-written recompute, again"):
        assert line in out, out


def test_quick_checkpoint_section(capsys, monkeypatch):
    """The checkpointing section, its measurements run in this process to save four interpreter starts."""
    memory = overlap.bench_memory
    monkeypatch.setattr(memory, "measure_all", lambda configs, jobs: [memory.child(c) for c in configs])
    monkeypatch.setattr(bc, "set_malloc", lambda mode: True)  # leave this process's allocator alone
    overlap.main(["--quick", "--sections", "checkpoint"])
    out = capsys.readouterr().out
    assert ("memory ratio" in out) != ("skipped" in out), out


def test_instruction_totals_are_read_from_a_callgrind_dump(tmp_path):
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\ncmd: python\nevents: Ir\nfn=main\n1 5\ntotals: 123456\n")
    assert overlap.bench_instructions.dump_total(str(dump)) == 123456
    dump.write_text("events: Ir\nfn=main\n1 5\n")
    with pytest.raises(ValueError, match="no instruction total"):
        overlap.bench_instructions.dump_total(str(dump))


def test_instructions_section_skips_without_valgrind(monkeypatch):
    monkeypatch.setattr(overlap.bench_instructions.shutil, "which", lambda name: None)
    assert "skipped" in overlap.bench_instructions.section(None)


def test_stream_benchmark_quick_run(capsys):
    """The word-language-model loop computes what the main job computes, and every table prints."""
    bench_stream.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("| word-language-model loop | ", "| ignite_tbptt main job | ", "| one stream (the main job) | 5 |",
                 "documents, shuffle=True | 5 |", "largest parameter difference after one epoch of each is 0.0e+00"):
        assert line in out, out


def test_compile_benchmark_quick_run(capsys):
    bench_compile.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("| ignite_tbptt, eager |", "| ignite_tbptt, compiled |", "| ignite trainer, compiled |", "retain"):
        assert line in out, out


def test_burn_in_benchmark_quick_run(capsys):
    bench_burn_in.main(["--quick"])
    out = capsys.readouterr().out
    assert "| every step scored |" in out and "| burn_in=20 |" in out, out


def test_the_hand_written_artbp_loop_computes_what_the_trainer_computes():
    from ignite_tbptt import ARTBP
    from ignite_tbptt.schedule import plan_chunks, truncate

    x, y = bc.make_data(60, 3, 4, torch.device("cpu"))
    x, y = x.double(), y.double()
    chunks = truncate(plan_chunks(60, 5, 5), ARTBP(0.3, cap=4, seed=1), None, stream=False)[0]
    assert any(c.factor != 1.0 and c.window_start < c.start for c in chunks)
    models = [bc.make_model("lstm", 4, 8, torch.device("cpu")).double() for _ in range(2)]
    by_hand = torch.optim.SGD(models[0].parameters(), lr=0.1)
    bench_artbp.hand_written_artbp(models[0], by_hand, nn.MSELoss(), x, y, chunks)
    trainer = create_supervised_tbptt_trainer(models[1], torch.optim.SGD(models[1].parameters(), lr=0.1), nn.MSELoss(),
                                              tbtt_step=5, k2=ARTBP(0.3, cap=4, seed=1))
    trainer.run([(x, y)])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_artbp_benchmark_quick_run(capsys):
    bench_artbp.main(["--quick", "--sections", "speed", "noise"])
    out = capsys.readouterr().out
    for line in ("| hand-written ARTBP loop (recompute) |", "| ignite_tbptt ARTBP, retain |", "ARTBP's gradient over its draws"):
        assert line in out, out


def test_adaptive_benchmark_quick_run(capsys):
    bench_adaptive.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("| one estimate (beta = ", "| retain, monitor_state_grads=True |", "| AdaptiveK2(0.1) |",
                 "The K of each estimate of the adaptive runs: seed 0: "):
        assert line in out, out


def test_corpus_benchmark_quick_run(capsys, tmp_path):
    """A tiny token file: every row of the table prints, and the files are removed afterwards."""
    bench_corpus.main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    for line in ("| laying out a shuffled epoch (no token read) |", "| producing a batch of 8 x 32 (median of 5) |",
                 "| batch / training step |", "`ru_maxrss` |", "| checking every token id (`vocab_size=`) |"):
        assert line in out, out
    assert list(tmp_path.iterdir()) == []
