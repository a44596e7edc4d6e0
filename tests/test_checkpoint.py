"""Training checkpoints: roundtrip, retention, atomicity, fallback, safe loading."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from streamkd.state import checkpoint as ckpt_mod
from streamkd.state.checkpoint import CheckpointStore, TrainState, is_finite_state


def make_state(step: int, seed: int = 0) -> TrainState:
    torch.manual_seed(seed + step)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return TrainState(
        step=step,
        samples_seen=step * 32,
        offsets={"images": {0: 100 + step, 3: 7}, "other": {12: 5}},
        student={k: v.clone() for k, v in model.state_dict().items()},
        optimizer=opt.state_dict(),
        extra={"config_sha256": "ab" * 32, "scheduler_step": step, "created_at": "2026-01-01T00:00:00Z"},
    )


def assert_same(a: TrainState, b: TrainState) -> None:
    assert (a.step, a.samples_seen, a.offsets, a.extra) == (b.step, b.samples_seen, b.offsets, b.extra)
    assert a.student.keys() == b.student.keys()
    for k in a.student:
        assert torch.equal(a.student[k], b.student[k]), k
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"])
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]


def test_roundtrip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = make_state(7)
    path = store.save(state)
    assert path == tmp_path / "step-000000000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["offsets"] == {"images": {"0": 107, "3": 7}, "other": {"12": 5}}
    assert meta["sha256"] == hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()

    loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None
    assert_same(loaded, state)
    assert all(isinstance(p, int) for parts in loaded.offsets.values() for p in parts)
    # The optimizer state loads back into a fresh optimizer.
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    model.load_state_dict(loaded.student)
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded.optimizer)


def test_empty_dir_gives_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").load_latest() is None
    assert CheckpointStore(tmp_path / "new").list() == []


def test_retention_keeps_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 5, 3, 10, 20):
        store.save(make_state(step))
    assert [p.name for p in store.list()] == ["step-000000000020", "step-000000000010"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 20


def test_same_step_is_replaced(tmp_path: Path) -> None:
    # No new training step but later offsets (e.g. a run of rejected records): the
    # newer save must win, and nothing is left aside.
    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_state(4))
    later = make_state(4)
    later.offsets = {"images": {0: 999}}
    store.save(later)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000004"]
    loaded = store.load_latest()
    assert loaded is not None and loaded.offsets == {"images": {0: 999}}


def test_crash_during_same_step_replace_restores_old(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_state(4))
    # Simulate a crash between moving the old one aside and renaming the new one in.
    os.rename(tmp_path / "step-000000000004", tmp_path / ".old-step-000000000004")
    (tmp_path / ".tmp-step-000000000004-dead").mkdir()
    store = CheckpointStore(tmp_path, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000004"]
    loaded = store.load_latest()
    assert loaded is not None and loaded.offsets["images"][0] == 104


def test_crash_before_rename_keeps_old_and_cleans_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.save(make_state(1))
    store.save(make_state(2))

    def boom(*a, **k):
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.save(make_state(3))
    monkeypatch.undo()
    # A real crash would leave the temp dir behind; put one there to check init removes it.
    (tmp_path / ".tmp-step-000000000003-abcd").mkdir()
    (tmp_path / ".tmp-step-000000000003-abcd" / "state.pt").write_bytes(b"partial")

    store = CheckpointStore(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000001", "step-000000000002"]
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 2


def test_enospc_leaves_old_state_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_state(1))
    real_write_bytes = Path.write_bytes

    def full_disk(self: Path, data) -> int:
        if self.name == "state.pt":
            real_write_bytes(self, bytes(data)[:100])  # part of it made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as info:
        store.save(make_state(2))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000001"]  # no temp left, old one kept
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 1


def _corrupt_truncate(d: Path) -> None:
    p = d / "state.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupt_zero(d: Path) -> None:
    p = d / "state.pt"
    p.write_bytes(b"\0" * p.stat().st_size)


def _corrupt_flip(d: Path) -> None:
    p = d / "state.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _corrupt_meta(d: Path) -> None:
    (d / "meta.json").write_text('{"step": 3, "sa')


def _zero_meta(d: Path) -> None:
    p = d / "meta.json"
    p.write_bytes(b"\0" * p.stat().st_size)


def _missing_state(d: Path) -> None:
    (d / "state.pt").unlink()


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_zero, _corrupt_flip, _corrupt_meta, _zero_meta, _missing_state]
)
def test_corrupt_newest_falls_back(tmp_path: Path, corrupt) -> None:
    seen: list[tuple[Path, str]] = []
    store = CheckpointStore(tmp_path, keep=3, on_fallback=lambda p, r: seen.append((p, r)))
    good = make_state(2)
    store.save(make_state(1))
    store.save(good)
    newest = store.save(make_state(3))
    corrupt(newest)
    loaded = store.load_latest()
    assert loaded is not None
    assert_same(loaded, good)
    assert [p for p, _ in seen] == [newest]
    assert seen[0][1]


def test_all_corrupt_gives_none(tmp_path: Path) -> None:
    seen: list[Path] = []
    store = CheckpointStore(tmp_path, on_fallback=lambda p, r: seen.append(p))
    a, b = store.save(make_state(1)), store.save(make_state(2))
    _corrupt_zero(a)
    _corrupt_meta(b)
    assert store.load_latest() is None
    assert seen == [b, a]


class Evil:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["STREAMKD_PWNED"]),))


def test_refuses_pickled_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("STREAMKD_PWNED", str(marker))
    seen: list[str] = []
    store = CheckpointStore(tmp_path / "ck", on_fallback=lambda p, r: seen.append(r))
    store.save(make_state(1))
    evil = store.save(make_state(2))
    # A crafted state.pt with a matching checksum: only the loader stands in the way.
    buf = io.BytesIO()
    torch.save({"student": {"w": torch.zeros(1)}, "optimizer": {}, "x": Evil()}, buf)
    (evil / "state.pt").write_bytes(buf.getvalue())
    meta = json.loads((evil / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    meta["meta_sha256"] = ckpt_mod._meta_digest(meta)  # a crafted file is consistent (damage is what it catches)
    (evil / "meta.json").write_text(json.dumps(meta))

    loaded = store.load_latest()
    assert not marker.exists()
    assert loaded is not None and loaded.step == 1
    assert len(seen) == 1 and "load" in seen[0]


def test_prune_runs_after_durable_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # If the new checkpoint cannot be published, nothing old may be deleted.
    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_state(1))

    def fail(*a, **k):
        raise OSError(errno.EIO, "simulated")

    monkeypatch.setattr(ckpt_mod, "atomic_publish_dir", fail)
    with pytest.raises(OSError):
        store.save(make_state(2))
    monkeypatch.undo()
    assert [p.name for p in store.list()] == ["step-000000000001"]


def test_save_is_durable_before_return(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exactly-once: the data files are fsynced before the rename, the parent dir after it.
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append("rename")
        real_replace(a, b)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc")
    store = CheckpointStore(tmp_path / "ck")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.save(make_state(1))
    monkeypatch.undo()
    r = events.index("rename")
    assert {"fsync:state.pt", "fsync:meta.json"} <= set(events[:r])
    assert "fsync:ck" in events[r + 1:]


def test_is_finite_state() -> None:
    sd = {"w": torch.ones(3), "n": torch.tensor(5), "h": torch.ones(2, dtype=torch.bfloat16)}
    assert is_finite_state(sd)
    assert not is_finite_state({**sd, "b": torch.tensor([0.0, float("nan")])})
    assert not is_finite_state({**sd, "h": torch.tensor([float("inf")], dtype=torch.float16)})


def test_rejects_non_json_extra_before_writing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = make_state(1)
    state.extra = {"bad": object()}
    with pytest.raises(TypeError):
        store.save(state)
    assert list(tmp_path.iterdir()) == []


def _edit_meta(edit):
    def corrupt(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        edit(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return corrupt


def _set(key, value):
    return _edit_meta(lambda m: m.__setitem__(key, value))


def _raw_meta(data: bytes):
    def corrupt(d: Path) -> None:
        (d / "meta.json").write_bytes(data)
    return corrupt


def _digit_flipped(meta: dict) -> None:
    meta["offsets"]["images"]["0"] += 1  # still valid JSON, still plausible: only the digest tells


DAMAGED_META = [
    _raw_meta(b"[" * 200_000 + b"]" * 200_000),  # nesting deeper than the parser's recursion limit
    _raw_meta(b"\xff\xfe{}"),
    _raw_meta(b"[]"),
    _raw_meta(b'{"format": 1, "step": 3, "samples_seen": 96, "offsets": {}, "sha256": "' + b"0" * 64 + b'"}' +
              b" " * (17 << 20)),  # too big to read
    _edit_meta(_digit_flipped),
]
# Damage that is wrong in itself: refused whether or not a digest vouches for it (older checkpoints have none).
INVALID_META = [
    _edit_meta(lambda m: m["offsets"]["images"].__setitem__("x", 1)),  # partition key not a number
    _edit_meta(lambda m: m["offsets"]["images"].__setitem__("-1", 1)),
    _edit_meta(lambda m: m.__setitem__("offsets", [1, 2])),
    _set("step", 2),  # not the folder's step
    _set("step", "3"),
    _set("samples_seen", -5),
    _set("sha256", None),
    _set("extra", [1]),
    _set("format", 99),
]


def _strip_digest(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    del meta["meta_sha256"]
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt, strip", [(c, False) for c in DAMAGED_META + INVALID_META]
                         + [(c, True) for c in INVALID_META])
def test_damaged_meta_falls_back_to_the_previous_checkpoint(tmp_path: Path, corrupt, strip) -> None:
    seen: list[tuple[Path, str]] = []
    store = CheckpointStore(tmp_path, keep=3, on_fallback=lambda p, r: seen.append((p, r)))
    good = make_state(2)
    store.save(make_state(1))
    store.save(good)
    newest = store.save(make_state(3))
    corrupt(newest)
    if strip:
        _strip_digest(newest)
    loaded = store.load_latest()
    assert loaded is not None
    assert_same(loaded, good)
    assert [p for p, _ in seen] == [newest] and seen[0][1]


def test_meta_without_digest_still_loads(tmp_path: Path) -> None:
    # Checkpoints written before meta.json carried its own digest stay usable.
    store = CheckpointStore(tmp_path)
    path = store.save(make_state(4))
    meta = json.loads((path / "meta.json").read_text())
    del meta["meta_sha256"]
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    assert_same(store.load_latest(), make_state(4))
