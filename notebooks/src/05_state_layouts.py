# %% [markdown]
# # Four state layouts, one trainer: LSTM, minGRU, a selective SSM and a Transformer-XL memory
#
# The models people carry state through today keep it in different shapes. An LSTM keeps `(h, c)` with the
# batch at axis 1; minGRU in log space keeps `log h`, whose fresh value is not zero; a Mamba-style selective
# SSM keeps a dict of an SSM state and a short convolution state, batch first; a Transformer-XL block keeps a
# memory of its last `M` outputs that starts empty and grows, and whose output depends on where the stream is
# cut into calls.
#
# The trainer takes each as it is: `hidden_batch_dim` says where each leaf keeps the batch, `reset_hidden`
# how a sample starts afresh, and nothing else changes. This notebook trains all four on one long-memory
# stream task with the same TBPTT(k1, k2) settings, and shows their curves and what each costs per step.
# The three non-LSTM models are the small reference models of `notebooks/state_models.py`, which the tests check
# against a float64 reference in both overlap modes.
#
# The task: a stream of random symbols from 4, fed one per step; the target at step `t` is the symbol seen
# `D = 6` steps earlier. The stream is cut into batches of 24 steps with the state carried across them,
# `k1 = 4` and `k2 = 12`, so every update backpropagates far enough to see the lag. Chance is 25%.
#
# It runs in about half a minute on a 2-core CPU.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from ignite_tbptt import Tbptt_Events, check_state_passing, create_supervised_tbptt_trainer
from state_models import MemoryBlock, MinGRU, SelectiveSSM  # notebooks/state_models.py, beside this notebook

torch.set_num_threads(1)  # small models: one thread is fastest and makes the run repeatable
SYMBOLS, DELAY, BATCH, SEQ, K1, K2, BATCHES = 4, 6, 32, 24, 4, 12, 50


def stream(seed):
    """One epoch: consecutive (x, y) batches of a carried stream, x one-hot, y the symbol DELAY steps back."""
    g = torch.Generator().manual_seed(seed)
    symbols = torch.randint(0, SYMBOLS, (SEQ * BATCHES + DELAY, BATCH), generator=g)
    x = nn.functional.one_hot(symbols[DELAY:], SYMBOLS).float()
    y = symbols[:-DELAY]
    return [(x[i:i + SEQ], y[i:i + SEQ]) for i in range(0, SEQ * BATCHES, SEQ)]


class LSTMNet(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.rnn, self.head = nn.LSTM(SYMBOLS, hidden), nn.Linear(hidden, SYMBOLS)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


def cross_entropy(y_pred, y):  # written for a (time, batch, classes) chunk, as a user would
    return nn.functional.cross_entropy(y_pred.flatten(0, 1), y.flatten())


MODELS = {
    "LSTM": (lambda: LSTMNet(), {}),
    "minGRU": (lambda: MinGRU(SYMBOLS, 32, SYMBOLS), {"hidden_batch_dim": 0, "reset_hidden": MinGRU.reset}),
    "selective SSM": (lambda: SelectiveSSM(SYMBOLS, d=16, n=4, k=4, n_out=SYMBOLS), {"hidden_batch_dim": {"ssm": 0, "conv": 0}}),
    "Transformer-XL memory": (lambda: MemoryBlock(SYMBOLS, d=32, n_out=SYMBOLS, memory=12), {}),
}

# %% [markdown]
# ## The state check
#
# `check_state_passing` runs a batch whole and in chunks. The first three compute the same either way. The
# memory block does not: its chunks see at most `M` earlier steps, where the whole run sees them all. The
# check says so with a warning, not a failure, because the trainer runs it in chunks in both modes, and
# `recompute` re-runs each window in the same calls the forward pass made.

# %%
import warnings

x_check = stream(99)[0][0]
cut_dependent = []
for name, (build, protocol) in MODELS.items():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_state_passing(build(), x_check, K1, **protocol)
    print(f"{name:22s}", "passes" if not caught else f"warns: {str(caught[0].message)[:150]}...")
    if any("depends on where the sequence is cut" in str(w.message) for w in caught):
        cut_dependent.append(name)

# %% [markdown]
# ## Training
#
# Adam at 3e-3, 3 epochs of 50 batches, the same stream for every model, `overlap="recompute"`. The accuracy
# of every step is read off the predictions the update itself made, before that chunk's optimizer step, so no
# extra forward pass is timed.

# %%
from ignite.engine import Events

EPOCHS = 3
data = stream(0)
results = {}
for name, (build, protocol) in MODELS.items():
    torch.manual_seed(0)
    model = build()
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.Adam(model.parameters(), lr=3e-3), cross_entropy, tbtt_step=K1, k2=K2,
        carry_state=True, output_transform=lambda x, y, y_pred, loss: (y_pred.argmax(-1) == y).float().mean(1),
        **protocol,
    )
    accuracy = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: accuracy.extend(e.state.output.tolist()))
    start = time.perf_counter()
    trainer.run(data, max_epochs=EPOCHS)
    seconds = time.perf_counter() - start
    results[name] = {"accuracy": accuracy, "ms_per_step": 1e3 * seconds / len(accuracy),
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "final": sum(accuracy[-SEQ * 10:]) / (SEQ * 10)}
    print(f"{name:22s} {results[name]['parameters']:6,d} parameters  {results[name]['ms_per_step']:.3f} ms per step  "
          f"accuracy over the last 10 batches {results[name]['final']:.1%}")

# %%
fig, ax = plt.subplots(figsize=(10, 4))
window = SEQ * 5
for name, r in results.items():
    acc = torch.tensor(r["accuracy"])
    smooth = acc.unfold(0, window, window).mean(1)
    ax.plot(torch.arange(len(smooth)) * window + window, smooth, label=f"{name} ({r['ms_per_step']:.2f} ms/step)")
ax.axhline(1 / SYMBOLS, color="gray", ls=":", label="chance")
ax.set(xlabel="time step of the stream", ylabel="accuracy (mean of 5 batches)", ylim=(0, 1.02),
       title=f"Recall the symbol {DELAY} steps back: k1 = {K1}, k2 = {K2}, carried state")
ax.legend(loc="lower right")
plt.show()

# %% [markdown]
# ## What the run shows
#
# In the saved run (2-core CPU, torch 2.13.0, one thread), over the last 10 batches: the memory block recalls
# 100% (it attends straight back `D` steps through its relative-position scores), the LSTM about 84%, the SSM
# about 56% and minGRU about 42%, against 25% for chance. minGRU's gates read only the input, never the state,
# which makes it parallel over time and leaves it less to hold a lag with at this size; the SSM is the
# costliest per step here because its chunked scan builds an `L x L` decay matrix per call. The cell below
# checks what this text claims: every model trains on the one trainer with only `hidden_batch_dim` and
# `reset_hidden` to say, every one learns above chance, the memory block best, and the state check flags the
# memory block alone as cut-dependent.

# %%
for name, r in results.items():
    assert len(r["accuracy"]) == EPOCHS * len(data) * SEQ, name
    assert r["final"] > 1 / SYMBOLS + 0.1, (name, r["final"])
assert results["Transformer-XL memory"]["final"] > 0.95, results["Transformer-XL memory"]["final"]
assert max(results, key=lambda name: results[name]["final"]) == "Transformer-XL memory"
assert cut_dependent == ["Transformer-XL memory"]
print({name: f"{r['final']:.1%}" for name, r in results.items()})
