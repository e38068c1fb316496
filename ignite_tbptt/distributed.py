"""Data parallelism without ``DistributedDataParallel``: the trainer averages the gradients itself.

TBPTT(k1, k2) in ``retain`` mode backpropagates one forward pass in several backward calls, which DDP's
reducer cannot follow; averaging the gradients by hand before each optimizer step works in every mode.
"""

from typing import Any, Union

import ignite.distributed as idist
import torch
from torch import nn

__all__ = ["average_gradients", "is_ddp"]


def is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def average_gradients(model: nn.Module, weight: Union[float, torch.Tensor] = 1.0) -> None:
    """Average the parameters' gradients across processes (``ignite.distributed``), in one all-reduce.

    Each process' gradients count with its ``weight``, the number of loss terms they average (the trainer
    passes the valid (step, sample) pairs since the last step). For a mean-reducing loss the result is then
    the gradient of the mean over all processes' terms, as one process on the whole batch computes it, also
    when padding or masked pairs leave the processes with different counts. Equal weights give the plain
    mean. A parameter without a gradient counts as zero, so that every process joins the same reduction.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    weight = torch.as_tensor(weight, dtype=grads.dtype, device=grads.device).reshape(1)
    flat = idist.all_reduce(torch.cat([grads * weight, weight]))
    total = flat[-1]
    flat = flat[:-1] / torch.where(total > 0, total, torch.ones_like(total))  # no weight anywhere: zeros
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
