"""The snapshot folder contract, in one place: file names, version folders, LATEST, the manifest's shape.

::

    <dir>/LATEST                  # text: newest published version, e.g. "12\\n"
    <dir>/<version>/model.safetensors
    <dir>/<version>/manifest.json # caller's fields + version, created_at, files {name: sha256}
    <dir>/<version>/model.onnx    # optional extra files, each listed in files
    <dir>/config.pbtxt            # Triton's model config, copied from the newest version that has one

Versions are positive integers written without leading zeros (Triton's
numeric model versions). The writer (:class:`~streamkd.state.snapshot.SnapshotStore`),
the mirror (``streamkd pull``), the uploader and the exporter all read the
contract from here. Standard library only: the serving side uses this module
without torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from streamkd.state.fsutil import sha256_file

__all__ = ["CONFIG_FILE", "LATEST_FILE", "MANIFEST_FILE", "MAX_FILES", "MODEL_FILE", "MODEL_LEVEL_FILES",
           "SnapshotError", "check_manifest", "check_manifest_model_spec", "is_version", "list_versions",
           "parse_manifest", "read_latest", "read_manifest", "resolve_version_dir", "safe_name", "student_geometry",
           "verify_files"]

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
CONFIG_FILE = "config.pbtxt"  # Triton's model config
# Files a version may carry that also belong one level up, beside LATEST (Triton reads config.pbtxt there).
MODEL_LEVEL_FILES = (CONFIG_FILE,)
# A snapshot holds a handful of files (weights, manifest, exported models and their companions); a reader of
# a manifest from another host refuses more.
MAX_FILES = 64
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # canonical: no leading zeros, fits in int64
_SHA256 = re.compile(r"[0-9a-f]{64}")
# streamkd:NAME or torchvision:NAME, nothing else: no dots (so no file suffix), no path separators.
_MANIFEST_MODEL = re.compile(r"(streamkd|torchvision):[A-Za-z_][A-Za-z0-9_]{0,63}")
log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot folder or manifest that cannot be used: missing, malformed or failing its checksums."""


# ---- names -------------------------------------------------------------------------------


def safe_name(name: object) -> bool:
    """True for a plain file name that cannot leave its folder."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and not name.startswith(".")  # also rules out '.' and '..'
        and not any(c in name for c in ("/", "\\", "\0", ":"))
        and not os.path.isabs(name)
    )


def is_version(name: str) -> bool:
    """True for a version folder's name: a positive integer without leading zeros, at most 18 digits."""
    return bool(_VERSION.fullmatch(name))


def list_versions(directory: str | Path) -> list[int]:
    """Version folders in `directory`, ascending ([] when it does not exist)."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if is_version(n) and (d / n).is_dir())


def read_latest(directory: str | Path) -> int | None:
    """The version `directory`/LATEST names; None when it is missing or malformed (a warning for the latter)."""
    path = Path(directory) / LATEST_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    if not is_version(text):
        log.warning("ignoring malformed %s: %r", path, text[:40])
        return None
    return int(text)


# ---- manifests ----------------------------------------------------------------------------


def check_manifest_model_spec(spec: object, where: str) -> str:
    """`spec` (a manifest's ``student.model``) when it names a built-in model; SnapshotError otherwise.

    A snapshot is data that may come from another host. A model *file* spec
    (``.pt2``, TorchScript) would be loaded to rebuild the student, and loading
    one runs code, so a manifest may only name ``streamkd:NAME`` or
    ``torchvision:NAME``. `where` (a path or URL) goes into the message.
    """
    if not isinstance(spec, str) or not _MANIFEST_MODEL.fullmatch(spec):
        shown = repr(spec) if len(repr(spec)) <= 80 else repr(spec)[:77] + "..."
        raise SnapshotError(f"{where}: student.model {shown} is refused: a snapshot's model must be a "
                            "streamkd:NAME or torchvision:NAME model (a model file runs code when it is loaded)")
    return spec


def parse_manifest(raw: bytes, where: str) -> Any:
    """The JSON value in `raw`; SnapshotError when it is not JSON (or nests deeper than the parser allows)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SnapshotError(f"{where}: manifest is not JSON: {type(e).__name__}: {str(e)[:200]}") from None


def check_manifest(manifest: Any, where: str, *, version: int | None = None, student: bool = False,
                   max_files: int | None = None) -> dict[str, str]:
    """The ``files`` map {name: sha256} of a manifest with the snapshot shape; SnapshotError naming `where`
    otherwise.

    The shape: a JSON object; ``version`` a positive integer (equal to `version` when given); ``files``
    a map from plain file names (not ``manifest.json``) to lowercase hex sha256 digests that lists
    ``model.safetensors``, with at most `max_files` entries when given. With `student`, also a
    ``student`` section whose ``model`` names a built-in model (:func:`check_manifest_model_spec`):
    what rebuilds the student from the snapshot must never be told to load a model file.
    """
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{where}: manifest is not a JSON object")
    v = manifest.get("version")
    if type(v) is not int or not is_version(str(v)):
        raise SnapshotError(f"{where}: manifest version {v!r} is not a positive integer")
    if version is not None and v != version:
        raise SnapshotError(f"{where}: manifest names version {v}, not {version}")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise SnapshotError(f"{where}: manifest has no files map listing {MODEL_FILE}")
    if max_files is not None and len(files) > max_files:
        raise SnapshotError(f"{where}: manifest lists {len(files)} files, more than the limit of {max_files}")
    for name, sha in files.items():
        # A name becomes a path in the version folder: only plain names ('..', '/', NUL, dot files are refused).
        if not safe_name(name) or name == MANIFEST_FILE:
            raise SnapshotError(f"{where}: manifest lists an unsafe file name {name!r}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise SnapshotError(f"{where}: manifest sha256 of {name!r} is malformed: {repr(sha)[:80]}")
    if student:
        section = manifest.get("student")
        if not isinstance(section, dict):
            raise SnapshotError(f"{where}: manifest has no `student` section")
        check_manifest_model_spec(section.get("model"), where)
    return files


def student_geometry(student: dict) -> tuple[int, int, int]:
    """(channels, H, W) of a manifest's `student` section (from channels/input_size, else input_shape)."""
    shape = student.get("input_shape")
    try:
        c = int(student["channels"]) if "channels" in student else int(shape[1])
        h, w = (int(v) for v in (student["input_size"] if "input_size" in student else shape[2:4]))
    except (TypeError, ValueError, IndexError, KeyError):
        raise SnapshotError(f"manifest `student` has no usable channels/input_size/input_shape: {student}") from None
    return c, h, w


def verify_files(version_dir: str | Path, files: dict[str, str]) -> None:
    """Check every listed file's sha256 in `version_dir`; SnapshotError for the first missing or differing one."""
    vdir = Path(version_dir)
    for name, expected in sorted(files.items()):
        try:
            got = sha256_file(vdir / name)
        except FileNotFoundError:
            raise SnapshotError(f"{vdir / name}: listed in the manifest but missing") from None
        if got != expected:
            raise SnapshotError(f"{vdir / name}: sha256 {got[:12]}… does not match the manifest's {expected[:12]}…")


def read_manifest(version_dir: str | Path, verify: bool = True, *, student: bool = True) -> dict:
    """Parse and check `version_dir`/manifest.json (:func:`check_manifest`; with `student`, its student
    section too); with `verify`, check every listed file's sha256. The folder may have any name (a copy
    renumbered for a model repository still reads)."""
    vdir = Path(version_dir)
    path = vdir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{vdir}: {MANIFEST_FILE} missing") from None
    manifest = parse_manifest(raw, str(path))
    files = check_manifest(manifest, str(path), student=student)
    if verify:
        verify_files(vdir, files)
    return manifest


def resolve_version_dir(path: str | Path) -> Path:
    """A version folder (has manifest.json) as is; a snapshot root -> the version LATEST names.

    When LATEST is missing or names a version that is not there, the highest
    version folder with a manifest is used instead (the daemon writes folders
    before LATEST).
    """
    p = Path(path)
    if not p.is_dir():
        raise SnapshotError(f"{p}: no such directory")
    if (p / MANIFEST_FILE).is_file():
        return p
    latest = read_latest(p)
    if latest is not None and (p / str(latest) / MANIFEST_FILE).is_file():
        return p / str(latest)
    present = [v for v in list_versions(p) if (p / str(v) / MANIFEST_FILE).is_file()]
    if present:
        if latest is not None:
            log.warning("%s names version %d, which is not there; using version %d", p / LATEST_FILE, latest,
                        present[-1])
        return p / str(present[-1])
    raise SnapshotError(f"{p}: neither a snapshot version folder (no {MANIFEST_FILE}) "
                        f"nor a snapshot directory (no {LATEST_FILE} / numeric version folders)")
