"""Data parallelism without ``DistributedDataParallel``: the trainer averages the gradients itself.

TBPTT(k1, k2) in ``retain`` mode backpropagates one forward pass in several backward calls, which DDP's
reducer cannot follow; averaging the gradients by hand before each optimizer step works in every mode.
"""

from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

__all__ = ["average_gradients", "is_ddp"]


def is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def average_gradients(model: nn.Module) -> None:
    """Average the parameters' gradients across processes (``ignite.distributed``), in one all-reduce.

    A parameter without a gradient counts as zero, so that every process joins the same reduction.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = idist.all_reduce(flat) / idist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
