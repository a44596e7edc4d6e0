"""Inference-time speedups for the frozen teacher that do not change its function.

* Conv-BatchNorm folding (``torch.fx``): one conv instead of conv + BN per layer.
* channels_last memory format: the layout oneDNN (CPU) and cuDNN (tensor cores) prefer.
* bf16 where the hardware has native bf16 math (:func:`native_bf16`; chosen by
  ``teacher.precision: auto``).

Measured on this project's 2-core CPU (``streamkd:fmnist_cnn``, batch 64, fp32, three
alternating rounds in one run): plain 590-645 img/s, folded + channels_last 853-985 img/s
(about 1.5x), max |logit difference| ~2e-6. On a 2-core AMD EPYC with AVX512-BF16
(torch 2.14): folded + channels_last fp32 811 img/s, bf16 autocast 1,824 img/s (2.25x);
on the Fashion-MNIST test set the bf16 teacher scores 0.9469 vs 0.9464, agrees with fp32 on
99.91 % of argmaxes, mean KL between the T=4 soft targets 2.7e-6. Without native bf16 units
oneDNN emulates bf16 (an earlier measurement on this project's CPU box found bf16 autocast slower
than fp32), hence the hardware check.
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
