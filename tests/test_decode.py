"""decode.py: formats, headers, limits, corrupt input, and never raising."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from streamkd.ingest.decode import (
    REASONS,
    Decoded,
    Limits,
    Rejected,
    decode_record,
    sniff_format,
)

# decode must not warn on any input (a warning is global output and, under
# -W error, an exception): turning warnings into errors makes any that do
# surface as a Rejected that the exact-outcome tests catch.
pytestmark = pytest.mark.filterwarnings("error")

LIMITS = Limits()
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- encoders

def _pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray, **kw) -> bytes:
    return _pil_bytes(Image.fromarray(arr), "PNG", **kw)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    return _pil_bytes(Image.fromarray(arr), "JPEG", **kw)


def _webp(arr: np.ndarray, **kw) -> bytes:
    return _pil_bytes(Image.fromarray(arr), "WEBP", **kw)


def _npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 127 // max(h + w - 2, 1)], -1).astype(np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_by_hand(w: int, h: int, idat: bytes) -> bytes:
    """An 8-bit grayscale PNG with a hand-written IHDR (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _decoded(value, headers=None, limits=LIMITS) -> Decoded:
    out = decode_record(value, headers, limits)
    assert isinstance(out, Decoded), out
    return out


def _reason(value, headers=None, limits=LIMITS) -> str:
    out = decode_record(value, headers, limits)
    assert isinstance(out, Rejected), out
    assert out.reason in REASONS
    return out.reason


def _nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None]


# ---------------------------------------------------------------- formats

def test_sniff_format() -> None:
    assert sniff_format(_png(np.zeros((2, 2), np.uint8))) == "png"
    assert sniff_format(_jpeg(np.zeros((8, 8), np.uint8))) == "jpeg"
    assert sniff_format(_webp(np.zeros((8, 8, 3), np.uint8))) == "webp"
    assert sniff_format(_npy(np.zeros((2, 2), np.uint8))) == "npy"
    assert sniff_format(b"GIF89a......") is None
    assert sniff_format(b"RIFF\0\0\0\0WAVE") is None
    assert sniff_format(b"") is None


def test_png_gray_and_rgb_roundtrip_exact() -> None:
    gray = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    out = _decoded(_png(gray)).images
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 28, 28) and out.is_contiguous()
    assert torch.equal(out[0, 0], torch.from_numpy(gray))

    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _decoded(_png(rgb)).images
    assert out.shape == (1, 3, 5, 7) and out.is_contiguous()
    assert torch.equal(out, _nchw(rgb))


def test_png_modes_convert_to_1_or_3_channels() -> None:
    rgba = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    assert torch.equal(_decoded(_png(rgba)).images, _nchw(rgba[..., :3]))  # alpha dropped

    la = Image.fromarray(RNG.integers(0, 256, (4, 5, 2), dtype=np.uint8), "LA")
    out = _decoded(_pil_bytes(la, "PNG")).images
    assert torch.equal(out[0, 0], torch.from_numpy(np.asarray(la)[..., 0].copy()))

    bits = Image.fromarray(np.array([[0, 1], [1, 0]], bool))
    assert _decoded(_pil_bytes(bits, "PNG")).images[0, 0].tolist() == [[0, 255], [255, 0]]

    g16 = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0..65535
    out = _decoded(_pil_bytes(Image.fromarray(g16), "PNG")).images
    assert out.shape == (1, 1, 4, 4)
    assert torch.equal(out[0, 0], torch.from_numpy((g16 >> 8).astype(np.uint8)))

    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1, 0, 0, 1])
    # tRNS on a P image makes PIL's convert("RGB") warn unless we drop it first.
    out = _decoded(_pil_bytes(pal, "PNG", transparency=bytes([0, 128]))).images
    assert out.shape == (1, 3, 2, 3)
    assert out[0, :, 0, 0].tolist() == [10, 20, 30] and out[0, :, 0, 1].tolist() == [200, 100, 50]


def test_tiny_rgb_image_is_writable_and_owned() -> None:
    out = _decoded(_png(np.full((1, 1, 3), 9, np.uint8))).images
    out.add_(1)  # would fail or warn on PIL's read-only buffer
    assert out.flatten().tolist() == [10, 10, 10]


def test_jpeg_rgb_close_gray_and_cmyk() -> None:
    rgb = _smooth_rgb(224, 224)
    out = _decoded(_jpeg(rgb, quality=95)).images
    assert out.shape == (1, 3, 224, 224)
    assert (out.float() - _nchw(rgb).float()).abs().mean() < 2.0

    gray = rgb[..., 0]
    out = _decoded(_jpeg(gray, quality=95)).images
    assert out.shape == (1, 1, 224, 224)
    assert (out[0, 0].float() - torch.from_numpy(gray).float()).abs().mean() < 2.0

    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = _decoded(_pil_bytes(cmyk, "JPEG", quality=95)).images
    assert out.shape == (1, 3, 224, 224)
    assert (out.float() - _nchw(rgb).float()).abs().mean() < 4.0


def test_webp_lossless_exact_and_lossy_close() -> None:
    rgb = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    assert torch.equal(_decoded(_webp(rgb, lossless=True)).images, _nchw(rgb))

    smooth = _smooth_rgb(64, 64)
    out = _decoded(_webp(smooth, quality=95)).images
    assert out.shape == (1, 3, 64, 64)
    assert (out.float() - _nchw(smooth).float()).abs().mean() < 4.0


def test_animated_images_take_first_frame() -> None:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
        out = _decoded(buf.getvalue()).images
        assert out.shape == (1, 3, 4, 4) and int(out.max()) == int(out.min()) == 10, fmt


@pytest.mark.parametrize(("shape", "expect"), [
    ((5, 7), (1, 1, 5, 7)),             # HxW
    ((5, 7, 1), (1, 1, 5, 7)),          # HxWx1
    ((5, 7, 3), (1, 3, 5, 7)),          # HxWx3
    ((5, 7, 4), (1, 3, 5, 7)),          # HxWx4: alpha dropped
    ((2, 5, 7, 3), (2, 3, 5, 7)),       # NHWC
    ((2, 3, 5, 7), (2, 3, 5, 7)),       # NCHW
    ((2, 1, 28, 28), (2, 1, 28, 28)),   # NCHW gray
    ((2, 4, 5, 7), (2, 3, 5, 7)),       # NCHW with alpha
    ((2, 3, 4, 3), (2, 3, 3, 4)),       # tie: channels-last wins
])
def test_npy_layouts(shape: tuple[int, ...], expect: tuple[int, ...]) -> None:
    arr = RNG.integers(0, 256, shape, dtype=np.uint8)
    out = _decoded(_npy(arr)).images
    assert out.shape == expect and out.dtype == torch.uint8 and out.is_contiguous()
    if len(shape) == 2:
        ref = arr[None, None]
    elif len(shape) == 3:
        ref = arr.transpose(2, 0, 1)[None]
    elif shape[3] in (1, 3, 4):
        ref = arr.transpose(0, 3, 1, 2)
    else:
        ref = arr
    assert torch.equal(out, torch.from_numpy(np.ascontiguousarray(ref[:, :3])))


def test_npy_fortran_order_and_v2_header_and_owned_memory() -> None:
    arr = np.asfortranarray(RNG.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8))
    value = _npy(arr)
    assert b"'fortran_order': True" in value
    out = _decoded(value).images
    assert torch.equal(out, torch.from_numpy(arr.transpose(0, 3, 1, 2).copy()))

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr[0, :, :, 0].copy(), version=(2, 0))
    out = _decoded(buf.getvalue()).images
    assert torch.equal(out[0, 0], torch.from_numpy(arr[0, :, :, 0].copy()))
    out.fill_(0)  # owns writable memory, not a view of the record bytes


# ---------------------------------------------------------------- headers

@pytest.mark.parametrize(("raw", "label"), [
    (b"7", 7), (b" 42\n", 42), (b"0", 0), ("3", 3), (b"999999", 999_999), (None, None),
])
def test_label_header_parses(raw, label) -> None:
    value = _npy(np.zeros((2, 2), np.uint8))
    assert _decoded(value, [("label", raw)]).label == label
    assert _decoded(value, [("LaBeL", raw)]).label == label  # names are case-insensitive


def test_no_headers_means_no_label() -> None:
    value = _npy(np.zeros((2, 2), np.uint8))
    assert _decoded(value, None).label is None
    assert _decoded(value, []).label is None
    assert _decoded(value, [("key", b"cam-1")]).label is None


@pytest.mark.parametrize("raw", [b"-1", b"+1", b"abc", b"1e3", b"", b"1.0", "²".encode(),
                                 b"\xff", b"1000000", b"9" * 5000])
def test_bad_label(raw: bytes) -> None:
    assert _reason(_npy(np.zeros((2, 2), np.uint8)), [("label", raw)]) == "bad_label"


def test_content_type() -> None:
    png = _png(np.zeros((2, 2), np.uint8))
    for ctype in (b"image/png", b"IMAGE/PNG", b"image/png; q=1", b"application/x-npy"):
        _decoded(png, [("Content-Type", ctype)])  # known types: magic bytes decide
    for ctype in (b"text/plain", b"image/gif", b"", b"image/\xffpng"):
        assert _reason(png, [("content-type", ctype)]) == "unknown_format"


# ---------------------------------------------------------------- limits

def test_too_large_is_checked_first() -> None:
    limits = Limits(max_bytes=100)
    assert _reason(b"x" * 101, [("label", b"bad")], limits) == "too_large"
    ok = _npy(np.zeros((2, 2), np.uint8))
    assert _decoded(ok, limits=Limits(max_bytes=len(ok)))  # exactly at the limit


def test_png_header_too_many_pixels_before_decoding() -> None:
    # The same hand-made header decodes at 4x4, so only the size can reject it.
    small = _png_by_hand(4, 4, zlib.compress(b"\x00\x01\x02\x03\x04" * 4))
    assert _decoded(small).images[0, 0, 0].tolist() == [1, 2, 3, 4]
    # 30000x30000 with a few bytes of IDAT: decoding would have said "corrupt".
    assert _reason(_png_by_hand(30000, 30000, zlib.compress(b"\x00" * 64))) == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL global untouched


def test_jpeg_sof_too_many_pixels() -> None:
    value = bytearray(_jpeg(_smooth_rgb(16, 16)))
    sof = value.index(b"\xff\xc0")  # baseline SOF0: FF C0, len(2), precision(1), Y(2), X(2)
    struct.pack_into(">HH", value, sof + 5, 30000, 30000)
    assert _reason(bytes(value)) == "too_many_pixels"


def _webp_vp8l_resized(w: int, h: int) -> bytes:
    """A valid 4x4 lossless WebP whose VP8L header is patched to say w x h."""
    value = bytearray(_webp(np.zeros((4, 4, 3), np.uint8), lossless=True))
    assert value[12:16] == b"VP8L"
    bits = int.from_bytes(value[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)  # 14-bit sizes minus one
    value[21:25] = bits.to_bytes(4, "little")
    return bytes(value)


def test_webp_header_too_many_pixels() -> None:
    # Sizes above max_pixels but below PIL's own bomb limit (~179M px), so only
    # our check (before libwebp allocates the canvas at open) can reject them.
    assert _decoded(_webp_vp8l_resized(4, 4)).images.shape == (1, 3, 4, 4)
    assert _reason(_webp_vp8l_resized(8000, 8000)) == "too_many_pixels"
    vp8x = (b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10)
            + b"\x00" * 4 + (4999).to_bytes(3, "little") + (4999).to_bytes(3, "little"))
    assert _reason(vp8x) == "too_many_pixels"
    # Above PIL's own bomb limit, PIL's error still maps to too_many_pixels.
    assert _reason(_webp_vp8l_resized(16384, 16384), limits=Limits(max_pixels=1 << 40)) \
        == "too_many_pixels"


def test_npy_limits() -> None:
    assert _reason(_npy(np.zeros((4097, 4097), np.uint8))) == "too_large"
    limits = Limits(max_pixels=100, max_images=3)
    assert _decoded(_npy(np.zeros((3, 10, 10, 1), np.uint8)), limits=limits)  # at the limits
    assert _reason(_npy(np.zeros((4, 2, 2, 1), np.uint8)), limits=limits) == "too_many_images"
    assert _reason(_npy(np.zeros((1, 11, 10, 3), np.uint8)), limits=limits) == "too_many_pixels"
    assert _reason(_npy(np.zeros((11, 10), np.uint8)), limits=limits) == "too_many_pixels"


def test_npy_limits_come_from_the_header_alone() -> None:
    # Headers promising 2**20 images, or 30000x30000 pixels, with no data behind
    # them: rejected for the count, not for the missing bytes.
    for shape, reason in (((1 << 20, 2, 2, 1), "too_many_images"),
                          ((30000, 30000), "too_many_pixels")):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
        assert _reason(buf.getvalue()) == reason


def test_decoded_size_cap_comes_from_the_header_alone() -> None:
    # 1000 images of 100x100x3 = 30 MB decoded, promised by a 128-byte header with no data behind it.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (1000, 100, 100, 3)})
    limits = Limits(max_images=1000, max_decoded_bytes=16 << 20)
    assert _reason(buf.getvalue(), limits=limits) == "too_large"
    # The cap counts what comes out: alpha is dropped, so 4 channels cost 3.
    assert _decoded(_npy(np.zeros((2, 10, 10, 4), np.uint8)), limits=Limits(max_decoded_bytes=600))
    assert _reason(_npy(np.zeros((2, 10, 10, 4), np.uint8)), limits=Limits(max_decoded_bytes=599)) == "too_large"
    # Images too: a PNG whose RGB pixels exceed the cap is rejected before it is decoded.
    png = _pil_bytes(Image.new("RGB", (40, 30)), "PNG")
    assert _decoded(png, limits=Limits(max_decoded_bytes=40 * 30 * 3))
    assert _reason(png, limits=Limits(max_decoded_bytes=40 * 30 * 3 - 1)) == "too_large"


def test_huge_npy_header_is_corrupt() -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (2, 2)})
    value = bytearray(buf.getvalue())
    pad = b" " * 5000
    hlen = struct.unpack_from("<I", value, 8)[0]
    value = value[:12] + value[12:12 + hlen - 1] + pad + b"\n" + b"\0" * 4
    struct.pack_into("<I", value, 8, hlen + len(pad))
    assert _reason(bytes(value)) == "corrupt"


# ---------------------------------------------------------------- bad input

def test_empty() -> None:
    assert _reason(None) == "empty"
    assert _reason(b"") == "empty"


def test_unknown_magic() -> None:
    assert _reason(b"GIF89a" + b"\0" * 20) == "unknown_format"
    assert _reason(b"\x00") == "unknown_format"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_images_are_corrupt(cut: float) -> None:
    for value in (_png(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                  _jpeg(_smooth_rgb(64, 64)),
                  _webp(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8), lossless=True)):
        assert _reason(value[:int(len(value) * cut)]) == "corrupt"


def test_png_bad_crc_is_corrupt() -> None:
    value = bytearray(_png(np.zeros((4, 4), np.uint8)))
    value[29] ^= 0xFF  # IHDR CRC
    assert _reason(bytes(value)) == "corrupt"


def test_npy_bad_dtypes() -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    assert _reason(_npy(objects, allow_pickle=True)) == "bad_dtype"  # pickle never loaded
    assert _reason(_npy(np.zeros((2, 2), np.float32))) == "bad_dtype"
    assert _reason(_npy(np.zeros((2, 2), np.int8))) == "bad_dtype"
    assert _reason(_npy(np.zeros((2, 2), np.uint16))) == "bad_dtype"
    assert _reason(_npy(np.zeros(2, dtype=[("r", "u1"), ("g", "u1")]))) == "bad_dtype"


def test_npy_byte_count_must_match() -> None:
    value = _npy(np.zeros((4, 4), np.uint8))
    assert _reason(value + b"\0") == "corrupt"
    assert _reason(value[:-1]) == "corrupt"
    assert _reason(value[:20]) == "corrupt"  # cut inside the header


@pytest.mark.parametrize("shape", [(0, 4), (4, 0, 3), (0, 2, 2, 3), (4,), (1, 1, 1, 1, 1),
                                   (4, 4, 5), (2, 5, 5, 5), ()])
def test_npy_bad_shapes(shape: tuple[int, ...]) -> None:
    assert _reason(_npy(np.zeros(shape, np.uint8))) == "bad_shape"


def test_npy_other_versions_are_corrupt() -> None:
    value = bytearray(_npy(np.zeros((2, 2), np.uint8)))
    value[6] = 3  # version 3.0 header layout differs; we only read 1.0 and 2.0
    assert _reason(bytes(value)) == "corrupt"
    value[6] = 9
    assert _reason(bytes(value)) == "corrupt"


def test_detail_never_echoes_the_payload() -> None:
    secret = b"SECRET-PAYLOAD"
    value = bytearray(_npy(np.zeros((2, 2), np.uint8)))
    value = value.replace(b"'descr'", b"'" + secret + b"'")
    out = decode_record(bytes(value), None, LIMITS)
    assert isinstance(out, Rejected) and "SECRET" not in out.detail


def test_thread_safe() -> None:
    values = [_png(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
              _jpeg(_smooth_rgb(32, 32)), _webp(_smooth_rgb(16, 16), lossless=True),
              _npy(RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)), b"junk"] * 40
    serial = [decode_record(v, None, LIMITS) for v in values]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda v: decode_record(v, None, LIMITS), values))
    for a, b in zip(serial, parallel, strict=True):
        assert type(a) is type(b)
        assert torch.equal(a.images, b.images) if isinstance(a, Decoded) else a == b


# ---------------------------------------------------------------- properties

# Small limits keep a mutated header from asking for a big (slow) decode.
FUZZ_LIMITS = Limits(max_bytes=1 << 16, max_pixels=128 * 128, max_images=16)
SEEDS = [
    _png(RNG.integers(0, 256, (12, 10), dtype=np.uint8)),
    _png(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)),
    _jpeg(_smooth_rgb(16, 24), quality=80),
    _jpeg(_smooth_rgb(16, 16), quality=80, progressive=True),
    _webp(_smooth_rgb(12, 12), lossless=True),
    _webp(_smooth_rgb(16, 16), quality=70),
    _npy(RNG.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)),
    _npy(RNG.integers(0, 256, (6, 5), dtype=np.uint8)),
]


def _check_outcome(out: Decoded | Rejected, limits: Limits) -> None:
    if isinstance(out, Rejected):
        assert out.reason in REASONS and isinstance(out.detail, str)
        return
    assert isinstance(out, Decoded)
    x = out.images
    assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)
    assert x.is_contiguous() and min(x.shape) > 0
    n, _, h, w = x.shape
    assert n <= limits.max_images and h * w <= limits.max_pixels


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n",
                                                  b"RIFF\0\0\0\0WEBPVP8 ", b"\x93NUMPY\x01\x00"]))
def test_random_bytes_never_raise(tail: bytes, magic: bytes) -> None:
    _check_outcome(decode_record(magic + tail, None, FUZZ_LIMITS), FUZZ_LIMITS)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SEEDS))), st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_records_never_raise(seed: int, mutations: list[tuple[str, int, int]]) -> None:
    value = bytearray(SEEDS[seed])
    for op, pos, arg in mutations:
        pos %= max(len(value), 1)
        if op == "flip" and value:
            value[pos] ^= arg
        elif op == "cut":
            del value[pos:]
        elif op == "insert":
            value[pos:pos] = bytes([arg]) * (1 + arg % 8)
        elif op == "delete":
            del value[pos:pos + arg]
    _check_outcome(decode_record(bytes(value), [("label", b"1")], FUZZ_LIMITS), FUZZ_LIMITS)
