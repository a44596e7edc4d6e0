"""Where the models run and in which precision: the device a spec names, and the autocast context."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "resolve_device"]


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` as named.

    ValueError for any other spec, and for CUDA on a machine (or torch build) without it.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in ("cpu", "cuda") and not (spec.startswith("cuda:") and spec[5:].isascii() and spec[5:].isdigit()):
        raise ValueError(f"Invalid device {spec!r}. Valid: auto, cpu, cuda, cuda:N")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available (torch {torch.__version__})")
    return torch.device(spec)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` (bf16, fp16) for forward passes on `device`; no change for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
