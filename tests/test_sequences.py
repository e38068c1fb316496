"""Per-sample resets and padded, variable-length batches, against the brute-force reference."""

import pytest
import torch
from torch import nn

from ignite_tbptt import create_supervised_tbptt_trainer
from tests.models import make_data, make_model
from tests.reference import reference_trajectory
from tests.test_k1k2 import LR, assert_same_trajectory, batches_trajectory

MODES = ["recompute", "retain"]


def lengths_mask(T, lengths):
    return torch.arange(T).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)  # (T, B)


def check(kind, T, k1, k2, overlap, valid=None, resets=None, info=None):
    x, y = make_data(T)
    expected = reference_trajectory(
        make_model(kind), x, y, k1, k2, overlap, LR, nn.MSELoss(), valid=valid, resets=resets
    )
    got = batches_trajectory(make_model(kind), [(x, y, info)], k1, k2, overlap)
    assert_same_trajectory(got, expected)
    return got


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "cell"])
@pytest.mark.parametrize(
    "T,k1,k2,lengths",
    [
        (10, 3, 5, [10, 6, 2]),  # samples end inside chunks and inside windows
        (10, 3, 3, [4, 4, 1]),  # the last chunks have no valid step at all: no update
        (9, 2, 7, [9, 0, 5]),  # a sample with no valid step
        (8, 1, 4, [3, 8, 5]),
    ],
)
def test_lengths_match_reference(kind, overlap, T, k1, k2, lengths):
    valid = lengths_mask(T, lengths)
    got = check(kind, T, k1, k2, overlap, valid=valid, info={"lengths": torch.tensor(lengths)})
    if not valid[-k1:].any():  # fully padded chunks leave the parameters alone
        assert all(torch.equal(got[-1][n], got[-2][n]) for n in got[-1])


@pytest.mark.parametrize("overlap", MODES)
def test_mask_with_gaps_matches_reference(overlap):
    # Left padding and holes: the state holds over every invalid step, wherever it is.
    valid = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]]).bool()
    check("GRU", 7, 2, 5, overlap, valid=valid, info={"mask": valid})


@pytest.mark.parametrize("overlap", MODES)
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "cell"])
@pytest.mark.parametrize("T,k1,k2", [(10, 3, 5), (9, 2, 2), (8, 1, 3)])
def test_resets_match_reference(kind, overlap, T, k1, k2):
    resets = torch.zeros(T, 3, dtype=torch.bool)
    resets[4, 0] = resets[7, 0] = resets[1, 2] = resets[4, 2] = True  # inside chunks, at chunk starts
    check(kind, T, k1, k2, overlap, resets=resets, info={"resets": resets})


def test_resets_and_lengths_together():
    T = 9
    valid, resets = lengths_mask(T, [9, 5, 7]), torch.zeros(T, 3, dtype=torch.bool)
    resets[3, 1] = resets[6, 0] = True
    check("LSTM", T, 2, 4, "retain", valid=valid, resets=resets, info={"lengths": torch.tensor([9, 5, 7]), "resets": resets})


def test_batch_start_resets_zero_only_those_samples_of_the_carried_state():
    model = make_model("GRU")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone() if len(args) > 1 else None))
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.0), nn.MSELoss(), tbtt_step=4, carry_state=True
    )
    x, y = make_data(4)
    trainer.run([(x, y), (x, y, {"resets": torch.tensor([False, True, False])})])
    carried = seen[1]  # the state the second batch starts from
    assert carried[:, 1].abs().sum() == 0
    assert carried[:, 0].abs().sum() > 0 and carried[:, 2].abs().sum() > 0


def run_alone(model, x, length):
    """A sample's predictions and final state from its valid steps alone, in one pass."""
    y_pred, hidden = model(x[:length])
    return y_pred, hidden


def test_batch_loss_is_the_mean_over_valid_steps_and_padding_freezes_the_state():
    T, lengths = 11, [11, 4, 7]
    model = make_model("GRU")
    x, y = make_data(T)
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.0), nn.MSELoss(reduction="sum"), tbtt_step=3, carry_state=True
    )
    # With a summing loss every chunk's weight must still be its number of valid (step, sample) pairs.
    state = trainer.run([(x, y, {"lengths": torch.tensor(lengths)})])
    with torch.no_grad():
        pieces = [run_alone(model, x[:, b : b + 1], n) for b, n in enumerate(lengths)]
        total = sum(((p - y[:n, b : b + 1]) ** 2).sum() for (p, _), (b, n) in zip(pieces, enumerate(lengths)))
        chunk_sums = []
        for s in range(0, T, 3):
            chunk_sums.append(
                sum(((p[s:min(s + 3, n)] - y[s:min(s + 3, n), b : b + 1]) ** 2).sum() for (p, _), (b, n) in zip(pieces, enumerate(lengths)))
            )
    counts = [int(lengths_mask(T, lengths)[s : s + 3].sum()) for s in range(0, T, 3)]
    # Each chunk's loss is loss_fn over its valid pairs (a sum here), weighted by its count of valid pairs.
    expected = sum(c * n for c, n in zip(chunk_sums, counts)) / sum(counts)
    assert state.output == pytest.approx(float(expected), rel=1e-12)
    assert total > 0
    window_hidden = trainer.carried_state.window.hidden
    for b, (_, h) in enumerate(pieces):
        torch.testing.assert_close(window_hidden[:, b : b + 1], h, rtol=0, atol=1e-12)


def test_hidden_batch_dim_that_does_not_fit_is_named():
    model = make_model("LSTM")
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.SGD(model.parameters(), 0.1), nn.MSELoss(), tbtt_step=2, hidden_batch_dim=0
    )
    x, y = make_data(6)
    with pytest.raises(ValueError, match="hidden_batch_dim=0"):
        trainer.run([(x, y, {"lengths": torch.tensor([6, 3, 2])})])


@pytest.mark.parametrize("overlap", MODES)
def test_padding_with_activation_checkpointing(overlap):
    # The checkpointed re-run in the backward pass used to look its gate up again, after the track had moved
    # on: with padding, recompute failed ("A different number of tensors was saved").
    T = 16
    x, y = make_data(T)
    valid = lengths_mask(T, [16, 12, 9])
    expected = reference_trajectory(make_model("GRU"), x, y, 3, 7, overlap, LR, nn.MSELoss(), valid=valid)
    got = batches_trajectory(make_model("GRU"), [(x, y, {"mask": valid})], 3, 7, overlap, checkpoint_every=2)
    assert_same_trajectory(got, expected)

