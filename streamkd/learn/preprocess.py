"""uint8 images -> model input: channel conversion, resize, normalization.

Pure tensor math on whatever device the images are on. Channels are converted
before resizing when that shrinks the work (3->1) and after it when it grows it
(1->3, which normalization's broadcasting does for free).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses


def to_model_input(images: torch.Tensor, size: tuple[int, int], channels: int,
                   mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×C×H×W (C in {1,3}, any device) -> float32 N×channels×size[0]×size[1],
    `(x/255 - mean) / std` per channel. mean/std: 1 value (broadcast) or `channels`."""
    _check_images(images, "images", ndim=4)
    h, w = _check_size(size)
    _check_channels(channels)
    if any(float(s) == 0.0 for s in std):  # checked on the host: no device sync
        raise ValueError(f"std must be non-zero, got {list(std)}")
    scale, bias = _affine(tuple(map(float, mean)), tuple(map(float, std)), channels, images.device)

    x = images.float()
    if x.shape[1] == 3 and channels == 1:
        x = _luma(x)  # before resizing: a third of the resize work
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    # One fused pass: x * 1/(255 std) - mean/std. A 1-channel x broadcasts against
    # 3-channel mean/std, which is the 1->3 repeat without materializing it first.
    return torch.addcmul(bias, x, scale)


@functools.lru_cache(maxsize=32)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], channels: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each 1×channels×1×1 float32 on ``device``, built once per setting: a fresh
    host->device copy of two tiny tensors on every batch can stall the CUDA stream."""
    mean_t = _per_channel(mean, "mean", channels, torch.device("cpu"))
    std_t = _per_channel(std, "std", channels, torch.device("cpu"))
    scale = (1.0 / (255.0 * std_t)).view(1, channels, 1, 1)
    bias = (-mean_t / std_t).view(1, channels, 1, 1)
    return scale.to(device), bias.to(device)


def resize_uint8(image: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """One uint8 C×H×W image (C in {1,3}) -> uint8 channels×size[0]×size[1],
    antialiased bilinear, rounded and clamped. Returns `image` itself (no copy)
    when it already has that shape. Used to collate mixed-size records."""
    _check_images(image, "image", ndim=3)
    h, w = _check_size(size)
    _check_channels(channels)
    if image.shape[0] == channels and tuple(image.shape[1:]) == (h, w):
        return image

    x = image[None]
    if x.shape[1] == 3 and channels == 1:
        x = _to_uint8(_luma(x.float()))  # before resizing: a third of the work
    if tuple(x.shape[2:]) != (h, w):
        if x.device.type == "cpu":
            # CPU has a native uint8 antialias kernel (faster than going through float);
            # it rounds internally and differs from the float path by at most 1.
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        else:
            x = _to_uint8(F.interpolate(x.float(), size=(h, w), mode="bilinear",
                                        antialias=True, align_corners=False))
    if x.shape[1] != channels:  # 1 -> 3, after resizing: a third of the work
        x = x.expand(-1, channels, -1, -1)
    return x[0].contiguous()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """float N×3×H×W RGB -> float N×1×H×W BT.601 luma, same scale."""
    return (x * _luma_weights(x.dtype, x.device)).sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=8)
def _luma_weights(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(LUMA, dtype=dtype, device=device).view(1, 3, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def _per_channel(values: Sequence[float], name: str, channels: int,
                 device: torch.device) -> torch.Tensor:
    values = list(values)
    if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} values; expected 1 or {channels} (channels)")
    t = torch.tensor(values, dtype=torch.float32, device=device)
    return t.expand(channels) if len(values) == 1 else t


def _check_images(t: torch.Tensor, name: str, ndim: int) -> None:
    if t.dtype != torch.uint8 or t.dim() != ndim or t.shape[-3] not in (1, 3):
        layout = "N×C×H×W" if ndim == 4 else "C×H×W"
        raise ValueError(f"{name} must be uint8 {layout} with C in (1, 3), "
                         f"got {t.dtype} {tuple(t.shape)}")


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"size must be two positive ints (H, W), got {size}")
    return int(h), int(w)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
