"""One Kafka record value (+ headers) -> uint8 images, or a reason to reject it.

Pure: bytes in, values out. No Kafka, no metrics, no logging; thread-safe (it is
called from the batcher's decode pool) and it never raises: a bad record is a
`Rejected` value whose `reason` becomes a metric label and a DLQ header.

Wire format (docs/DESIGN.md): a JPEG, PNG or WebP image, or an `.npy` uint8 array
shaped HxW, HxWxC, NxHxWxC or NxCxHxW. The format comes from the magic bytes;
the optional `content-type` header is only checked for being a known type.
Every limit is checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 8 << 20  # record value size in bytes
    max_pixels: int = 16_777_216  # H*W per image, checked from the header BEFORE full decode
    max_images: int = 1024  # images per record (npy batch)
    max_decoded_bytes: int = 64 << 20  # uint8 bytes of a record's decoded images, checked from the header


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor  # uint8, contiguous, N×C×H×W, C in {1,3}
    label: int | None  # from the `label` header; applies to every image in the record


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REASONS: a stable code (metric label value, DLQ header)
    detail: str  # short human text, never the raw payload


REASONS = ("empty", "too_large", "too_many_pixels", "too_many_images",
           "unknown_format", "corrupt", "bad_shape", "bad_dtype", "bad_label",
           "decoder_crash", "train_crash")  # the last two are set by the crash journals (journal.py)

MAX_LABEL = 1_000_000  # exclusive; a class id beyond this is a producer bug, not a class
NPY_MAX_HEADER = 4096  # np.save writes ~128 bytes for a plain uint8 array

CONTENT_TYPES = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp",
                 "application/x-npy": "npy"}

# Plugin classes, not Image.open: Image.open runs PIL's global decompression-bomb
# check (a warning or a DecompressionBombError keyed to the global MAX_IMAGE_PIXELS)
# and JPEG->MPO sniffing that warns. The plugins' constructors only parse headers;
# our own `max_pixels` check runs before `load()` allocates anything.
_OPENERS = {"jpeg": JpegImagePlugin.JpegImageFile, "png": PngImagePlugin.PngImageFile,
            "webp": WebPImagePlugin.WebPImageFile}

_CHANNELS = (1, 3, 4)  # npy channel counts we accept; 4 = RGBA, alpha dropped
_GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNG
_GRAY = ("1", "L", "LA", "La")


class _Reject(Exception):
    """Internal control flow: unwinds to `decode_record`, becomes a `Rejected`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def sniff_format(value: bytes) -> str | None:
    """The format named by the magic bytes: "jpeg", "png", "webp", "npy", or None."""
    head = bytes(value[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return None


def decode_record(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None,
                  limits: Limits) -> Decoded | Rejected:
    """Decode one record value into uint8 N×C×H×W (C in {1,3}) plus its label.

    Never raises: every failure, expected or not, is returned as `Rejected`.
    """
    try:
        if value is None or len(value) == 0:
            return Rejected("empty", "record value is empty")
        if len(value) > limits.max_bytes:
            return Rejected("too_large", f"{len(value)} bytes > max_bytes {limits.max_bytes}")
        label = _parse_headers(headers)
        fmt = sniff_format(value)
        if fmt is None:
            return Rejected("unknown_format", "magic bytes are not JPEG, PNG, WebP or NPY")
        chw = _decode_npy(value, limits) if fmt == "npy" else _decode_image(value, fmt, limits)
        return Decoded(torch.from_numpy(chw), label)
    except _Reject as r:
        return Rejected(r.reason, r.detail)
    except Image.DecompressionBombError:
        # Only reachable when max_pixels exceeds PIL's own global limit.
        return Rejected("too_many_pixels", "image exceeds PIL's decompression-bomb limit")
    except Exception as e:  # noqa: BLE001 - the contract: a bad record never raises
        return Rejected("corrupt", _describe(e))


def parse_headers(headers: Sequence[tuple[str, bytes]] | None) -> int | Rejected | None:
    """The record's label (None when it has none), or a Rejected for a bad label / content-type.

    For paths that check a record without decoding it (the nvJPEG path in gpu_decode.py).
    """
    try:
        return _parse_headers(headers)
    except _Reject as r:
        return Rejected(r.reason, r.detail)


def _parse_headers(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    """Validate `content-type` and parse `label`. Names are case-insensitive; the
    last duplicate wins; a header with a null value counts as absent."""
    label_raw = ctype_raw = None
    for key, val in headers or ():
        name = (key.decode("latin-1") if isinstance(key, (bytes, bytearray)) else str(key))
        name = name.strip().lower()
        if name == "label":
            label_raw = val
        elif name == "content-type":
            ctype_raw = val

    if ctype_raw is not None:
        ctype = _header_text(ctype_raw, "unknown_format").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise _Reject("unknown_format", f"content-type {ctype[:40]!r} is not one of "
                          f"{', '.join(CONTENT_TYPES)}")

    if label_raw is None:
        return None
    text = _header_text(label_raw, "bad_label").strip()
    # str.isdigit() alone accepts non-ASCII digits such as '²'; the length cap keeps
    # int() cheap and the bound check meaningful.
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_LABEL)):
        raise _Reject("bad_label", f"label {text[:20]!r} is not a decimal integer >= 0")
    label = int(text)
    if label >= MAX_LABEL:
        raise _Reject("bad_label", f"label {label} >= {MAX_LABEL}")
    return label


def _header_text(val: bytes | str, reason: str) -> str:
    if isinstance(val, str):
        return val
    try:
        return bytes(val).decode("ascii")
    except UnicodeDecodeError:
        raise _Reject(reason, "header value is not ASCII") from None


def _check_pixels(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise _Reject("too_many_pixels",
                      f"{width}x{height} = {width * height} px > max_pixels {limits.max_pixels}")


def check_decoded_bytes(n: int, c: int, h: int, w: int, limits: Limits) -> Rejected | None:
    """A Rejected when ``n`` uint8 images of C×H×W exceed ``limits.max_decoded_bytes``, else None."""
    size = n * c * h * w
    if size > limits.max_decoded_bytes:
        return Rejected("too_large", f"{n}x{c}x{h}x{w} decodes to {size} bytes > max_decoded_bytes "
                                     f"{limits.max_decoded_bytes}")
    return None


def _check_decoded(n: int, c: int, h: int, w: int, limits: Limits) -> None:
    bad = check_decoded_bytes(n, c, h, w, limits)
    if bad is not None:
        raise _Reject(bad.reason, bad.detail)


def _webp_canvas_size(value: bytes) -> tuple[int, int] | None:
    """(width, height) from the first WebP chunk header, or None if malformed.

    Needed because libwebp's decoder, which PIL creates when it *opens* the file,
    allocates the whole canvas up front.
    """
    b = bytes(value[:30])
    if len(b) < 30:
        return None
    chunk = b[12:16]
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes
        w, h = struct.unpack_from("<HH", b, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and b[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes minus one
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def _decode_image(value: bytes, fmt: str, limits: Limits) -> np.ndarray:
    """JPEG/PNG/WebP -> uint8 1×C×H×W (first frame of animations)."""
    if fmt == "webp":
        size = _webp_canvas_size(value)
        if size is None:
            raise _Reject("corrupt", "unreadable WebP header")
        _check_pixels(*size, limits)
    with _OPENERS[fmt](io.BytesIO(value)) as im:  # parses the header only
        _check_pixels(*im.size, limits)
        _check_decoded(1, 3, im.size[1], im.size[0], limits)  # at most 3 channels come out
        im.load()  # raises on truncation: LOAD_TRUNCATED_IMAGES is left False
        return _pil_to_nchw(im)


def _pil_to_nchw(im: Image.Image) -> np.ndarray:
    """A loaded PIL image -> uint8 1×C×H×W, C=1 for grayscale modes, else 3.

    Alpha is dropped, not composited: it is what torchvision's RGB read mode and
    PIL's convert() do, and a background colour would be a guess either way.
    """
    im.info.pop("transparency", None)  # we drop alpha; also avoids a PIL warning in convert
    if im.mode in _GRAY16:
        # 16-bit -> 8-bit keeps the high byte (what libpng's strip_16 does).
        hw = (np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8)
        return hw[None, None]  # astype made a fresh, writable array
    if im.mode in _GRAY:
        arr = np.asarray(im if im.mode == "L" else im.convert("L"))
        return np.array(arr[None, None])  # copy: PIL's buffer is read-only
    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # P, RGBA, CMYK, YCbCr...
    # HWC -> 1×3×H×W. np.array always copies (ascontiguousarray would not for a
    # 1×1 image, leaving PIL's read-only buffer).
    return np.array(arr.transpose(2, 0, 1)[None], order="C")


def _decode_npy(value: bytes, limits: Limits) -> np.ndarray:
    """NPY uint8 array -> uint8 N×C×H×W. Parses the header with numpy's own
    reader (literal_eval, never pickle) and checks every limit before the data.

    4-D tie rule: channels-last wins. If shape[3] is in (1, 3, 4) the array is
    NHWC (numpy/PIL's layout); otherwise, if shape[1] is, it is NCHW. So an NCHW
    batch whose width is 1, 3 or 4 is misread; send such tiny images as NHWC.
    """
    fp = io.BytesIO(value)
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(
                fp, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(
                fp, max_header_size=NPY_MAX_HEADER)
        else:
            raise _Reject("corrupt", f"unsupported npy version {version}")
    except _Reject:
        raise
    except Exception as e:  # noqa: BLE001 - numpy quotes the header: keep it out of detail
        raise _Reject("corrupt", f"unreadable npy header ({type(e).__name__})") from None

    if dtype != np.uint8:
        raise _Reject("bad_dtype", f"npy dtype {dtype.str[:20]} is not uint8")
    if len(shape) not in (2, 3, 4) or any(d <= 0 for d in shape):
        raise _Reject("bad_shape", f"npy shape {shape} is not HxW, HxWxC, NxHxWxC or NxCxHxW")
    if len(shape) == 2:
        n, (h, w), c, layout = 1, shape, 1, "hw"
    elif len(shape) == 3:
        n, (h, w, c), layout = 1, shape, "hwc"
        if c not in _CHANNELS:
            raise _Reject("bad_shape", f"npy shape {shape}: last dim must be 1, 3 or 4")
    elif shape[3] in _CHANNELS:
        (n, h, w, c), layout = shape, "nhwc"
    elif shape[1] in _CHANNELS:
        (n, c, h, w), layout = shape, "nchw"
    else:
        raise _Reject("bad_shape", f"npy shape {shape}: no channel dim of 1, 3 or 4")
    if n > limits.max_images:
        raise _Reject("too_many_images", f"{n} images > max_images {limits.max_images}")
    _check_pixels(w, h, limits)
    _check_decoded(n, min(c, 3), h, w, limits)  # alpha is dropped

    count = n * c * h * w
    offset = fp.tell()
    if len(value) - offset != count:
        raise _Reject("corrupt", f"npy data is {len(value) - offset} bytes, header says {count}")
    arr = np.frombuffer(value, np.uint8, count, offset).reshape(shape, order="F" if fortran else "C")
    if layout == "hw":
        arr = arr[None, None]
    elif layout == "hwc":
        arr = arr.transpose(2, 0, 1)[None]
    elif layout == "nhwc":
        arr = arr.transpose(0, 3, 1, 2)
    if c == 4:
        arr = arr[:, :3]  # drop alpha, as for images
    return np.array(arr, order="C")  # the one copy: owned, writable, contiguous


def _describe(e: Exception) -> str:
    """Short, printable text for an unexpected error (PIL messages carry no payload)."""
    msg = str(e).encode("ascii", "replace").decode()[:80]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
