"""Inference-time speedups for the frozen teacher that do not change its function.

* Conv-BatchNorm folding (``torch.fx``): one conv instead of conv + BN per layer.
* channels_last memory format: the layout oneDNN (CPU) and cuDNN (tensor cores) prefer.
* bf16 where the hardware has native bf16 math (:func:`native_bf16`; chosen by
  ``teacher.precision: auto``).

Folding and channels_last leave the logits equal up to float rounding; bf16 changes them
slightly (the README's Results section has the measured speed and agreement, with the hardware
and the command). Without native bf16 units oneDNN emulates bf16, which can be slower than fp32,
hence the hardware check.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls/convolutions run on native units: CUDA GPUs that support bf16,
    x86 CPUs with AVX512-BF16 or AMX. (``torch.backends.mkldnn`` reports bf16 as supported on any
    AVX512 CPU, but there it is emulated.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv→BN pairs folded into the conv (eval mode only). Returns ``model`` unchanged if it cannot be traced."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model.eval(), inplace=False)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, exported programs...: run unfused
        log.info("teacher not folded (%s: %s); running it as is", type(e).__name__, e)
        return model


def optimize_for_inference(model: nn.Module, channels_last: bool) -> nn.Module:
    """The teacher as it runs in the loop: eval, BN folded, optionally channels_last."""
    model = fold_batchnorm(model.eval())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
