"""The compatibility suite: recurrent models from other packages, each behind the thinnest wrapper a user would
write, trained in float64 against hand-written references (``pip install -e ".[models]"`` installs them; each
test skips cleanly where its package is missing).

For every model: ``k1 = k2`` with the state carried across batches equals a hand-written loop; ``k2 > k1`` in
each mode it supports equals a brute-force reference (or is refused, naming the mode that works); per-sample
resets equal running each document alone (or ``check_state_passing`` says why not); and
``check_state_passing`` passes. ``docs/guide/model-state.md``'s compatibility table reports what this file
measures; ``test_the_docs_table_reports_these_wrappers`` keeps the two in step.
"""

import copy
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from ignite_tbptt import check_state_passing, create_supervised_tbptt_trainer
from tests.reference import reference_chunked_trajectory

T, B, N_IN = 12, 3, 4
K1, K2 = 3, 9  # k2 - k1 a multiple of k1: every window starts where a chunk starts, as the references need


# ---------------------------------------------------------------- the wrappers, as a user would write them
# Each takes (time, batch, features) unless its entry says dim=1, and returns (y_pred, hidden).


class MinGRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = minGRU_pytorch.minGRU(N_IN)

    def forward(self, x, hidden=None):  # batch-first: the trainer runs with dim=1
        return self.rnn(x, hidden, return_next_prev_hidden=True)


class XLMemoryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.xl = x_transformers.ContinuousTransformerWrapper(
            dim_in=N_IN, dim_out=N_IN, max_seq_len=0, max_mem_len=4,
            attn_layers=x_transformers.Decoder(dim=8, depth=1, heads=2, rel_pos_bias=True))

    def forward(self, x, hidden=None):  # batch-first; x-transformers wants its memories back as a list
        out, mems = self.xl(x, mems=hidden, return_mems=True)
        return out, list(mems)


class CfCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = ncps_torch.CfC(N_IN, N_IN, batch_first=False)

    def forward(self, x, hidden=None):
        return self.rnn(x, hidden)


class LTCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = ncps_torch.LTC(N_IN, N_IN, batch_first=False, ode_unfolds=2)

    def forward(self, x, hidden=None):
        return self.rnn(x, hidden)


class SRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = sru.SRU(N_IN, N_IN, num_layers=2)

    def forward(self, x, hidden=None):
        return self.rnn(x, hidden)


class MambaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mamba = mambapy_mamba.Mamba(mambapy_mamba.MambaConfig(
            d_model=N_IN, n_layers=2, d_state=2, expand_factor=1, d_conv=3))

    def forward(self, x, caches=None):  # one step() per time step; a fresh cache is (None, zeros), as mambapy's
        if caches is None:
            caches = [(None, x.new_zeros(x.shape[1], N_IN, 2)) for _ in self.mamba.layers]
        ys = []
        for x_t in x:
            y_t, caches = self.mamba.step(x_t, caches)
            ys.append(y_t)
        return torch.stack(ys), caches


class SLSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torchxlstm.sLSTM(N_IN, 2, 2)

    def forward(self, x, hidden=None):  # torchxlstm's own fresh state is float32
        if hidden is None:
            hidden = tuple(x.new_zeros(1, x.shape[1], N_IN) for _ in range(4))
        return self.rnn(x, hidden)


# name: (module to import, names bound in this module, wrapper, what the trainer and the suite need to know)
MODELS = {
    "minGRU": ("minGRU_pytorch", "minGRU_pytorch", MinGRUNet, dict(dim=1, batch_dim=0, modes=("recompute", "retain"))),
    "x-transformers": ("x_transformers", "x_transformers", XLMemoryNet,
                       dict(dim=1, batch_dim=0, modes=("recompute", "retain"), detached=True, resets=False)),
    "CfC": ("ncps.torch", "ncps_torch", CfCNet, dict(batch_dim=0, modes=("recompute", "retain"))),
    "LTC": ("ncps.torch", "ncps_torch", LTCNet, dict(batch_dim=0, modes=("recompute",))),
    "SRU": ("sru", "sru", SRUNet, dict(batch_dim=-2, modes=("recompute", "retain"), float32_inference=True)),
    "Mamba": ("mambapy.mamba", "mambapy_mamba", MambaNet, dict(batch_dim=0, modes=("recompute", "retain"))),
    "sLSTM": ("torchxlstm", "torchxlstm", SLSTMNet, dict(batch_dim=-2, modes=("recompute", "retain"))),
}


def _model(name, seed=0):
    module, alias, wrapper, _ = MODELS[name]
    globals()[alias] = pytest.importorskip(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SRU warns that it runs without its CUDA kernels
        torch.manual_seed(seed)
        return wrapper().double()


def _data(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(T, B, N_IN, generator=g, dtype=torch.float64) for _ in range(2))
    return (x.transpose(0, 1), y.transpose(0, 1)) if MODELS[name][3].get("dim") == 1 else (x, y)


def _time(t, name, a, b):
    return t[:, a:b] if MODELS[name][3].get("dim") == 1 else t[a:b]


def _trainer(name, model, k1, k2, overlap, lr=0.1, **kwargs):
    info = MODELS[name][3]
    return create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=lr), nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap,
        dim=info.get("dim", 0), hidden_batch_dim=info["batch_dim"], **kwargs)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close(model, expected, atol=1e-12):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=atol, msg=n)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _recompute_reference(name, model, x, y, k1, k2, lr):
    """TBPTT(k1, k2) recompute by brute force, on a copy of ``model`` called directly (no functional_call, which
    cannot replace ncps' LTC parameters): every update reruns its window in k1-step calls from the state at the
    window start, as its last run left it, and takes a plain SGD step."""
    model, o, states = copy.deepcopy(model), k2 - k1, {0: None}
    length = x.shape[MODELS[name][3].get("dim", 0)]
    for s in range(0, length, k1):
        t, w = min(s + k1, length), max(0, s - o)
        hidden, outputs = states[w], []
        for a in range(w, t, k1):
            b = min(a + k1, t)
            y_pred, hidden = model(_time(x, name, a, b)) if hidden is None else model(_time(x, name, a, b), hidden)
            states[b] = _detach(hidden)
            if a >= s:
                outputs.append(y_pred)
        loss = F.mse_loss(torch.cat(outputs, MODELS[name][3].get("dim", 0)), _time(y, name, s, t))
        trained = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, trained, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(trained, grads):
                if g is not None:
                    p -= lr * g
    return _params(model)


class _TimeFirst(nn.Module):
    """The model as ``tests/reference.py`` calls it: time-first, and given containers of its own (mambapy writes
    into the list it is given, which would change the states the reference keeps)."""

    def __init__(self, model, dim):
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, x, hidden=None):
        x = x.transpose(0, 1) if self.dim == 1 else x
        y_pred, hidden = self.model(x) if hidden is None else self.model(x, tree_map(lambda t: t, hidden))
        return (y_pred.transpose(0, 1) if self.dim == 1 else y_pred), hidden


def _retain_reference(name, model, x, y):
    dim = MODELS[name][3].get("dim", 0)
    x, y = (x.transpose(0, 1), y.transpose(0, 1)) if dim == 1 else (x, y)
    reference = _quiet(reference_chunked_trajectory, _TimeFirst(model, dim), x, y, K1, K2, "retain", 0.1, F.mse_loss)
    return {n[len("model."):]: v for n, v in reference[-1].items()}


def _detach(hidden):
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    if isinstance(hidden, (list, tuple)):
        return type(hidden)(_detach(h) for h in hidden)
    return hidden  # None


# ---------------------------------------------------------------- the suite


@pytest.mark.parametrize("name", MODELS)
def test_carried_k1_equals_k2_matches_a_hand_written_loop(name, one_thread):
    model = _model(name)
    x, y = _data(name)
    expected = _quiet(_recompute_reference, name, model, x, y, K1, K1, 0.1)  # k2 = k1: the plain loop
    batches = [(_time(x, name, 0, 6), _time(y, name, 0, 6)), (_time(x, name, 6, T), _time(y, name, 6, T))]
    _quiet(_trainer(name, model, K1, K1, "recompute", carry_state=True).run, batches)
    _assert_close(model, expected)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("name", MODELS)
def test_k2_beyond_k1_matches_the_brute_force_reference(name, overlap, one_thread):
    model = _model(name)
    x, y = _data(name)
    info = MODELS[name][3]
    if overlap not in info["modes"]:
        with pytest.raises(ValueError, match=r'overlap="recompute" trains it exactly'):
            _quiet(_trainer(name, model, K1, K2, overlap).run, [(x, y)])
        return
    if overlap == "recompute":
        expected = _quiet(_recompute_reference, name, model, x, y, K1, K2, 0.1)
    else:
        expected = _retain_reference(name, model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(name, model, K1, K2, overlap).run([(x, y)])
    said = any("k2 > tbtt_step has no effect" in str(w.message) for w in caught)
    assert said == info.get("detached", False), [str(w.message)[:80] for w in caught]
    _assert_close(model, expected)


def _resets(name):
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[5, 1] = True  # sample 1 starts its second document at step 5
    return resets.T if MODELS[name][3].get("dim") == 1 else resets


@pytest.mark.parametrize("name", MODELS)
def test_a_reset_starts_a_sample_as_its_document_alone(name, one_thread):
    model = _model(name)
    x, y = _data(name)
    if not MODELS[name][3].get("resets", True):
        with pytest.warns(UserWarning, match="a reset does not start a sample as a fresh stream does"):
            check_state_passing(model, x, K1, dim=MODELS[name][3].get("dim", 0),
                                hidden_batch_dim=MODELS[name][3]["batch_dim"])
        return
    trainer = _trainer(name, model, K1, K1, "recompute", lr=0.0, carry_state=True)
    _quiet(trainer.run, [(x, y, {"resets": _resets(name)})])
    kept = trainer.carried_state.window.state_at_stop()
    sample = (slice(None), slice(5, T)) if MODELS[name][3].get("dim") == 1 else (slice(5, T),)
    alone_x = x[sample][1:2] if MODELS[name][3].get("dim") == 1 else x[sample][:, 1:2]
    alone = _quiet(_run_alone, model, alone_x, name)
    axis = MODELS[name][3]["batch_dim"]
    for got, want in zip(_leaves(kept), _leaves(alone)):
        torch.testing.assert_close(got.narrow(axis, 1, 1), want, rtol=0, atol=1e-12)


def _run_alone(model, x, name):
    hidden = None
    for a in range(0, x.shape[MODELS[name][3].get("dim", 0)], K1):
        chunk = _time(x, name, a, a + K1)
        hidden = (model(chunk) if hidden is None else model(chunk, hidden))[1]
    return hidden


def _leaves(hidden):
    if isinstance(hidden, torch.Tensor):
        return [hidden]
    return [t for h in hidden if h is not None for t in _leaves(h)]


@pytest.mark.parametrize("name", MODELS)
def test_check_state_passing_passes(name, one_thread):
    model = _model(name)
    x, _ = _data(name)
    info = MODELS[name][3]
    if info.get("float32_inference"):  # SRU's CPU kernel without gradients takes float32 only
        model, x = model.float(), x.float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_state_passing(model, x, K1, dim=info.get("dim", 0))
    said = [str(w.message) for w in caught if "depends on where the sequence is cut" in str(w.message)]
    assert bool(said) == (name == "x-transformers")  # a memory of the last M steps: trained as it runs in chunks


def _wrapper_lines(wrapper):
    """Lines of the wrapper's source, its class line included, without blank lines and comments."""
    lines = inspect.getsource(wrapper).splitlines()
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_the_docs_table_reports_these_wrappers():
    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "model-state.md").read_text()
    for name, (_, _, wrapper, _) in MODELS.items():
        row = re.search(rf"^\| [^|]*\b{re.escape(name)}\b[^|]*\| [^|]+ \| (\d+) \|", page, re.M)
        assert row is not None, f"no row for {name} in the compatibility table"
        assert int(row.group(1)) == _wrapper_lines(wrapper), name
