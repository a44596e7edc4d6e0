"""Fashion-MNIST: find it, parse its IDX files, return uint8 tensors.

Resolution order: explicit ``root`` -> ``$STREAMKD_DATA_DIR`` -> Debian's
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``)
-> the cache ``~/.cache/streamkd`` -> a torchvision download into that cache
-> ``DatasetNotFound``. Each directory may hold the four IDX files directly
(gzipped or not) or in torchvision's ``FashionMNIST/raw`` layout.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
ENV_VAR = "STREAMKD_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}  # split -> IDX file prefix


class DatasetNotFound(FileNotFoundError):
    """No copy of the dataset could be found or downloaded."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/streamkd`` (default ``~/.cache/streamkd``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamkd"


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array of its declared shape.

    Format: 2 zero bytes, a dtype code (0x08 = uint8, the only one Fashion-MNIST
    uses), the number of dims, then each dim as big-endian uint32, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX dtype 0x{dtype_code:02x} unsupported (only 0x08 uint8)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload is {len(data) - header} bytes, dims {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    prefix = SPLITS[split]
    for d in (directory, directory / "FashionMNIST" / "raw"):
        found = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            name = f"{prefix}-{kind}"
            hit = next((d / n for n in (f"{name}.gz", name) if (d / n).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found[0], found[1]
    return None


def _torchvision_download(directory: Path) -> None:
    """Fetch Fashion-MNIST into ``directory/FashionMNIST/raw`` (needs the network)."""
    import torchvision

    directory.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        torchvision.datasets.FashionMNIST(str(directory), train=train, download=True)


def load_fashion_mnist(
    split: str, root: str | Path | None = None, *, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000 images).

    Returns (images uint8 N×1×28×28 in [0, 255], labels int64 N in [0, 10)).
    ``download=False`` skips the torchvision fallback.
    """
    if split not in SPLITS:
        raise ValueError(f"Invalid split {split!r}. Valid: {', '.join(SPLITS)}")
    candidates = [Path(p) for p in (root, os.environ.get(ENV_VAR)) if p]
    candidates += [DEBIAN_DIR, cache_dir()]
    for d in candidates:
        files = _find_files(d, split)
        if files is not None:
            return _load(*files)

    error = "torchvision download disabled"
    if download:
        try:
            _torchvision_download(cache_dir())
            files = _find_files(cache_dir(), split)
            if files is not None:
                return _load(*files)
            error = "download finished but the files are missing"
        except Exception as e:  # noqa: BLE001 - offline, proxy, disk full ...: all end in the same advice
            error = f"torchvision download failed: {e}"
    searched = ", ".join(str(d) for d in candidates)
    raise DatasetNotFound(
        f"Fashion-MNIST {split} split not found (searched {searched}; {error}). "
        f"Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        f"{SPLITS[split]}-images-idx3-ubyte.gz and {SPLITS[split]}-labels-idx1-ubyte.gz in a "
        f"directory and set {ENV_VAR} to it (or pass --data-dir), or allow network access "
        f"for torchvision to download it into {cache_dir()}."
    )


def _load(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected N×28×28 images, got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{labels_path}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} out of range [0, {len(FASHION_MNIST_CLASSES)})")
    # copy: frombuffer arrays are read-only and torch wants writable memory
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
