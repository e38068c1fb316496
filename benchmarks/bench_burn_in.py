"""Burn-in on a simulated system: identifying a linear system whose sequences start from an unknown state.

Each sequence of a second-order linear system starts from a random state far from rest. A GRU reads the input
``u_t`` and the previous output ``y_{t-1}`` and predicts ``y_t``; it starts every sequence from a zero state, so
its first predictions cannot know where the system started. Trained on every step, it spends its capacity on
those transients; with ``burn_in=b`` it warms its state up on the first ``b`` steps without scoring them.
Both are scored on the steps after the first ``b`` of fresh test sequences (the evaluator's ``burn_in``),
mean of several seeds.

    python benchmarks/bench_burn_in.py            # 4 seeds, about a minute on 2 cores
    python benchmarks/bench_burn_in.py --quick
"""

import argparse
import statistics
import time

import torch
from ignite.metrics import MeanSquaredError
from torch import nn

import bench_common  # noqa: F401  (puts this checkout's ignite_tbptt first on the path)
from ignite_tbptt import create_supervised_tbptt_evaluator, create_supervised_tbptt_trainer

A = torch.tensor([[0.97, 0.15], [-0.15, 0.97]])  # a slowly decaying rotation: transients last tens of steps
B, C = torch.tensor([0.3, 0.1]), torch.tensor([1.0, 0.5])


def sequences(n: int, T: int, generator: torch.Generator, noise: float = 0.05):
    """``(inputs, targets)`` of ``n`` sequences: inputs ``(u_t, y_{t-1})``, targets ``y_t``; ``(T, n, ...)``."""
    state = 3.0 * torch.randn(n, 2, generator=generator)  # far from rest, and unknown to the model
    u = torch.randn(T, n, generator=generator)
    ys = []
    for t in range(T):
        state = state @ A.T + u[t].unsqueeze(1) * B
        ys.append(state @ C + noise * torch.randn(n, generator=generator))
    y = torch.stack(ys)
    previous = torch.cat([torch.zeros(1, n), y[:-1]])
    return torch.stack([u, previous], -1), y.unsqueeze(-1)


class Net(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, hidden), nn.Linear(hidden, 1)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


def run(seed: int, burn_in: int, warm: int, batches: int, T: int) -> float:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    data = [sequences(32, T, g) for _ in range(batches)]
    model = Net()
    trainer = create_supervised_tbptt_trainer(
        model, torch.optim.Adam(model.parameters(), lr=3e-3), nn.MSELoss(), tbtt_step=20, burn_in=burn_in,
    )
    trainer.run(data, max_epochs=3)
    test = [sequences(256, T, torch.Generator().manual_seed(99))]
    flat = lambda x, y, y_pred: (y_pred.reshape(-1), y.reshape(-1))  # noqa: E731
    evaluator = create_supervised_tbptt_evaluator(model, {"mse": MeanSquaredError()}, tbtt_step=20, burn_in=warm,
                                                  output_transform=flat)
    return evaluator.run(test).metrics["mse"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 4)
    batches, T, warm = (4, 40, 20) if args.quick else (40, 80, 20)
    rows = []
    for burn_in in (0, 5, warm):
        start = time.perf_counter()
        errors = [run(seed, burn_in, warm, batches, T) for seed in range(seeds)]
        rows.append((burn_in, errors, time.perf_counter() - start))
    print(f"Burn-in on a simulated linear system: {batches} batches of 32 sequences x {T} steps, 3 epochs, "
          f"GRU(16), k1 = 20; test MSE over steps {warm + 1}..{T} of 256 fresh sequences, {seeds} seed(s)\n")
    print("| trained with | test MSE, mean | per seed | s |")
    print("|---|---|---|---|")
    for burn_in, errors, seconds in rows:
        label = "every step scored" if burn_in == 0 else f"burn_in={burn_in}"
        print(f"| {label} | {statistics.fmean(errors):.4f} | {', '.join(f'{e:.4f}' for e in errors)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
