"""JPEG decoding on the GPU (nvJPEG, batched) on a side CUDA stream, so decoding overlaps the teacher.

On a CUDA host, the CPU decode pool only *checks* JPEG records (limits, headers,
the frame header's size; see :func:`check_jpeg`) and leaves the pixels to
:class:`GpuJpegDecoder`, which decodes a whole batch in one call on its own
stream and hands back an event the training stream waits on. Anything nvJPEG
cannot take (arithmetic/lossless coding, CMYK) and every other format decodes
on the CPU as before. A JPEG that passes the header check but fails to decode
is rejected as ``corrupt`` like on the CPU path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamkd.ingest.decode import Limits, Rejected, parse_headers

# Start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman coding).
_SOF_GPU = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}


@dataclass(frozen=True)
class JpegRef:
    """A JPEG record whose header passed the checks; its pixels are decoded later, on the GPU."""

    data: bytes
    label: int | None
    height: int
    width: int


def jpeg_frame(value: bytes, max_segments: int = 64) -> tuple[int, int, int, int] | None:
    """(SOF marker, height, width, components) from the JPEG frame header, without decoding; None if not found."""
    i, n = 2, len(value)
    for _ in range(max_segments):
        while i < n and value[i] == 0xFF and i + 1 < n and value[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 4 > n or value[i] != 0xFF:
            return None
        marker = value[i + 1]
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", value, i + 2)
        if marker in _SOF_GPU or marker in _SOF_OTHER:
            if i + 10 > n:
                return None
            _, h, w, comps = struct.unpack_from(">BHHB", value, i + 4)
            return marker, h, w, comps
        if marker == 0xDA or length < 2:  # start of scan before any frame header: malformed
            return None
        i += 2 + length
    return None


def check_jpeg(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None,
               limits: Limits) -> JpegRef | Rejected | None:
    """A JpegRef for a JPEG nvJPEG can decode; Rejected when a limit or header is violated;
    None when the record should take the CPU path (not a JPEG, or a JPEG flavour nvJPEG lacks)."""
    if not value or bytes(value[:3]) != b"\xff\xd8\xff":
        return None
    if len(value) > limits.max_bytes:
        return Rejected("too_large", f"{len(value)} bytes > max_bytes {limits.max_bytes}")
    frame = jpeg_frame(value)
    if frame is None:
        return None  # let the CPU decoder give the precise verdict
    marker, h, w, comps = frame
    if h == 0 or w == 0:
        return Rejected("corrupt", f"JPEG frame header declares {w}x{h}")
    if w * h > limits.max_pixels:
        return Rejected("too_many_pixels", f"{w}x{h} = {w * h} px > max_pixels {limits.max_pixels}")
    if marker not in _SOF_GPU or comps not in (1, 3):
        return None
    label = parse_headers(headers)
    if isinstance(label, Rejected):
        return label
    return JpegRef(bytes(value), label, h, w)


class GpuJpegDecoder:
    """Batched nvJPEG decode to uint8 N×C×H×W at a fixed size, on a side stream of ``device``."""

    def __init__(self, device: torch.device, size: tuple[int, int], channels: int):
        from torchvision.io import ImageReadMode

        self.device, self.size, self.channels = device, tuple(size), channels
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        self.stream = torch.cuda.Stream(device=device)

    def decode(self, refs: Sequence[JpegRef], cpu_images: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[int], torch.cuda.Event]:
        """Decode ``refs`` (and copy ``cpu_images``, uint8 N×C×H×W, in front of them) on the side stream.

        Returns (device images: cpu_images first, then the decodable refs; indices of refs that
        failed; the event the consuming stream must wait on).
        """
        from torchvision.io import decode_jpeg

        datas = [torch.frombuffer(bytearray(r.data), dtype=torch.uint8) for r in refs]
        failed: list[int] = []
        with torch.cuda.stream(self.stream):
            out: list[torch.Tensor] = []
            if datas:
                try:
                    out = list(decode_jpeg(datas, mode=self.mode, device=self.device))
                except RuntimeError:
                    # One bad image fails the whole batched call: find it, decode the rest one by one.
                    for i, d in enumerate(datas):
                        try:
                            out.append(decode_jpeg(d, mode=self.mode, device=self.device))
                        except RuntimeError:
                            failed.append(i)
            images = self._fit(out)
            if cpu_images is not None and cpu_images.shape[0]:
                images = torch.cat([cpu_images.to(self.device, non_blocking=True), images])
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return images, failed, ready

    def _fit(self, images: list[torch.Tensor]) -> torch.Tensor:
        h, w = self.size
        if not images:
            return torch.empty((0, self.channels, h, w), dtype=torch.uint8, device=self.device)
        if all(tuple(t.shape[1:]) == (h, w) for t in images):
            return torch.stack(images)
        out = []
        for t in images:
            if tuple(t.shape[1:]) != (h, w):
                t = F.interpolate(t[None].float(), size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
            out.append(t)
        return torch.stack(out)
