"""Inference-time speedups for the frozen teacher that do not change its function.

* Conv-BatchNorm folding (``torch.fx``): one conv instead of conv + BN per layer.
* channels_last memory format: the layout oneDNN (CPU) and cuDNN (tensor cores) prefer.

Measured on this project's 2-core CPU (``streamkd:fmnist_cnn``, batch 64, fp32, three
alternating rounds in one run): plain 590-645 img/s, folded + channels_last 853-985 img/s
(about 1.5x), max |logit difference| ~2e-6. bf16 autocast on that CPU was slower than fp32.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


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
