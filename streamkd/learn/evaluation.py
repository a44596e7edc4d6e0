"""Top-1 predictions of a model on a labelled set, and the figures derived from them.

`predict` is the one forward loop; `evaluate` (accuracy) and `agreement` (how
often two models pick the same class) are views of its output. Used by
``streamkd eval``, ``streamkd train-teacher`` (test accuracy per epoch) and the demo.
"""

from __future__ import annotations

import torch
from torch import nn

from streamkd.learn.device import autocast
from streamkd.learn.learner import InputSpec
from streamkd.learn.preprocess import to_model_input

__all__ = ["agreement", "evaluate", "predict"]


def predict(
    model: nn.Module,
    images: torch.Tensor,
    spec: InputSpec,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Top-1 class of each image: uint8 N×C×H×W (any size/channels `spec` can convert) -> int64 N (CPU).

    Runs in eval mode under inference_mode, preprocessing with `to_model_input`
    batch by batch on the model's device (`device`, when given, moves the
    model there first), under autocast to `amp` when given (bf16, fp16); the
    model's train/eval mode is restored. The predictions stay on the device
    until the end: one host sync per call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        model.to(device)
    ref = next(iter([*model.parameters(), *model.buffers()]), None)
    device = ref.device if ref is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, images.shape[0], batch_size):
                x = to_model_input(images[i:i + batch_size].to(device, non_blocking=True),
                                   spec.size, spec.channels, spec.mean, spec.std)
                with autocast(device, amp):
                    logits = model(x)
                out.append(logits.argmax(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.int64)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: InputSpec,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, float | int]:
    """Top-1 accuracy of `model` on uint8 N×C×H×W `images` with int64 N `labels`: {"acc", "n"}."""
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    pred = predict(model, images, spec, batch_size, device, amp)
    n = int(labels.shape[0])
    return {"acc": float((pred == labels.cpu()).sum()) / n if n else float("nan"), "n": n}


def agreement(
    model_a: nn.Module,
    model_b: nn.Module,
    images: torch.Tensor,
    spec_a: InputSpec,
    spec_b: InputSpec | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Fraction of uint8 N×C×H×W `images` on which both models pick the same top-1 class: {"agreement", "n"}.

    Each model gets its own preprocessing (`spec_b` defaults to `spec_a`).
    """
    pa = predict(model_a, images, spec_a, batch_size, device)
    pb = predict(model_b, images, spec_b or spec_a, batch_size, device)
    n = int(images.shape[0])
    return {"agreement": float((pa == pb).sum()) / n if n else float("nan"), "n": n}
