"""The GPU JPEG path: header checks (pure, CPU) and nvJPEG decoding against the CPU decoder (CUDA only)."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from PIL import Image

from streamkd.ingest.decode import Decoded, Limits, decode_record
from streamkd.ingest.gpu_decode import GpuJpegDecoder, JpegRef, check_jpeg, jpeg_frame


def jpeg(w=40, h=30, mode="RGB", progressive=False) -> bytes:
    img = Image.new(mode, (w, h), color=(10, 200, 30) if mode == "RGB" else 128)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def patch_sof(data: bytes, h: int, w: int) -> bytes:
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9:]


def test_frame_header_read_without_decoding():
    assert jpeg_frame(jpeg(40, 30)) == (0xC0, 30, 40, 3)
    assert jpeg_frame(jpeg(17, 9, "L")) == (0xC0, 9, 17, 1)
    assert jpeg_frame(jpeg(8, 8, progressive=True))[0] == 0xC2
    assert jpeg_frame(b"\xff\xd8\xff") is None
    assert jpeg_frame(b"\xff\xd8" + b"\xff\xe0\x00\x01" * 3) is None  # bad segment length


def test_check_jpeg_limits_and_labels():
    limits = Limits(max_bytes=1 << 20, max_pixels=10_000)
    ref = check_jpeg(jpeg(40, 30), [("label", b"7")], limits)
    assert isinstance(ref, JpegRef) and (ref.height, ref.width, ref.label) == (30, 40, 7)
    bomb = patch_sof(jpeg(40, 30), 30000, 30000)
    assert check_jpeg(bomb, None, limits).reason == "too_many_pixels"
    assert check_jpeg(jpeg(40, 30), [("label", b"x")], limits).reason == "bad_label"
    assert check_jpeg(jpeg(40, 30), None, Limits(max_bytes=10)).reason == "too_large"
    assert check_jpeg(b"\x89PNG\r\n\x1a\n....", None, limits) is None  # not a JPEG: CPU path
    assert check_jpeg(jpeg(40, 30, "CMYK"), None, limits) is None  # nvJPEG lacks CMYK: CPU path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU (none on this host)")
def test_gpu_decode_matches_cpu_decoder():
    dev = torch.device("cuda")
    limits = Limits()
    values = [jpeg(64, 48), jpeg(64, 48, progressive=True), jpeg(32, 32)]
    refs = [check_jpeg(v, None, limits) for v in values]
    dec = GpuJpegDecoder(dev, (48, 64), 3)
    images, failed, ready = dec.decode(refs)
    ready.synchronize()
    assert failed == [] and images.shape == (3, 3, 48, 64) and images.dtype == torch.uint8
    cpu = decode_record(values[0], None, limits)
    assert isinstance(cpu, Decoded)
    # nvJPEG and libjpeg use different IDCTs: allow small differences.
    assert (images[0].cpu().int() - cpu.images[0].int()).abs().max() <= 8
    bad = JpegRef(values[0][:60], None, 48, 64)
    images, failed, ready = dec.decode([refs[0], bad, refs[2]])
    ready.synchronize()
    assert failed == [1] and images.shape[0] == 2
