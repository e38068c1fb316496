# %% [markdown]
# # Streaming language model: carried state, chunk events, progress and a loss curve
#
# A character-level LSTM language model reads the Python documentation that ships with CPython
# (`pydoc_data.topics`, one document per topic) as **parallel streams**: `StreamBatches` lays the documents
# end to end, cuts them into 32 rows, and consecutive batches continue the rows. With `carry_state=True` the
# hidden state (and, for `k2 > k1`, the backprop window) carries from one batch to the next, as in Keras'
# `stateful=True` or PyTorch's word-language-model example; Ignite's trainer resets the state at every batch.
#
# This notebook shows
#
# 1. training with `carry_state=True`, TBPTT(k1=25, k2=50), a per-chunk progress bar with the running loss;
# 2. chunk-level reporting: `TbpttLoss` over blocks of chunks, read from a `Tbptt_Events` handler, plotted as
#    a loss curve against the chunk counter `state.time_iteration`;
# 3. held-out bits per character from the chunked evaluator, which walks the validation stream chunk by chunk
#    with the state carried, and what is lost when the state is reset at every batch instead.
#
# It trains on the corpus for one epoch, to stay well under a minute on a 2-core CPU.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
from ignite.engine import Events
from ignite.metrics import Loss
from pydoc_data.topics import topics

from ignite_tbptt import (
    ChunkProgressBar,
    ChunkWise,
    StreamBatches,
    TbpttLoss,
    Tbptt_Events,
    create_supervised_tbptt_evaluator,
    create_supervised_tbptt_trainer,
)

torch.manual_seed(0)
BITS = 1 / math.log(2)  # nats -> bits

# %% [markdown]
# ## The stream
#
# Characters become integer ids, one tensor per topic. `StreamBatches` lays the topics out end to end as
# `(time, rows)`: row `j` is the `j`-th slice of that text, and batch `i` holds steps `i * 100 .. (i + 1) * 100`
# of every row, so batch `i + 1` continues exactly where batch `i` stopped. The target is the next character.
# Where a topic starts inside a row, the batch carries a reset for that row (its state starts afresh) and the
# one pair that would predict the new topic's first character from the old one's last is masked. With
# `shuffle=True` the topics are reordered every epoch, whole, never the characters inside one; the order follows
# `(seed, epoch)`, and `set_epoch` at every epoch start picks it. Every batch also carries its position in the
# stream: a trainer with `carry_state=True` refuses a batch that does not continue the one before.

# %%
names = sorted(topics)
vocab = sorted(set().union(*topics.values()))
index = {c: i for i, c in enumerate(vocab)}
docs = [torch.tensor([index[c] for c in topics[name]], dtype=torch.long) for name in names]
split = int(len(docs) * 0.9)
train_batches = StreamBatches(docs[:split], batch_size=32, seq_len=100, shuffle=True, seed=0)
valid_batches = StreamBatches(docs[split:], batch_size=8, seq_len=100)
print(f"{sum(map(len, docs)):,} characters in {len(docs)} topics, vocabulary {len(vocab)}: {train_batches}")

marks = [info for _, _, info in train_batches]
resets = sum(int(info["resets"].sum()) for info in marks if "resets" in info)
masked = sum(int((~info["mask"]).sum()) for info in marks if "mask" in info)
print(f"an epoch: {resets} topic starts reset a row, {masked} pairs across two topics are masked")

# %% [markdown]
# ## Model and trainer
#
# The model follows Ignite's protocol: `model(x)` on a sequence's first chunk, `model(x, hidden)` after,
# returning `(y_pred, hidden)`. The loss is the cross-entropy over all (step, stream) pairs of a chunk.

# %%
class CharLSTM(torch.nn.Module):
    def __init__(self, vocab_size, hidden_size=192):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 48)
        self.lstm = torch.nn.LSTM(48, hidden_size)
        self.decode = torch.nn.Linear(hidden_size, vocab_size)

    def forward(self, x, hidden=None):
        out, hidden = self.lstm(self.embed(x), hidden)
        return self.decode(out), hidden


def sequence_loss(y_pred, y):  # (time, rows, vocab) or, where pairs are masked, the valid ones: (pairs, vocab)
    return torch.nn.functional.cross_entropy(y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1))


model = CharLSTM(len(vocab))
optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
trainer = create_supervised_tbptt_trainer(
    model, optimizer, sequence_loss, tbtt_step=25, k2=50, overlap="retain", carry_state=True, clip_grad_norm=1.0
)
trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: train_batches.set_epoch(engine.state.epoch - 1))

# %% [markdown]
# ## Chunk-level reporting
#
# `TbpttLoss` is an Ignite `Metric` that averages the chunk losses over time steps. With `ChunkWise(every=20)`
# it reports the mean over each block of 20 chunks, at `TIME_ITERATION_COMPLETED(every=20)`; a handler on that
# event records it with the chunk counter. Nothing is copied to the host per chunk. The progress bar advances
# per chunk inside each batch and shows the epoch's running loss in bits per character.

# %%
TbpttLoss().attach(trainer, "loss_20", usage=ChunkWise(every=20))
curve = []


@trainer.on(Tbptt_Events.TIME_ITERATION_COMPLETED(every=20))
def record(engine):
    curve.append((engine.state.time_iteration, engine.state.metrics["loss_20"] * BITS))


ChunkProgressBar(persist=True, desc="train", mininterval=1.0).attach(trainer, output_transform=lambda loss: loss * BITS)

start = time.perf_counter()
trainer.run(train_batches, max_epochs=1)
print(f"{trainer.state.time_iteration} chunks in {time.perf_counter() - start:.0f} s")

# %%
chunks, bits = zip(*curve)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(chunks, bits, label="training loss, mean over 20 chunks")
ax.axhline(3.5, color="gray", ls=":", label="bigram entropy of the corpus (about 3.5)")
ax.set_xlabel("chunk (state.time_iteration)")
ax.set_ylabel("bits per character")
ax.set_title("Streaming char-LSTM, TBPTT(k1=25, k2=50, retain), carried state")
ax.legend()
plt.show()

# %% [markdown]
# ## Held-out bits per character, chunk by chunk
#
# The chunked evaluator runs the validation stream in chunks of 100 steps under `torch.no_grad()`, each chunk
# from the state the previous one left, and updates its metrics after every chunk; memory holds one chunk's
# activations. With `carry_state=True` the state also flows across batches, so the whole validation stream is
# read as one text. With `carry_state=False` every batch starts from a zero state, as Ignite's trainer does,
# and the model has to guess the start of every batch without context. Topic starts reset the state in both.

# %%
def flat(x, y, y_pred):
    return y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1)


results = {}
for carry in (True, False):
    evaluator = create_supervised_tbptt_evaluator(
        model, {"nll": Loss(torch.nn.CrossEntropyLoss())}, tbtt_step=100, carry_state=carry, output_transform=flat
    )
    results[carry] = evaluator.run(valid_batches).metrics["nll"] * BITS
print(f"validation, state carried across batches: {results[True]:.3f} bits/char")
print(f"validation, state reset at every batch:   {results[False]:.3f} bits/char")
assert results[True] < 3.5, "the model should beat a bigram model"
assert results[True] < results[False], "carrying the state should help"

# %% [markdown]
# The model ends below the bigram entropy of the corpus after a single pass over half of it, and
# reading the validation text as one stream, with the state carried, scores better than resetting the state
# at every batch. `python -m ignite_tbptt.demo` trains the same kind of model on the whole corpus for longer.
