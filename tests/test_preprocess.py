"""preprocess.py: hand-checked values, channel conversion, resize, mean/std."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from streamkd.learn.preprocess import resize_uint8, to_model_input

RNG = np.random.default_rng(0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_normalize_2x2_by_hand() -> None:
    x = _u8([[[[0, 255], [51, 102]]]])  # 1×1×2×2
    out = to_model_input(x, (2, 2), 1, [0.5], [0.5])
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0], [-0.6, -0.2]]]]))


def test_per_channel_mean_std_and_broadcast() -> None:
    x = _u8([[[[255]], [[0]], [[51]]]])  # 1×3×1×1
    out = to_model_input(x, (1, 1), 3, [0.5, 0.0, 0.2], [0.5, 2.0, 0.1])
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 0.0, 0.0]))
    one = to_model_input(x, (1, 1), 3, [0.25], [0.5])
    three = to_model_input(x, (1, 1), 3, [0.25] * 3, [0.5] * 3)
    torch.testing.assert_close(one, three)


def test_rgb_to_gray_uses_bt601_luma() -> None:
    x = _u8([[[[255, 0, 0]], [[0, 255, 0]], [[0, 0, 255]]]])  # 1×3×1×3: red, green, blue
    out = to_model_input(x, (1, 3), 1, [0.0], [1.0])
    assert out.shape == (1, 1, 1, 3)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.299, 0.587, 0.114]))


def test_gray_to_rgb_repeats_then_normalizes_per_channel() -> None:
    x = _u8([[[[0, 255]]], [[[102, 51]]]])  # 2×1×1×2
    out = to_model_input(x, (1, 2), 3, [0.0, 0.2, 0.4], [1.0, 1.0, 0.5])
    assert out.shape == (2, 3, 1, 2) and out.is_contiguous()
    base = x.float() / 255
    torch.testing.assert_close(out[:, 0:1], base)
    torch.testing.assert_close(out[:, 1:2], base - 0.2)
    torch.testing.assert_close(out[:, 2:3], (base - 0.4) / 0.5)


def test_resize_by_hand_and_constant_images() -> None:
    # 1×4 -> 1×2 antialiased bilinear: each output is a triangle-weighted mean
    # with weights (3, 3, 1)/7 from the 3 nearest inputs (PIL's BILINEAR too).
    x = _u8([[[[0, 0, 255, 255]]]])
    out = to_model_input(x, (1, 2), 1, [0.0], [1.0 / 255])
    torch.testing.assert_close(out.flatten(), torch.tensor([255 / 7, 255 * 6 / 7]))

    const = torch.full((3, 3, 17, 23), 77, dtype=torch.uint8)
    for size in ((8, 8), (40, 31), (17, 23)):
        out = to_model_input(const, size, 3, [0.0], [1.0 / 255])
        assert out.shape == (3, 3, *size)
        torch.testing.assert_close(out, torch.full_like(out, 77.0))


def test_empty_batch() -> None:
    out = to_model_input(torch.zeros(0, 3, 5, 5, dtype=torch.uint8), (4, 4), 1, [0.5], [0.5])
    assert out.shape == (0, 1, 4, 4)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mean": [0.1, 0.2]}, "mean has 2 values; expected 1 or 3"),
    ({"std": [0.1, 0.2]}, "std has 2 values"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be non-zero"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"size": (0, 4)}, "size must be"),
    ({"images": torch.zeros(1, 3, 4, 4)}, "uint8"),
    ({"images": torch.zeros(3, 4, 4, dtype=torch.uint8)}, "N×C×H×W"),
    ({"images": torch.zeros(1, 4, 4, 4, dtype=torch.uint8)}, "C in"),
])
def test_to_model_input_errors(kwargs: dict, match: str) -> None:
    args = {"images": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "size": (4, 4),
            "channels": 3, "mean": [0.5], "std": [0.5]} | kwargs
    with pytest.raises(ValueError, match=match):
        to_model_input(**args)


def test_resize_uint8_noop_returns_input() -> None:
    img = torch.zeros(3, 8, 9, dtype=torch.uint8)
    assert resize_uint8(img, (8, 9), 3) is img


def test_resize_uint8_matches_pil_bilinear() -> None:
    hwc = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    for size in ((16, 24), (50, 70)):  # down and up
        out = resize_uint8(img, size, 3)
        assert out.dtype == torch.uint8 and out.shape == (3, *size) and out.is_contiguous()
        ref = np.array(Image.fromarray(hwc).resize(size[::-1], Image.Resampling.BILINEAR))
        diff = (out.permute(1, 2, 0).int() - torch.from_numpy(ref).int()).abs()
        assert int(diff.max()) <= 1


def test_resize_uint8_channel_conversions() -> None:
    hwc = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    img = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    gray = resize_uint8(img, (10, 12), 1)  # 3 -> 1 only
    ref = torch.from_numpy(np.asarray(Image.fromarray(hwc).convert("L")).copy())
    assert gray.shape == (1, 10, 12)
    assert int((gray[0].int() - ref.int()).abs().max()) <= 1

    small = resize_uint8(img, (5, 6), 1)  # 3 -> 1 and resize
    assert small.shape == (1, 5, 6) and small.dtype == torch.uint8

    one = torch.from_numpy(hwc[..., 0].copy())[None]
    rgb = resize_uint8(one, (20, 24), 3)  # 1 -> 3 and resize
    assert rgb.shape == (3, 20, 24) and rgb.is_contiguous()
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert torch.equal(rgb[:1], resize_uint8(one, (20, 24), 1))


def test_resize_uint8_rounds_and_clamps() -> None:
    img = _u8([[[0, 255, 0, 255]]])  # 1×1×4: sharp edges overshoot nothing, stay in range
    out = resize_uint8(img, (3, 9), 1)
    assert out.dtype == torch.uint8 and int(out.max()) <= 255 and int(out.min()) >= 0
    const = torch.full((1, 5, 5), 200, dtype=torch.uint8)
    assert torch.equal(resize_uint8(const, (3, 7), 1), torch.full((1, 3, 7), 200, dtype=torch.uint8))


def test_resize_uint8_errors() -> None:
    with pytest.raises(ValueError, match="C×H×W"):
        resize_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2), 3)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        resize_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8), (2, 2), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_same_results_on_every_device(device: str) -> None:
    x = torch.from_numpy(RNG.integers(0, 256, (2, 3, 30, 40), dtype=np.uint8))
    cpu = to_model_input(x, (16, 16), 1, [0.5], [0.25])
    out = to_model_input(x.to(device), (16, 16), 1, [0.5], [0.25])
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-5)
    r = resize_uint8(x[0].to(device), (17, 19), 3)
    assert r.device.type == device and r.dtype == torch.uint8
    assert int((r.cpu().int() - resize_uint8(x[0], (17, 19), 3).int()).abs().max()) <= 1
