"""Under ignite.distributed, 2 processes on half-batches train exactly like 1 process on whole batches.

The test spawns its own gloo processes with ``idist.Parallel``; each rank gets half of every batch.
"""

import socket

import pytest
import torch
import ignite.distributed as idist
from torch import nn

from ignite_tbptt import StreamBatches, create_supervised_tbptt_trainer
from tests.models import make_data, make_model

CASES = [  # (name, k1, k2, overlap, wrap in DistributedDataParallel)
    ("k2 == k1", 3, 3, "recompute", False),
    # StreamBatches of documents: resets and masked pairs leave the two shards with different loss counts
    ("documents, recompute", 3, 5, "recompute", False),
    ("documents, retain", 2, 5, "retain", False),
    # skip_nonfinite: a NaN in rank 1's half of batch 1 skips the same updates on both processes
    ("skip_nonfinite", 3, 5, "retain", False),
    ("recompute", 3, 7, "recompute", False),
    ("retain", 3, 7, "retain", False),
    ("retain k1 == 1", 1, 4, "retain", False),
    ("DDP, k2 == k1", 3, 3, "retain", True),
    ("DDP, recompute", 3, 7, "recompute", True),
]


def batches():
    x, y = make_data(24, batch=4, seed=5)
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # one stream in two batches


def documents():
    g = torch.Generator().manual_seed(6)
    return [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (7, 12, 5, 9, 15, 4)]


def train(k1, k2, overlap, ddp, rank=0, world=1, name=""):
    model = make_model("LSTM")
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    half = 4 // world
    if name.startswith("documents"):  # rank r's rows of a global batch of 4: StreamBatches shards itself
        data = StreamBatches(documents(), batch_size=4, seq_len=6, rank=rank, world_size=world)
    else:
        whole = batches()
        if name == "skip_nonfinite":
            whole[0][0][4:, 3] = float("nan")  # sample 3 (rank 1's half), chunks 2 to 4 of the first batch
        data = [(x[:, rank * half : (rank + 1) * half], y[:, rank * half : (rank + 1) * half]) for x, y in whole]
    # Without carried state the second batch trains afresh, so the skipped updates are followed by real ones.
    options = {"skip_nonfinite": True, "carry_state": False} if name == "skip_nonfinite" else {"carry_state": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_supervised_tbptt_trainer(
        model, optimizer, nn.MSELoss(), tbtt_step=k1, k2=k2, overlap=overlap, **options
    )
    trainer.run(data, max_epochs=2)
    module = model.module if ddp else model
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def worker(local_rank, out_dir):
    rank, world = idist.get_rank(), idist.get_world_size()
    results = {name: train(k1, k2, overlap, ddp, rank, world, name) for name, k1, k2, overlap, ddp in CASES}
    try:
        train(3, 7, "retain", True, rank, world)
    except ValueError as error:
        results["refused"] = str(error)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=free_port()) as parallel:
        parallel.run(worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_on_half_batches_train_like_one_on_whole_batches(two_process_results, case):
    name, k1, k2, overlap, ddp = case
    single = train(k1, k2, overlap, False, name=name)
    for rank in range(2):
        for param, value in two_process_results[rank][name].items():
            torch.testing.assert_close(value, single[param], rtol=0, atol=1e-10, msg=f"rank {rank}, {param}")


def test_ddp_is_refused_where_it_cannot_reduce(two_process_results):
    assert "DistributedDataParallel" in two_process_results[0]["refused"]


def test_halves_alone_train_differently():
    # Without averaging, a half-batch run ends elsewhere: the comparison above can fail.
    half, single = train(3, 7, "retain", False, rank=0, world=2), train(3, 7, "retain", False)
    assert any(not torch.allclose(half[n], single[n]) for n in single)
