"""Carried streams whose batches are not multiples of k1: both overlap modes run a cut-dependent model in the calls
the forward pass made, and start each window where docs/contract.md ("Carried state") says, against the float64
references."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ignite_tbptt import Tbptt_Events, create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.reference import reference_chunked_trajectory, reference_trajectory
from tests.state_models import make_state_model

LR = 0.1
LENGTHS = [[6, 6, 4], [6, 4, 6], [7, 3, 5]]  # a short last batch; a short middle batch; none a multiple of k1
STEPS = [(3, 9), (2, 7), (4, 11)]


def contract_plan(lengths, k1, k2):
    """The chunks, the steps where the forward pass starts a call, and each update's window start, written from
    the contract: a batch's chunks are cut where the windows of its later chunks start, and of the next batch's
    chunks were it to continue the stream on the k1 grid; a window start inside a call moves to the call's end."""
    o, chunks, cuts, offset = k2 - k1, [], set(), 0
    for length in lengths:
        stop = offset + length
        chunks += [(s, min(s + k1, stop)) for s in range(offset, stop, k1)]
        foreseen = {max(0, s - o) for s in [*range(offset, stop, k1), *range(stop, stop + o, k1)]}
        cuts |= set(range(offset, stop, k1)) | {w for w in foreseen if offset <= w < stop}
        offset = stop
    windows = [min(c for c in cuts if c >= max(0, s - o)) for s, _ in chunks]
    return chunks, sorted(cuts), windows


def _train(model, lengths, k1, k2, overlap, **kwargs):
    x, y = make_data(sum(lengths))
    bounds = [0, *itertools.accumulate(lengths)]
    trainer = create_supervised_tbptt_trainer(model, torch.optim.SGD(model.parameters(), lr=LR), nn.MSELoss(),
                                              tbtt_step=k1, k2=k2, overlap=overlap, carry_state=True, **kwargs)
    trajectory = []
    trainer.add_event_handler(Tbptt_Events.TIME_ITERATION_COMPLETED, lambda _: trajectory.append(
        {n: p.detach().clone() for n, p in model.named_parameters()}))
    trainer.run([(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    return trajectory, x, y


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for update, (a, b) in enumerate(zip(got, expected)):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-10, msg=f"update {update + 1}, {name}")


def test_the_cases_move_windows_and_cut_for_a_batch_that_never_comes():
    moved = 0
    for lengths, (k1, k2) in itertools.product(LENGTHS, STEPS):
        chunks, _, windows = contract_plan(lengths, k1, k2)
        moved += sum(w != max(0, s - (k2 - k1)) for (s, _), w in zip(chunks, windows))
    assert moved
    assert 13 in contract_plan([6, 6, 4], 3, 9)[1]  # foreseen for a fourth batch at step 16, which never comes


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("k1,k2", STEPS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_a_cut_dependent_model_runs_in_the_forward_pass_calls(lengths, k1, k2, overlap):
    got, x, y = _train(make_state_model("memory"), lengths, k1, k2, overlap, hidden_batch_dim=0)
    chunks, cuts, windows = contract_plan(lengths, k1, k2)
    expected = reference_chunked_trajectory(make_state_model("memory"), x, y, k1, k2, overlap, LR, F.mse_loss,
                                            chunks=chunks, windows=windows, cuts=cuts)
    _assert_same(got, expected)


@pytest.mark.parametrize("overlap", ["recompute", "retain"])
@pytest.mark.parametrize("k1,k2", STEPS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_a_cut_independent_model_starts_each_window_where_the_contract_says(lengths, k1, k2, overlap):
    got, x, y = _train(make_model("LSTM"), lengths, k1, k2, overlap)
    chunks, _, windows = contract_plan(lengths, k1, k2)
    expected = reference_trajectory(make_model("LSTM"), x, y, k1, k2, overlap, LR, nn.MSELoss(), bounds=chunks,
                                    windows=windows, rate_by_length=False)
    _assert_same(got, expected)
