import gzip
import struct

import numpy as np
import pytest
import torch

from streamkd.commands import datasets
from streamkd.commands.datasets import FASHION_MNIST_CLASSES, DatasetNotFound, load_fashion_mnist, read_idx

debian = pytest.mark.skipif(
    not (datasets.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_split(d, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        if gz:
            (d / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(_idx(arr)))
        else:
            (d / f"{prefix}-{kind}").write_bytes(_idx(arr))


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No copy anywhere: the env var, Debian dir and cache all point at empty dirs."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@debian
@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_debian_files(split, n):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert labels.min().item() == 0 and labels.max().item() == 9
    assert torch.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced
    assert images.max().item() == 255 and images.float().mean().item() / 255 == pytest.approx(0.286, abs=0.003)
    assert len(FASHION_MNIST_CLASSES) == 10


def test_read_idx_tiny(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), arr)
    # hand-written header: magic 0 0 8 1, one dim of 3, then 3 bytes
    (tmp_path / "b.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x08\x09")
    assert read_idx(tmp_path / "b.idx").tolist() == [7, 8, 9]


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05", "dtype 0x0d"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05", "payload is 1 bytes"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated"),
    ],
)
def test_read_idx_rejects(tmp_path, raw, match):
    (tmp_path / "x.idx").write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        read_idx(tmp_path / "x.idx")


def test_resolution_order(nowhere, monkeypatch):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_split(nowhere / "debian", "t10k", imgs, np.full(5, 1, np.uint8))
    _write_split(nowhere / "env", "t10k", imgs[:4], np.full(4, 2, np.uint8), gz=False)
    _write_split(nowhere / "root" / "FashionMNIST" / "raw", "t10k", imgs[:3], np.full(3, 3, np.uint8))

    assert load_fashion_mnist("test", download=False)[1].tolist() == [1] * 5
    monkeypatch.setenv(datasets.ENV_VAR, str(nowhere / "env"))
    images, labels = load_fashion_mnist("test", download=False)
    assert labels.tolist() == [2] * 4
    assert torch.equal(images[:, 0], torch.from_numpy(imgs[:4]))
    assert load_fashion_mnist("test", root=nowhere / "root", download=False)[1].tolist() == [3] * 3


def test_not_found_message(nowhere, monkeypatch):
    def offline(directory):
        raise OSError("Name or service not known")

    monkeypatch.setattr(datasets, "_torchvision_download", offline)
    with pytest.raises(DatasetNotFound) as e:
        load_fashion_mnist("train")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert datasets.ENV_VAR in msg
    assert "Name or service not known" in msg
    assert str(nowhere / "debian") in msg
    assert isinstance(e.value, FileNotFoundError)


def test_download_lands_in_cache(nowhere, monkeypatch):
    def fake_download(directory):
        _write_split(directory / "FashionMNIST" / "raw", "train", np.zeros((2, 28, 28), np.uint8),
                     np.array([0, 9], np.uint8))

    monkeypatch.setattr(datasets, "_torchvision_download", fake_download)
    images, labels = load_fashion_mnist("train")
    assert images.shape == (2, 1, 28, 28) and labels.tolist() == [0, 9]
    assert (nowhere / "cache" / "streamkd" / "FashionMNIST" / "raw").is_dir()


def test_bad_files_and_split(nowhere):
    _write_split(nowhere / "debian", "t10k", np.zeros((2, 28, 28), np.uint8), np.array([0, 10], np.uint8))
    with pytest.raises(ValueError, match="label 10 out of range"):
        load_fashion_mnist("test", download=False)
    _write_split(nowhere / "debian", "t10k", np.zeros((2, 28, 28), np.uint8), np.array([0], np.uint8))
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        load_fashion_mnist("test", download=False)
    with pytest.raises(ValueError, match="Valid: train, test"):
        load_fashion_mnist("val")
