"""The state protocol: batch axes per leaf, resets that clear, states that grow, cut-faithful windows, and the
state layouts of minGRU, Mamba-style SSMs, Transformer-XL, xLSTM and RWKV against the chunked reference."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, check_state_passing, create_supervised_tbptt_trainer
from ignite_tbptt.state import StateProtocol
from tests.reference import reference_chunked_trajectory
from tests.state_models import MinGRU, make_state_model

T, B = 12, 3
KINDS = ["mingru", "ssm", "memory", "xlstm", "rwkv"]
RESETTABLE = ["mingru", "ssm", "xlstm", "rwkv"]  # a memory that starts empty has no per-sample fresh state


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, 2, generator=g, dtype=torch.float64), torch.randn(T, B, 2, generator=g, dtype=torch.float64)


def _resets():
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[4, 0] = resets[7, 1] = resets[9, 0] = True  # inside chunks: the forward pass is cut there
    return resets


def _protocol(model):
    reset = MinGRU.reset if isinstance(model, MinGRU) else None
    fresh = (lambda h: torch.full_like(h, math.log(MinGRU.H0))) if reset else (lambda h: torch.zeros_like(h) if
                                                                                isinstance(h, torch.Tensor) else
                                                                                {k: _zeros(v) for k, v in h.items()})
    return reset, fresh


def _zeros(h):
    return torch.zeros_like(h) if isinstance(h, torch.Tensor) else {k: _zeros(v) for k, v in h.items()}


def _train(model, batches, k1, k2, overlap, lr=0.1, carry=False, **kwargs):
    reset, _ = _protocol(model)
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=lr), nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap,
        carry_state=carry, hidden_batch_dim=model.batch_dims, reset_hidden=reset, **kwargs,
    )
    grads = []
    trainer.add_event_handler(Tbptt_Events.GRADIENTS_COMPUTED, lambda e: grads.append(
        [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]))
    trainer.run(batches)
    return grads


def _assert_matches(model, reference):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], rtol=0, atol=1e-10, msg=name)


def test_min_gru_parallel_scan_equals_the_sequential_one():
    x = _data()[0]
    parallel, sequential = make_state_model("mingru"), make_state_model("mingru", parallel=False)
    h = torch.randn(B, 3, dtype=torch.float64)
    for hidden in (None, h):
        (y1, h1), (y2, h2) = parallel(x, hidden), sequential(x, hidden)
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
        torch.testing.assert_close(h1, h2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("case", ["one batch", "carried", "resets"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_state_layout_matches_the_chunked_reference(kind, case, overlap):
    if case == "resets" and kind not in RESETTABLE:
        pytest.skip("a memory that starts empty has no per-sample fresh state")
    model = make_state_model(kind)
    x, y = _data()
    k1, k2 = 3, 9
    resets = _resets() if case == "resets" else None
    _, fresh = _protocol(model)
    expected = reference_chunked_trajectory(model, x, y, k1, k2, overlap, 0.1, F.mse_loss, resets=resets, fresh=fresh,
                                            dims=model.batch_dims)[-1]
    if case == "one batch":
        batches, carry = [(x, y)], False
    elif case == "carried":
        batches, carry = [(x[:6], y[:6]), (x[6:], y[6:])], True
    else:
        batches, carry = [(x[:6], y[:6], {"resets": resets[:6]}), (x[6:], y[6:], {"resets": resets[6:]})], True
    _train(model, batches, k1, k2, overlap, carry=carry)
    _assert_matches(model, expected)


@pytest.mark.parametrize("k1,k2", [(3, 9), (3, 5), (2, 7)])
def test_both_modes_give_the_same_gradient_for_a_model_that_depends_on_the_cut(k1, k2):
    """At learning rate 0, recompute re-runs each window in the calls the forward pass made, so it computes the
    same gradient as retain even for a memory of the last M steps, whose output depends on the cuts."""
    x, y = _data()
    grads = {m: _train(make_state_model("memory"), [(x, y)], k1, k2, m, lr=0.0) for m in ("recompute", "retain")}
    for a, b in zip(*grads.values()):
        for g1, g2 in zip(a, b):
            torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_a_reset_clears_a_non_finite_state_and_sends_no_gradient_back():
    protocol = StateProtocol(batch_dim=0)
    h = torch.tensor([[float("nan"), 1.0], [0.0, 0.0]], requires_grad=True)
    fresh = protocol.reset(h, torch.tensor([False, False]))
    assert torch.equal(fresh, torch.zeros(2, 2))
    torch.log(fresh).sum().backward()  # log(0): an infinite gradient that must not cross the reset
    assert torch.equal(h.grad, torch.zeros(2, 2))


def test_a_sample_whose_state_went_nan_trains_again_after_its_reset():
    model = make_state_model("xlstm")
    x, y = _data()
    x[1, 0] = float("nan")  # sample 0's state goes nan at step 1 ...
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[6, 0] = True  # ... and starts afresh at step 6
    outputs = []
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                              tbtt_step=3, hidden_batch_dim=0, skip_nonfinite=True)
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: outputs.append(float(e.state.output)))
    with pytest.warns(UserWarning, match="skip_nonfinite"):  # the two nan updates are skipped
        trainer.run([(x, y, {"resets": resets})])
    assert [math.isnan(o) for o in outputs] == [True, True, False, False]


def test_a_wrong_batch_axis_is_caught_at_the_first_chunk_before_any_update():
    model = make_state_model("rwkv")  # (layers, B, H, hs, hs): the default axis -2 is hs
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[10, 1] = True  # the reset sits in the last chunk; the axis is checked at the first
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                              tbtt_step=3)
    with pytest.raises(ValueError, match=r"state leaf hidden of shape \(2, 3, 2, 2, 2\) has no batch axis of size 3 "
                                         r"at hidden_batch_dim=-2"):
        trainer.run([(x, y, {"resets": resets})])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    trainer.run([(x, y)])  # without resets, padding or burn-in the batch axis is never needed


def test_a_batch_dim_structure_must_match_the_hidden():
    model = make_state_model("ssm")
    x, y = _data()
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                              tbtt_step=3, hidden_batch_dim={"ssm": 0})
    with pytest.raises(ValueError, match=r"hidden_batch_dim=\{'ssm': 0\} has 1 axes, but the hidden state has 2 leaves"):
        trainer.run([(x, y, {"lengths": torch.tensor([12, 9, 5])})])
    with pytest.raises(TypeError, match="hidden_batch_dim must be an int or a structure of ints"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=3,
                                        hidden_batch_dim={"ssm": 0, "conv": "0"})


@pytest.mark.parametrize("overlap,k2", [("recompute", 3), ("recompute", 6), ("retain", 3), ("retain", 6)])
def test_a_model_that_changes_its_state_in_place_is_refused_and_the_leaf_named(overlap, k2):
    model = make_state_model("xlstm", in_place=True)
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                              tbtt_step=3, k2=k2, overlap=overlap, hidden_batch_dim=0)
    with pytest.raises(ValueError, match=r"changed the state leaf hidden\['block0'\]\['c'\] .*in place"):
        trainer.run([_data()])


def test_padding_holds_a_sample_at_the_fresh_state_of_the_model():
    """Padding at a fresh stream holds a sample at the state reset_hidden gives, not at zeros."""
    model = make_state_model("mingru")
    x, y = _data()
    lengths = torch.tensor([12, 0, 12])  # sample 1 is all padding: its state stays fresh
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(),
                                              tbtt_step=3, hidden_batch_dim=0, reset_hidden=MinGRU.reset, carry_state=True)
    trainer.run([(x, y, {"lengths": lengths})])
    hidden = trainer.carried_state.window.hidden
    torch.testing.assert_close(hidden[1], torch.full((3,), math.log(0.5), dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mingru", "ssm", "xlstm", "rwkv"])
def test_check_state_passing_accepts_each_layout(kind):
    model = make_state_model(kind)
    reset, _ = _protocol(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_state_passing(model, _data()[0], 4, hidden_batch_dim=model.batch_dims, reset_hidden=reset)


def test_check_state_passing_says_a_memory_depends_on_the_cut_without_failing():
    with pytest.warns(UserWarning, match=r"chunk 1 .*although the model uses every part of the state .*depends on "
                                         r"where the sequence is cut"):
        check_state_passing(make_state_model("memory"), _data()[0], 4)


def test_check_state_passing_finds_a_reset_that_is_not_the_fresh_state():
    with pytest.warns(UserWarning, match="a reset does not start a sample as a fresh stream does"):
        check_state_passing(make_state_model("mingru"), _data()[0], 4, hidden_batch_dim=0)  # zeros: h = 1, not 0.5


def test_check_state_passing_names_a_wrong_batch_axis():
    with pytest.raises(AssertionError, match=r"state leaf hidden of shape \(2, 3, 2, 2, 2\) has no batch axis"):
        check_state_passing(make_state_model("rwkv"), _data()[0], 4, hidden_batch_dim=-2)


@pytest.mark.parametrize("k1,k2", [(2, 7), (3, 9)])
def test_merge_calls_is_the_same_for_a_model_that_does_not_depend_on_the_cut_and_not_for_one_that_does(k1, k2):
    from tests.models import make_model

    x, y = _data()
    for kind, same in (("LSTM", True), ("memory", False)):
        runs = []
        for merge in (False, True):
            model = make_model(kind) if kind == "LSTM" else make_state_model(kind)
            create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
                                            tbtt_step=k1, k2=k2, merge_calls=merge).run([(x, y)])
            runs.append([p.detach() for p in model.parameters()])
        close = all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(*runs))
        assert close == same, kind


def test_merge_calls_is_for_recompute_only():
    model = make_state_model("ssm")
    with pytest.raises(ValueError, match='merge_calls=True applies to overlap="recompute" only'):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), tbtt_step=3,
                                        k2=6, overlap="retain", merge_calls=True)
