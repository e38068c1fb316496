"""Unbiased truncation, ``k2=ARTBP(p)`` (docs/contract.md, "Unbiased truncation"): the draws, exactness against the step-by-step
float64 reference with the compensation factors, and unbiasedness, measured over many independent draws."""

import collections
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_tbptt import ARTBP, RandomLength, Tbptt_Events, create_supervised_tbptt_trainer
from ignite_tbptt.schedule import batch_plan, plan_chunks, truncate
from tests.models import make_data, make_model
from tests.reference import reference_trajectory
from tests.test_burn_in import mask, resets_at
from tests.test_k1k2 import LR, assert_same_trajectory

MODES = ["recompute", "retain"]


def windows_of(chunks):
    return [(c.start, c.stop, c.window_start, c.factor) for c in chunks]


# ---- the draws ---------------------------------------------------------------------------------------------------


def test_truncations_happen_with_probability_p_and_windows_are_geometric():
    p, n = 0.3, 20000
    chunks = truncate(plan_chunks(n, 1, 1), ARTBP(p, seed=3), None, stream=False)[0]
    truncated = [c.window_start == c.start for c in chunks[1:]]
    rate, sd = sum(truncated) / len(truncated), (p * (1 - p) / len(truncated)) ** 0.5
    assert abs(rate - p) < 4 * sd
    lengths = [c.stop - c.window_start for c in chunks]
    # A window of L chunks: L - 1 boundaries without a truncation since the last one; its mean tends to 1 / p.
    assert abs(statistics.mean(lengths) - 1 / p) < 0.1
    assert all(c.factor == (1.0 if c.window_start == c.start else 1 / (1 - p)) for c in chunks)


def test_p_is_asked_with_the_window_length_in_chunks():
    asked = []

    def p(length):
        asked.append(length)
        return 0.0 if length < 3 else 0.5

    chunks = truncate(plan_chunks(200, 2, 2), ARTBP(p, seed=1), None, stream=False)[0]
    runs = [1]  # chunks since the last truncation, up to and including each chunk
    for c in chunks[1:]:
        runs.append(1 if c.window_start == c.start else runs[-1] + 1)
    assert asked[1:] == runs[:-1]  # asked[0]: the constructor's check of p(1)
    assert asked[1:4] == [1, 2, 3]  # never truncated before the window holds 3 chunks
    assert [c.factor for c in chunks[1:3]] == [1.0, 1.0]  # p = 0: crossed, nothing to compensate
    assert all(c.factor == 2.0 for c, run in zip(chunks, runs) if run > 3)


def test_a_cap_bounds_the_window_and_leaves_the_truncations_alone():
    free = truncate(plan_chunks(300, 3, 3), ARTBP(0.1, seed=5), None, stream=False)[0]
    capped = truncate(plan_chunks(300, 3, 3), ARTBP(0.1, cap=4, seed=5), None, stream=False)[0]
    assert max(c.stop - c.window_start for c in free) > 12
    assert max(c.stop - c.window_start for c in capped) == 12  # 4 chunks of 3
    assert [c.factor for c in capped] == [c.factor for c in free]
    for f, c in zip(free, capped):
        assert c.window_start == max(f.window_start, c.start - 9)


def test_a_carried_stream_truncates_as_one_batch():
    k1, artbp = 2, ARTBP(0.4, cap=3, seed=2)
    whole, whole_later, _ = batch_plan(24, 0, k1, ARTBP(0.4, cap=3, seed=2), stream=False)
    pieces, later, before, offset = [], [], None, 0
    for length in (6, 10, 8):
        chunks, later_of, before = batch_plan(length, offset, k1, artbp, True, before)
        pieces += chunks
        later += [later_of(c) for c in chunks]
        offset += length
    assert windows_of(pieces) == windows_of(whole)
    assert later[:-1] == [whole_later(c) for c in whole][:-1]
    for c, starts in zip(whole, later):  # a later window that reaches back into a chunk starts at or before it
        assert starts == sorted({d.window_start for d in whole[c.index + 1:] if d.window_start < c.stop})[:1]


def test_the_draws_resume_from_their_state():
    artbp = ARTBP(0.5, seed=9)
    before = batch_plan(10, 0, 2, artbp, stream=True)[2]  # peeks the next batch's first draw
    saved = artbp.state_dict()
    expected = windows_of(batch_plan(10, 10, 2, artbp, True, before)[0])
    resumed = ARTBP(0.5, seed=0)
    resumed.load_state_dict(saved)
    assert windows_of(batch_plan(10, 10, 2, resumed, True, before)[0]) == expected


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(p=1.0), ValueError, r"p must be a probability in \[0, 1\), got 1.0"),
        (dict(p=-0.1), ValueError, r"p must be a probability in \[0, 1\)"),
        (dict(p="0.5"), TypeError, "p must be a float or a function"),
        (dict(p=lambda n: 1.5), ValueError, r"p\(1\) returned 1.5"),
        (dict(p=0.5, cap=0), ValueError, "cap must be >= 1"),
        (dict(p=0.5, cap=2.5), TypeError, "cap must be an int or None"),
        (dict(p=0.5, seed="a"), TypeError, "seed must be an int"),
    ],
)
def test_bad_truncations_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        ARTBP(**kwargs)


def test_a_probability_function_that_goes_bad_fails_before_the_batch_changes_anything():
    model = make_model("GRU")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(), tbtt_step=2,
        k2=ARTBP(lambda n: 0.0 if n < 3 else 1.0),
    )
    x, y = make_data(12)
    with pytest.raises(ValueError, match=r"p\(3\) returned 1.0"):
        trainer.run([(x, y)])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_k2_of_another_type_is_named():
    model = make_model("GRU")
    with pytest.raises(TypeError, match=r"k2 must be an int or ARTBP\(p\)"):
        create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                        tbtt_step=2, k2=0.5)


# ---- exactness against the reference -----------------------------------------------------------------------------


def run_recorded(model, batches, k1, artbp, overlap, lr=LR, **options):
    """The trainer over ``batches``: its parameters after every update, its chunks and the trainer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=k1, k2=artbp,
                                              overlap=overlap, **options)
    record = {"params": [], "chunks": []}
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED, lambda e: record["chunks"].append(e.state.chunk))
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda e: record["params"].append(
        {n: p.detach().clone() for n, p in model.named_parameters()}))
    trainer.run(batches)
    return record, trainer


def reference_for(kind, x, y, k1, chunks, overlap, random_lengths=False, **kwargs):
    """The reference over the trainer's ``chunks``, with their windows and factors (and scaled learning rates, for
    random lengths)."""
    factors = {c.start: c.factor for c in chunks if c.factor != 1.0}
    return reference_trajectory(make_model(kind), x, y, k1, k1, overlap, LR, nn.MSELoss(),
                                bounds=[(c.start, c.stop) for c in chunks], rate_by_length=random_lengths,
                                windows=[c.window_start for c in chunks], factors=factors, **kwargs)


def check(kind, T, k1, artbp, overlap, pieces=None, info=None, **options):
    x, y = make_data(T)
    ends = list(torch.tensor(pieces or [T]).cumsum(0).tolist())
    spans = list(zip([0] + ends[:-1], ends))
    batches = [(x[a:b], y[a:b], *([{k: v[a:b] for k, v in info.items()}] if info else [])) for a, b in spans]
    record, trainer = run_recorded(make_model(kind), batches, k1, artbp, overlap, carry_state=pieces is not None,
                                   **options)
    extra = {"valid": info.get("mask"), "resets": info.get("resets")} if info else {}
    if "burn_in" in options:
        extra["burn_in"] = options["burn_in"]
    if "gradient_accumulation_steps" in options:
        extra["accumulate"] = options["gradient_accumulation_steps"]
    random_lengths = isinstance(k1, RandomLength)
    k1 = k1.bptt if random_lengths else k1
    expected = reference_for(kind, x, y, k1, record["chunks"], overlap, random_lengths, **extra)
    assert_same_trajectory(record["params"], expected)
    return record, trainer


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM", "cell"])
@pytest.mark.parametrize("T,k1,p,cap", [(16, 2, 0.3, None), (17, 3, 0.5, 3), (12, 1, 0.2, None), (10, 4, 0.6, 2)])
def test_matches_the_reference_with_the_factors(kind, T, k1, p, cap, overlap):
    record, _ = check(kind, T, k1, ARTBP(p, cap=cap, seed=2), overlap)
    if T // k1 > 3:  # the case is one that compensates: some window crosses a boundary
        assert any(c.factor != 1.0 and c.window_start < c.start for c in record["chunks"])


FEATURES = {  # name: (trainer options, batch pieces, sequence info)
    "carry_state": ({}, [6, 9, 5], None),
    "padding and resets": ({}, None, {"mask": mask(20, [20, 15, 9]), "resets": resets_at(20, 3, [(5, 0), (11, 1)])}),
    "burn_in": ({"burn_in": 5}, [8, 12], None),
    "checkpoint_every": ({"checkpoint_every": 3}, [9, 11], None),
    "accumulation": ({"gradient_accumulation_steps": 2}, None, None),
}


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_matches_the_reference(feature, overlap):
    options, pieces, info = FEATURES[feature]
    check("LSTM", 20, 2, ARTBP(0.35, seed=1), overlap, pieces=pieces, info=info, **options)


@pytest.mark.parametrize("overlap", MODES)
def test_random_lengths_and_random_truncation(overlap):
    record, _ = check("GRU", 30, RandomLength(4, std=2.0, min_length=1, seed=3), ARTBP(0.4, cap=4, seed=2), overlap,
                      pieces=[13, 17])
    assert len({c.length for c in record["chunks"]}) > 1


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 24), k1=st.integers(1, 5), p=st.floats(0, 0.9), cap=st.one_of(st.none(), st.integers(1, 5)),
       seed=st.integers(0, 100), overlap=st.sampled_from(MODES), split=st.integers(0, 24))
def test_property_random_truncations_match_the_reference(T, k1, p, cap, seed, overlap, split):
    pieces = [split, T - split] if 0 < split < T else None
    check("GRU", T, k1, ARTBP(p, cap=cap, seed=seed), overlap, pieces=pieces)


# ---- unbiasedness ------------------------------------------------------------------------------------------------


class LinearRNN(nn.Module):
    """h_t = W h_{t-1} + U x_t, y_t = V h_t: the state gradient decays slowly, so truncation bias is large."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(torch.tensor([[0.9, 0.3], [-0.3, 0.8]], dtype=torch.float64))
        self.U = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
        self.V = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], 2) if hidden is None else hidden
        outs = []
        for x_t in x.unbind(0):
            h = h @ self.W.T + x_t @ self.U.T
            outs.append(h @ self.V.T)
        return torch.stack(outs), h


def gradient_samples(model, x, y, k1, k2, overlap, batches):
    """The gradient of every update, as flat vectors per chunk index, over ``batches`` runs of the same stream with
    the parameters held fixed (learning rate 0): each batch starts a fresh stream and draws its own truncations."""
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(),
                                              tbtt_step=k1, k2=k2, overlap=overlap)
    samples = {}

    @trainer.on(Tbptt_Events.GRADIENTS_COMPUTED)
    def keep(engine):
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        samples.setdefault(engine.state.chunk.index, []).append(grads.clone())

    trainer.run([(x, y)] * batches)
    return {c: torch.stack(g) for c, g in samples.items()}


def full_gradient(model, x, y, chunk_start, chunk_stop):
    """The gradient of one chunk's loss through the whole stream before it (no truncation)."""
    y_pred, _ = model(x[:chunk_stop])
    loss = nn.MSELoss()(y_pred[chunk_start:], y[chunk_start:chunk_stop])
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def largest_z(samples, truths):
    """The largest |mean - truth| over its standard error, over every chunk and parameter."""
    worst = 0.0
    for c, g in samples.items():
        se = g.std(0) / len(g) ** 0.5
        z = ((g.mean(0) - truths[c]).abs() / se.clamp(min=1e-12)).max()
        worst = max(worst, float(z))
    return worst


def critical_z(count, alpha=1e-4):
    """Bonferroni bound for ``count`` two-sided tests at a family-wise level ``alpha``."""
    return statistics.NormalDist().inv_cdf(1 - alpha / (2 * count))


def check_unbiased(model, k1, artbp, overlap, T=10, batches=300):
    x, y = make_data(T, batch=2, seed=11)
    samples = gradient_samples(model, x, y, k1, artbp, overlap, batches)
    truths = {c: full_gradient(model, x, y, c * k1, min(T, (c + 1) * k1)) for c in samples}
    count = sum(g.shape[1] for g in samples.values())
    return largest_z({c: g for c, g in samples.items() if c > 0}, truths), critical_z(count)


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["linear", "GRU"])
def test_the_mean_gradient_is_the_full_gradient(kind, overlap, one_thread):
    model = LinearRNN() if kind == "linear" else make_model("GRU")
    z, bound = check_unbiased(model, 2, ARTBP(0.4, seed=0), overlap)
    assert z < bound, f"the mean ARTBP gradient is {z:.1f} standard errors from the full gradient"


def test_without_compensation_the_same_samples_are_biased(one_thread, monkeypatch):
    # The test above can fail: with the factors left out, the mean is the gradient of random-window TBPTT.
    import ignite_tbptt.window as window

    monkeypatch.setattr(window, "compensated", lambda hidden, factor: hidden)
    z, bound = check_unbiased(LinearRNN(), 2, ARTBP(0.4, seed=0), "recompute")
    assert z > 2 * bound


def test_a_function_of_the_window_length_is_unbiased_too(one_thread):
    z, bound = check_unbiased(LinearRNN(), 2, ARTBP(lambda n: 0.2 * n if n < 4 else 0.7, seed=1), "retain")
    assert z < bound


def test_a_capped_mean_is_tbptt_through_the_cap(one_thread):
    # cap = 2 chunks of 2: unbiased for TBPTT(2, 4), not for the full gradient
    model, x, y = LinearRNN(), *make_data(10, batch=2, seed=11)
    samples = gradient_samples(model, x, y, 2, ARTBP(0.4, cap=2, seed=0), "recompute", 300)
    capped = {c: g[0] for c, g in gradient_samples(model, x, y, 2, 4, "recompute", 1).items()}
    assert largest_z({c: g for c, g in samples.items() if c > 0}, capped) < critical_z(5 * 12)


# ---- the window-length distribution and resuming -----------------------------------------------------------------


def test_the_window_lengths_are_counted_in_the_state():
    x, y = make_data(40)
    record, trainer = run_recorded(make_model("GRU"), [(x[:20], y[:20]), (x[20:], y[20:])], 2, ARTBP(0.3, seed=6),
                                   "retain", carry_state=True)
    lengths = trainer.state.window_lengths
    assert sum(lengths.values()) == 20 and max(lengths) > 2
    assert lengths == collections.Counter(c.stop - c.window_start for c in record["chunks"])
    assert trainer.state_dict()["window_lengths"] == lengths


@pytest.mark.parametrize("overlap", MODES)
def test_a_resumed_run_truncates_as_the_uninterrupted_run(overlap, tmp_path):
    x, y = make_data(48, seed=2)
    batches = [(x[i : i + 12], y[i : i + 12]) for i in range(0, 48, 12)]

    def run(resume_from=None):
        model = make_model("LSTM")
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        trainer = create_supervised_tbptt_trainer(model, optimizer, nn.MSELoss(), tbtt_step=3,
                                                  k2=ARTBP(0.3, cap=5, seed=0), overlap=overlap, carry_state=True,
                                                  deterministic=True)
        chunks = []
        trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_STARTED, lambda e: chunks.append(e.state.chunk))
        to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
        if resume_from is None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False), n_saved=None))
        else:
            Checkpoint.load_objects(to_save, torch.load(resume_from, weights_only=False))
        trainer.run(batches, max_epochs=2)
        return chunks, {n: p.detach() for n, p in model.named_parameters()}, trainer.state.window_lengths

    whole, whole_params, whole_lengths = run()
    resumed, params, lengths = run(tmp_path / "checkpoint_6.pt")  # mid-way through epoch 2
    assert windows_of(resumed) == windows_of(whole)[-len(resumed):]
    assert any(c.window_start < c.start - 3 for c in resumed[:2])  # the resumed windows reach into the checkpoint
    assert lengths == whole_lengths
    for n in whole_params:
        torch.testing.assert_close(params[n], whole_params[n], rtol=0, atol=1e-12)
