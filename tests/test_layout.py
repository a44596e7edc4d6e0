"""The snapshot layout contract: names, version folders, LATEST, the manifest's shape, and that the store,
`streamkd pull` and `streamkd export` all hold a manifest to the same rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from streamkd.serve.pull import PullError, _validate
from streamkd.state import layout
from streamkd.state.layout import (
    MODEL_FILE,
    SnapshotError,
    check_manifest,
    is_version,
    list_versions,
    read_latest,
    read_manifest,
    resolve_version_dir,
    student_geometry,
)
from streamkd.state.snapshot import SnapshotStore

WEIGHTS = b"not really safetensors, but hashed all the same"
STUDENT = {"model": "streamkd:lenet5", "num_classes": 10, "channels": 1, "input_size": [28, 28]}


def good(version: int = 3) -> dict:
    return {"version": version, "files": {MODEL_FILE: hashlib.sha256(WEIGHTS).hexdigest()}, "student": STUDENT}


def write_version(root: Path, version: int, manifest: dict) -> Path:
    vdir = root / str(version)
    vdir.mkdir(parents=True)
    (vdir / MODEL_FILE).write_bytes(WEIGHTS)
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    return vdir


@pytest.mark.parametrize("name,ok", [("1", True), ("42", True), ("9" * 18, True), ("0", False), ("007", False),
                                     ("9" * 19, False), ("-1", False), ("1.0", False), ("²", False), ("", False)])
def test_version_names(name, ok) -> None:
    assert is_version(name) is ok


def test_list_versions_and_latest(tmp_path: Path, caplog) -> None:
    assert list_versions(tmp_path / "missing") == [] and read_latest(tmp_path) is None
    for name in ("2", "10", "1", "007", ".tmp-11", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version folder")
    assert list_versions(tmp_path) == [1, 2, 10]
    (tmp_path / "LATEST").write_text("10\n")
    assert read_latest(tmp_path) == 10
    (tmp_path / "LATEST").write_text("../../etc\n")
    assert read_latest(tmp_path) is None and "malformed" in caplog.text


def test_a_good_manifest_is_accepted() -> None:
    assert check_manifest(good(), "m", version=3, student=True, max_files=1) == good()["files"]


@pytest.mark.parametrize("change,message", [
    (lambda m: [], "not a JSON object"),
    (lambda m: m | {"version": "3"}, "not a positive integer"),
    (lambda m: m | {"version": 0}, "not a positive integer"),
    (lambda m: m | {"version": True}, "not a positive integer"),
    (lambda m: m | {"version": 4}, "names version 4, not 3"),
    (lambda m: m | {"files": [MODEL_FILE]}, f"no files map listing {MODEL_FILE}"),
    (lambda m: m | {"files": {"model.onnx": "0" * 64}}, f"no files map listing {MODEL_FILE}"),
    (lambda m: m | {"files": m["files"] | {"../escape": "0" * 64}}, "unsafe file name"),
    (lambda m: m | {"files": m["files"] | {".hidden": "0" * 64}}, "unsafe file name"),
    (lambda m: m | {"files": m["files"] | {"manifest.json": "0" * 64}}, "unsafe file name"),
    (lambda m: m | {"files": {MODEL_FILE: "A" * 64}}, "malformed"),
    (lambda m: m | {"files": {MODEL_FILE: 5}}, "malformed"),
    (lambda m: m | {"files": m["files"] | {"a.bin": "0" * 64, "b.bin": "0" * 64}}, "more than the limit of 2"),
    (lambda m: {k: v for k, v in m.items() if k != "student"}, "no `student` section"),
    (lambda m: m | {"student": STUDENT | {"model": "/srv/evil.pt2"}}, "student.model .* is refused"),
])
def test_each_malformation_is_refused_with_its_reason(change, message) -> None:
    with pytest.raises(SnapshotError, match=f"^where: .*{message}"):
        check_manifest(change(good()), "where", version=3, student=True, max_files=2)


@pytest.mark.parametrize("manifest", [
    good(3) | {"files": {MODEL_FILE: "0" * 63}},
    good(3) | {"files": {"a/b": "0" * 64, MODEL_FILE: "0" * 64}},
    good(3) | {"version": "3"},
    {k: v for k, v in good(3).items() if k != "files"},
])
def test_store_pull_and_export_refuse_the_same_manifests(tmp_path: Path, manifest: dict) -> None:
    vdir = write_version(tmp_path, 3, manifest)
    assert SnapshotStore(tmp_path).manifest(3) is None
    with pytest.raises(SnapshotError):
        read_manifest(vdir)
    with pytest.raises(PullError):
        _validate(json.dumps(manifest).encode(), "http://daemon/v1/snapshots/latest")


def test_store_pull_and_export_accept_the_same_manifest(tmp_path: Path) -> None:
    vdir = write_version(tmp_path, 3, good(3))
    assert SnapshotStore(tmp_path).manifest(3) == good(3)
    assert read_manifest(vdir) == good(3)
    assert _validate(json.dumps(good(3)).encode(), "url") == (good(3), good(3)["files"])


def test_read_manifest_checks_the_files(tmp_path: Path) -> None:
    vdir = write_version(tmp_path, 3, good(3))
    (vdir / MODEL_FILE).write_bytes(WEIGHTS + b"!")
    assert read_manifest(vdir, verify=False)["version"] == 3
    with pytest.raises(SnapshotError, match=f"{MODEL_FILE}: sha256 .* does not match"):
        read_manifest(vdir)
    (vdir / MODEL_FILE).unlink()
    with pytest.raises(SnapshotError, match="listed in the manifest but missing"):
        read_manifest(vdir)


def test_resolve_version_dir(tmp_path: Path, caplog) -> None:
    with pytest.raises(SnapshotError, match="no such directory"):
        resolve_version_dir(tmp_path / "missing")
    with pytest.raises(SnapshotError, match="neither a snapshot version folder"):
        resolve_version_dir(tmp_path)
    v2, v5 = write_version(tmp_path, 2, good(2)), write_version(tmp_path, 5, good(5))
    assert resolve_version_dir(v2) == v2  # a version folder as is
    assert resolve_version_dir(tmp_path) == v5  # no LATEST: the highest version
    (tmp_path / "LATEST").write_text("2\n")
    assert resolve_version_dir(tmp_path) == v2
    (tmp_path / "LATEST").write_text("9\n")
    assert resolve_version_dir(tmp_path) == v5 and "names version 9, which is not there" in caplog.text


def test_student_geometry() -> None:
    assert student_geometry(STUDENT) == (1, 28, 28)
    assert student_geometry({"input_shape": [1, 3, 32, 40]}) == (3, 32, 40)
    with pytest.raises(SnapshotError, match="no usable channels"):
        student_geometry({"model": "streamkd:lenet5"})


def test_the_layout_module_needs_only_the_standard_library() -> None:
    imported = {line.split()[1].split(".")[0] for line in Path(layout.__file__).read_text().splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "json", "logging", "os", "re", "pathlib", "typing", "streamkd"}
