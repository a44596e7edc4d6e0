"""Serving snapshots: the on-disk contract, numbering, pruning, fallback, concurrent readers."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamkd.state.snapshot import NonFiniteWeights, SnapshotStore


def weights(seed: int = 0, n: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 16, generator=g)
    return {
        "fc.weight": w,
        "fc.bias": torch.randn(n, generator=g),
        "fc_t.weight": w.t(),  # non-contiguous view sharing storage (tied weights)
        "bn.num_batches_tracked": torch.tensor(seed),
    }


MANIFEST = {
    "step": 10,
    "samples_seen": 320,
    "metrics": {"agreement": 0.5, "kd_loss": 1.25},
    "offsets": {"images": {0: 12}},
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_manifest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    w = weights(1)
    m = store.publish(w, MANIFEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "LATEST"]
    assert (tmp_path / "LATEST").read_text().strip() == "1"
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["manifest.json", "model.safetensors"]

    on_disk = json.loads((tmp_path / "1" / "manifest.json").read_text())
    assert on_disk == m
    assert m["version"] == 1
    assert m["step"] == 10 and m["metrics"] == {"agreement": 0.5, "kd_loss": 1.25}
    assert m["offsets"] == {"images": {"0": 12}}
    assert m["files"] == {"model.safetensors": sha(tmp_path / "1" / "model.safetensors")}
    assert m["created_at"].endswith("Z")
    created = datetime.fromisoformat(m["created_at"].replace("Z", "+00:00"))
    assert abs(time.time() - created.timestamp()) < 60

    loaded = load_file(tmp_path / "1" / "model.safetensors")
    assert loaded.keys() == w.keys()
    for k in w:
        assert torch.equal(loaded[k], w[k])
    assert store.latest() == m
    assert store.manifest(1) == m
    assert store.versions() == [1]


def test_latest_none_when_empty(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "s")
    assert store.latest() is None
    assert store.versions() == []
    assert store.manifest(1) is None
    assert store.file_path(1, "model.safetensors") is None


def test_nan_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(weights(), MANIFEST)
    for bad in (float("nan"), float("inf")):
        w = weights()
        w["fc.bias"][3] = bad
        with pytest.raises(NonFiniteWeights, match="fc.bias"):
            store.publish(w, MANIFEST)
    assert store.versions() == [1]
    assert (tmp_path / "LATEST").read_text().strip() == "1"


def test_non_finite_metric_becomes_null(tmp_path: Path) -> None:
    # Strict JSON for serving clients: NaN is not JSON.
    m = SnapshotStore(tmp_path).publish(weights(), {"metrics": {"agreement": float("nan"), "kd_loss": 1.0}})
    assert m["metrics"]["agreement"] is None
    json.loads((tmp_path / "1" / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_keep_and_numbering_across_pruning_and_restarts(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for _ in range(5):
        store.publish(weights(), MANIFEST)
    assert store.versions() == [4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A restart continues the numbering.
    store = SnapshotStore(tmp_path, keep=2)
    assert store.publish(weights(), MANIFEST)["version"] == 6
    assert store.versions() == [5, 6]

    # Even if the version folders are gone, LATEST alone prevents reuse.
    for v in store.versions():
        os.rename(tmp_path / str(v), tmp_path / f"gone-{v}")
    assert SnapshotStore(tmp_path, keep=2).publish(weights(), MANIFEST)["version"] == 7

    # And a version renamed into place but never announced in LATEST (crash) is skipped over.
    (tmp_path / "LATEST").unlink()
    assert SnapshotStore(tmp_path, keep=2).publish(weights(), MANIFEST)["version"] == 8


def test_extra_files_written_and_hashed(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)

    def write_onnx(path: Path) -> None:
        path.write_bytes(b"onnx-bytes")
        (path.parent / "model.onnx.data").write_bytes(b"external")  # companions get hashed too

    m = store.publish(weights(), MANIFEST, extra_files={"model.onnx": write_onnx})
    d = tmp_path / "1"
    assert sorted(m["files"]) == ["model.onnx", "model.onnx.data", "model.safetensors"]
    for name, digest in m["files"].items():
        assert sha(d / name) == digest
    assert store.file_path(1, "model.onnx") == d / "model.onnx"
    assert store.file_path(1, "manifest.json") == d / "manifest.json"


def test_extra_file_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(weights(), MANIFEST)

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        store.publish(weights(), MANIFEST, extra_files={"model.onnx": broken})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "LATEST"]
    assert store.publish(weights(), MANIFEST)["version"] == 2


@pytest.mark.parametrize(
    "name",
    ["../LATEST", "..", ".", "/etc/passwd", "a/b", "manifest.json\0", "", "LATEST", "unlisted.bin",
     "model.safetensors/"],
)
def test_file_path_rejects(tmp_path: Path, name: str) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(weights(), MANIFEST)
    (tmp_path / "1" / "unlisted.bin").write_bytes(b"x")
    assert store.file_path(1, name) is None
    assert store.file_path(1, "model.safetensors") == tmp_path / "1" / "model.safetensors"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
        lambda d: (d / "model.safetensors").write_bytes(b"\0" * (d / "model.safetensors").stat().st_size),
        lambda d: (d / "model.safetensors").unlink(),
        lambda d: (d / "manifest.json").write_text("{"),
        lambda d: (d / "manifest.json").unlink(),
    ],
    ids=["truncated", "zero-filled", "missing-model", "bad-manifest", "missing-manifest"],
)
def test_corrupt_newest_falls_back(tmp_path: Path, corrupt) -> None:
    seen: list[tuple[int, str]] = []
    store = SnapshotStore(tmp_path, on_fallback=lambda v, r: seen.append((v, r)))
    store.publish(weights(1), MANIFEST)
    store.publish(weights(2), MANIFEST)
    assert store.latest()["version"] == 2  # caches version 2 as good
    time.sleep(0.01)  # distinct mtime for file systems with coarse timestamps
    corrupt(tmp_path / "2")
    assert store.manifest(2) is None  # a direct lookup caches the failure without reporting it...
    m = store.latest()  # ...and following LATEST still reports the fallback
    assert m is not None and m["version"] == 1
    assert [v for v, _ in seen] == [2]
    assert store.latest()["version"] == 1
    assert len(seen) == 1  # reported once, not on every call
    assert store.file_path(2, "model.safetensors") is None


def test_latest_names_missing_version(tmp_path: Path) -> None:
    seen: list[int] = []
    store = SnapshotStore(tmp_path, on_fallback=lambda v, r: seen.append(v))
    store.publish(weights(), MANIFEST)
    (tmp_path / "LATEST").write_text("9\n")
    assert store.latest()["version"] == 1
    assert seen == [9]


def test_verification_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(weights(), MANIFEST)
    import streamkd.state.layout as mod  # where a version's files are hashed

    calls = []
    real = mod.sha256_file
    monkeypatch.setattr(mod, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(5):
        assert store.latest()["version"] == 1
    assert len(calls) == 1


def test_concurrent_reader_never_sees_partial(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    done = threading.Event()
    stats = {"ok": 0, "gone": 0}
    errors: list[str] = []

    def reader() -> None:
        while not done.is_set() or stats["ok"] == 0:
            try:
                latest = (tmp_path / "LATEST").read_text()
            except FileNotFoundError:
                continue  # nothing published yet
            try:
                v = int(latest)  # LATEST is replaced atomically: always a whole number
                d = tmp_path / str(v)
                m = json.loads((d / "manifest.json").read_bytes())
                if m["version"] != v:
                    errors.append(f"manifest of {v} says {m['version']}")
                for name, digest in m["files"].items():
                    if sha(d / name) != digest:
                        errors.append(f"{v}/{name} does not match its sha256")
                stats["ok"] += 1
            except FileNotFoundError:
                # Pruned between reading LATEST and opening it: retry. But pruning never
                # removes the version LATEST names, so if LATEST still names it, it was
                # announced before it existed.
                if (tmp_path / "LATEST").read_text() == latest:
                    errors.append(f"LATEST names {latest!r}, which is missing")
                stats["gone"] += 1
            except ValueError as e:
                errors.append(f"partial read: {e!r} (LATEST={latest!r})")

    threads = [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        for i in range(100):
            extra = {"model.bin": lambda p: p.write_bytes(os.urandom(4096))}
            store.publish(weights(i, n=64), {**MANIFEST, "step": i}, extra_files=extra)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:5]
    assert stats["ok"] > 0
    assert store.versions() == [98, 99, 100]
    assert store.latest()["version"] == 100
