"""torch.compile'd models train as their eager selves in every mode and feature, without steady-state recompiles.

The tests compile with the ``aot_eager`` backend: AOTAutograd's joint graph and compiled backward, the part
that retained graphs meet (donated buffers), without inductor's C++ compile time. ``benchmarks/bench_compile.py``
times inductor.
"""

import copy

import pytest
import torch
from torch import nn

from ignite_tbptt import ARTBP, create_supervised_tbptt_trainer
from tests.models import cpu_runs_bfloat16_lstm, make_data, make_model

torch_dynamo = pytest.importorskip("torch._dynamo")

CASES = {  # name: (k1, k2, trainer options, batches of (x, y[, info]))
    "k2 > k1": (3, 7, {}, "plain"),
    "carry_state": (3, 7, {"carry_state": True}, "stream"),
    "resets and padding": (3, 5, {}, "sequences"),
    "checkpoint_every": (2, 8, {"checkpoint_every": 3}, "plain"),
    "amp": (3, 6, {"amp_mode": "amp"}, "plain"),
    "k2 == k1": (4, 4, {"carry_state": True}, "stream"),
    "ARTBP": (3, ARTBP(0.4, cap=4, seed=1), {"carry_state": True}, "stream"),
}


def data(kind):
    x, y = (t.float() for t in make_data(24, batch=4, seed=7))
    if kind == "stream":
        return [(x[:12], y[:12]), (x[12:], y[12:])]
    if kind == "sequences":
        resets = torch.zeros(24, 4, dtype=torch.bool)
        resets[9, 1] = resets[14, 3] = True
        return [(x, y, {"lengths": torch.tensor([24, 20, 13, 24]), "resets": resets})]
    return [(x, y)]


def train(model, k1, k2, overlap, options, batches, epochs=2):
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap,
        **options,
    )
    trainer.run(batches, max_epochs=epochs)
    return trainer


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("kind", ["cell", "LSTM"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_compiled_model_trains_as_the_eager_one(case, kind, overlap):
    k1, k2, options, batches = CASES[case]
    if options.get("amp_mode") and kind == "LSTM" and not cpu_runs_bfloat16_lstm():
        pytest.skip("this CPU has no bfloat16 LSTM kernel (oneDNN needs AVX-512 BF16 or AMX)")
    torch_dynamo.reset()
    eager = make_model(kind).float()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    train(eager, k1, k2, overlap, options, data(batches))
    train(compiled, k1, k2, overlap, options, data(batches))
    # float32 tolerance; under autocast (bfloat16 on the CPU) compiled and eager kernels round differently:
    # 2e-4 at most for the GRUCell loop here, after parameters moved by 0.38
    rtol, atol = (1e-2, 1e-3) if "amp_mode" in options else (1e-4, 1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)


def test_a_second_trainer_with_other_chunk_lengths_in_retain_mode():
    # The k1 sweep of a notebook: the model recompiles for new chunk lengths, whose backward is compiled while
    # earlier graphs are retained (it used to fail: "compiled with non-empty donated buffers").
    torch_dynamo.reset()
    eager = make_model("cell").float()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for k1, k2 in ((5, 10), (4, 8), (3, 9)):
        train(eager, k1, k2, "retain", {}, data("plain"), epochs=1)
        train(compiled, k1, k2, "retain", {}, data("plain"), epochs=1)
    for a, b in zip(eager.parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    import torch._functorch.config as functorch_config

    assert functorch_config.donated_buffer is True  # the user's setting, untouched after the runs


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
def test_no_recompiles_after_the_first_epoch(overlap):
    torch_dynamo.reset()
    compiled = torch.compile(make_model("cell").float(), backend="aot_eager")
    x, y = (t.float() for t in make_data(40, batch=4, seed=3))
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]  # fixed-length batches, 10 = 3 + 3 + 3 + 1
    trainer = train(compiled, 3, 7, overlap, {"carry_state": True}, batches, epochs=1)
    compiles = torch_dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiles >= 1
    trainer.run(batches, max_epochs=3)
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == compiles
