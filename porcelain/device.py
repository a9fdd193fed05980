"""Device and dtype choice: CPU here, CUDA (fp16/bf16) for users who have a GPU."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "fp32", "fp16", "bf16"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU. Asking for an absent device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return torch.device(name)


def choose_dtype(name: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Compute dtype for autocast. ``auto``: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    device = device or choose_device("auto")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    if device.type == "cpu" and name == "fp16":
        raise ValueError("fp16 autocast is not supported on CPU; use fp32 or bf16")
    return _DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context: a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=(device.type == "cuda" and dtype == torch.float16))
