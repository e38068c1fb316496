"""Mixed precision for the trainer and the evaluator: the device type, ``torch.autocast`` and the grad scaler."""

import contextlib
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn

__all__ = ["amp_context", "device_type", "grad_scaler"]


def device_type(device: Optional[Union[str, torch.device]], model: Any) -> str:
    if device is not None:
        return torch.device(device).type
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return "cpu" if param is None else param.device.type


def amp_context(amp_mode: Optional[str], device_type: str) -> Callable[[], ContextManager]:
    """``torch.autocast`` for the device (float16 on CUDA, bfloat16 on CPU), or nothing without AMP."""
    if amp_mode is None:
        return contextlib.nullcontext
    if amp_mode != "amp":
        raise ValueError(f'amp_mode must be None or "amp", got {amp_mode!r}')
    return lambda: torch.autocast(device_type=device_type)


def grad_scaler(scaler: Union[bool, "torch.amp.GradScaler"], amp_mode: Optional[str], device_type: str) -> Any:
    if scaler is False or scaler is None:
        return None
    if amp_mode != "amp":
        raise ValueError('a scaler needs amp_mode="amp"')
    if scaler is True:
        return torch.amp.GradScaler(device_type)
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a bool or a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler
