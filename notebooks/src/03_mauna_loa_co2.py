# %% [markdown]
# # Forecasting Mauna Loa CO2 with TBPTT and a carried state
#
# A real series that ships inside a package, so nothing is downloaded: the weekly atmospheric CO2
# concentration measured at Mauna Loa, March 1958 to December 2001 (`statsmodels.datasets.co2`, 2,284 weeks).
# It has a rising trend and a yearly cycle of about ±3 ppm.
#
# A small LSTM learns to predict next week's change from the changes so far. The training series is streamed
# in consecutive batches with `carry_state=True`, so the hidden state and the backprop window run on from
# one batch into the next. Each update covers a quarter (`k1 = 13` weeks) and backpropagates through a year
# (`k2 = 52` weeks), long enough to see a whole seasonal cycle; we compare with `k2 = k1 = 13`, all that
# Ignite's trainer can do. The last two years are held out and forecast free-running, feeding the model its
# own predictions, and scored against naive baselines.
#
# It runs in well under a minute on a 2-core CPU.

# %%
import time

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Events
from statsmodels.datasets import co2

from ignite_tbptt import create_supervised_tbptt_trainer

torch.set_num_threads(1)  # a tiny model: one thread is fastest here, and makes the run repeatable

raw = co2.load_pandas().data["co2"]
series = raw.interpolate(method="time")  # 59 missing weeks, filled linearly in time
print(f"{len(raw):,} weeks, {raw.index[0]:%Y-%m-%d} to {raw.index[-1]:%Y-%m-%d}; "
      f"{raw.isna().sum()} missing, filled by interpolation")

fig, ax = plt.subplots(figsize=(12, 3.5))
ax.plot(series.index, series, lw=0.8, label="weekly CO2 (ppm)")
ax.plot(series.index[raw.isna()], series[raw.isna()], "r.", ms=4, label="filled weeks")
ax.set(ylabel="ppm", title="Mauna Loa CO2, statsmodels.datasets.co2")
ax.legend()
plt.show()

# %% [markdown]
# ## What the model sees
#
# The level leaves the range of the training data during the test years, so the model works on the weekly
# change `Δ[t] = co2[t] - co2[t - 1]`, normalised with the mean and standard deviation of the training years.
# It reads `Δ[1..t]` and predicts `Δ[t + 1]`; a forecast of the level adds the predicted changes to the last
# observed level.
#
# The last 104 weeks (2000 and 2001) are held out. The training changes are cut into 4 parallel streams of
# 533 weeks (41 chunks of 13; the oldest 46 weeks are left out so that the streams end at the forecast origin),
# as PyTorch's word-language-model example batchifies a corpus, and each stream is fed in consecutive batches
# of 104 weeks (and a last one of 13). With `carry_state=True` every batch continues where the previous one
# stopped, and a `k2 = 52` window reaches back into the previous batch: the whole stream trains as if it were
# one batch. The state starts afresh at every epoch.

# %%
HOLD_OUT, STREAMS, K1, BATCH_WEEKS = 104, 4, 13, 104

levels = series.to_numpy()
train_levels, test_levels = levels[:-HOLD_OUT], levels[-HOLD_OUT:]
changes = np.diff(train_levels)
mean, std = changes.mean(), changes.std()
z = torch.tensor((changes - mean) / std, dtype=torch.float32)

per_stream = (len(z) - 1) // STREAMS // K1 * K1
pairs = z[-(STREAMS * per_stream + 1):]               # the most recent weeks, plus one for the last target
x = pairs[:-1].view(STREAMS, per_stream).T.unsqueeze(-1)  # (time, stream, 1)
y = pairs[1:].view(STREAMS, per_stream).T.unsqueeze(-1)   # the next week's change
batches = [(x[i:i + BATCH_WEEKS], y[i:i + BATCH_WEEKS]) for i in range(0, per_stream, BATCH_WEEKS)]
print(f"weekly change: mean {mean:+.4f} ppm, sd {std:.3f} ppm; {STREAMS} streams x {per_stream} weeks in "
      f"{len(batches)} batches of {[len(b[0]) for b in batches]} weeks")

# %% [markdown]
# ## Training
#
# An LSTM with 32 units and a linear read-out, trained with Adam for 60 epochs (a cosine learning-rate decay
# from 5e-3), `overlap="retain"` (every step runs forward once and the graphs of the last `k2` steps are kept;
# `"recompute"` would re-run each window from its stored start state instead). Each setting is trained from
# three seeds, since a free-running forecast from a single small network varies from seed to seed.

# %%
class Net(torch.nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.rnn, self.head = torch.nn.LSTM(1, hidden), torch.nn.Linear(hidden, 1)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


def train(k2, seed, epochs=60):
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, torch.nn.MSELoss(), tbtt_step=K1, k2=k2, overlap="retain", carry_state=True
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: schedule.step())
    trainer.run(batches, max_epochs=epochs)
    return model


@torch.no_grad()
def forecast(model, weeks=HOLD_OUT):
    """One-step predictions of every training change, then ``weeks`` free-running steps from the last one."""
    model.eval()
    pred, hidden = model(z.view(-1, 1, 1))  # the whole training series; pred[i] predicts z[i + 1]
    one_step = pred[:-1, 0, 0].numpy() * std + mean
    step, future = pred[-1:], []
    for _ in range(weeks):
        future.append(step.item())
        step, hidden = model(step, hidden)  # feed the prediction back in
    return one_step, train_levels[-1] + np.cumsum(np.array(future) * std + mean)


def rmse(f):
    return float(np.sqrt(np.mean((f - test_levels) ** 2)))


def mae(f):
    return float(np.mean(np.abs(f - test_levels)))


runs = {}
for k2 in (52, 13):
    for seed in (0, 1, 2):
        start = time.perf_counter()
        model = train(k2, seed)
        one_step, future = forecast(model)
        runs[k2, seed] = dict(one_step=one_step, future=future, seconds=time.perf_counter() - start)
        print(f"k2 = {k2}, seed {seed}: trained in {runs[k2, seed]['seconds']:.1f} s, "
              f"held-out RMSE {rmse(future):.2f} ppm")

# %% [markdown]
# ## Baselines and held-out error
#
# - **naive**: the last observed level, held flat;
# - **seasonal naive**: the last observed year repeated (the value 52 weeks before, or 104);
# - **seasonal naive + drift**: the same plus last year's increase per year elapsed, a strong baseline for a
#   series this regular, given as a reference.

# %%
weeks_ahead = np.arange(HOLD_OUT)
last_year = train_levels[-52:]
baselines = {
    "naive": np.full(HOLD_OUT, train_levels[-1]),
    "seasonal naive": last_year[weeks_ahead % 52],
    "seasonal naive + drift": last_year[weeks_ahead % 52]
    + (train_levels[-1] - train_levels[-53]) * (1 + weeks_ahead // 52),
}

rows = []
for k2 in (52, 13):
    scores = [rmse(runs[k2, seed]["future"]) for seed in (0, 1, 2)]
    rows.append((f"LSTM, k2 = {k2}, mean of 3 seeds", np.mean(scores), np.mean([mae(runs[k2, s]["future"]) for s in (0, 1, 2)]),
                 ", ".join(f"{s:.2f}" for s in scores)))
for name, f in baselines.items():
    rows.append((name, rmse(f), mae(f), ""))
print(f"{'forecast of 2000-2001 (104 weeks)':38s} {'RMSE':>6s} {'MAE':>6s}  per seed (RMSE)")
for name, r, m, detail in rows:
    print(f"{name:38s} {r:6.2f} {m:6.2f}  {detail}")

one_step_mse = np.mean((runs[52, 0]["one_step"] - changes[1:]) ** 2)
print(f"\none-step weekly change, k2 = 52, seed 0: MSE {one_step_mse:.3f} ppm^2 against a variance of "
      f"{changes[1:].var():.3f} ppm^2 ({1 - one_step_mse / changes[1:].var():.0%} explained)")

# %%
dates = series.index
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1, 1.3]))

shown = slice(-4 * 52, None)  # the last four training years
ax1.plot(dates[1:-HOLD_OUT][shown], changes[shown], lw=0.6, color="gray", label="weekly change")
ax1.plot(dates[2:-HOLD_OUT][shown], runs[52, 0]["one_step"][shown], color="C0", label="one-step prediction")
ax1.set(ylabel="ppm per week", title="fit: weekly change, 1996-1999 (k2 = 52, seed 0)")
ax1.xaxis.set_major_locator(mdates.YearLocator())
ax1.xaxis.set_major_formatter(mdates.DateFormatter("%Y"))
ax1.legend(fontsize=9)

context = slice(-HOLD_OUT - 3 * 52, -HOLD_OUT)
ax2.plot(dates[context], levels[context], color="k", lw=0.8, label="training data")
ax2.plot(dates[-HOLD_OUT:], test_levels, color="k", lw=2, label="held out")
for seed in (0, 1, 2):
    ax2.plot(dates[-HOLD_OUT:], runs[52, seed]["future"], color="C0", lw=1.2,
             label="LSTM, k2 = 52 (3 seeds)" if seed == 0 else None)
    ax2.plot(dates[-HOLD_OUT:], runs[13, seed]["future"], color="C1", lw=1, ls="--",
             label="LSTM, k2 = 13 (3 seeds)" if seed == 0 else None)
ax2.plot(dates[-HOLD_OUT:], baselines["seasonal naive"], color="C2", lw=1, label="seasonal naive")
ax2.axvline(dates[-HOLD_OUT], color="gray", lw=0.8)
ax2.set(ylabel="ppm", title="free-running forecast of 2000-2001")
ax2.legend(fontsize=8, loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Result
#
# Measured in this run (CPU, one thread; the tables above), forecasting the 104 held-out weeks of 2000-2001
# free-running from the end of 1999:
#
# - With a year of backprop (`k2 = 52`) the LSTM's forecast has an RMSE of 0.65, 0.79 and 0.61 ppm for the
#   three seeds, 0.68 ppm on average (MAE 0.52), against 2.12 ppm for the seasonal naive forecast and 2.49 for
#   the naive one: about a third of the seasonal naive error. It is on a par with the seasonal naive + drift
#   reference (0.72 ppm), which is hard to beat on a series this regular.
# - With `k2 = k1 = 13`, the most Ignite's trainer can do, the same model and budget give 1.17, 2.08 and
#   1.69 ppm, 1.65 on average: 2.4 times the error of `k2 = 52`, and far apart from seed to seed. A quarter
#   of backprop does not span the yearly cycle, and the free-running forecasts drift out of phase (the dashed
#   lines).
# - One step ahead, the model explains 51% of the variance of the weekly change; the rest is week-to-week
#   noise that no model of the cycle can predict (left panel).
#
# Each `k2 = 52` model trains in about 5 s on one core, a `k2 = 13` one in about 2 s.

# %%
# The claims above, checked on every run of this notebook.
mean_rmse = {k2: np.mean([rmse(runs[k2, seed]["future"]) for seed in (0, 1, 2)]) for k2 in (52, 13)}
assert mean_rmse[52] < rmse(baselines["seasonal naive"]), "k2 = 52 should beat the seasonal naive forecast"
assert mean_rmse[52] < mean_rmse[13], "a year of backprop should forecast better than a quarter"
