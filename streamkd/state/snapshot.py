"""Serving snapshots: numbered, immutable, atomically published student weights.

The folder layout and the manifest's shape are :mod:`streamkd.state.layout`.
With Triton, `<dir>` is a model folder of a model repository: Triton reads
`<dir>/config.pbtxt` and serves the newest numeric version folder.

A version folder is written as `.tmp-<v>`, fsynced and renamed, and only then
is `LATEST` replaced, so a reader that follows `LATEST` never sees a partial
snapshot. Pruned versions are renamed away before deletion, so a version is
either complete or absent (a reader that loses the race sees "gone": retry).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from streamkd.state.fsutil import (
    atomic_publish_dir,
    atomic_write_bytes,
    prune_dirs,
    remove_leftovers,
    remove_tree,
    sha256_file,
)
from streamkd.state.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    MODEL_LEVEL_FILES,
    SnapshotError,
    check_manifest,
    list_versions,
    parse_manifest,
    read_latest,
    safe_name,
    verify_files,
)

__all__ = ["NonFiniteWeights", "SnapshotStore", "rfc3339_now"]

_TRASH = re.compile(r"\.trash-([0-9]+)-")
log = logging.getLogger(__name__)


class NonFiniteWeights(ValueError):
    """Refused to publish: some floating tensor holds NaN or Inf."""


class _Gone(Exception):
    """The version folder does not exist (never published, or pruned meanwhile)."""


def rfc3339_now() -> str:
    """Current UTC time as RFC 3339 with milliseconds, e.g. 2026-11-28T21:40:00.123Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_safe(x: Any) -> Any:
    """Make a manifest strict JSON: non-finite floats -> null, keys -> str."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SnapshotStore:
    """Publish and read serving snapshots under one directory."""

    def __init__(
        self,
        directory: str | Path,
        keep: int = 5,
        on_fallback: Callable[[int, str], None] | None = None,
        on_published: Callable[[int, Path], None] | None = None,
    ) -> None:
        """`on_published(version, version_dir)` runs after LATEST names a new version (e.g. an upload)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.on_fallback = on_fallback
        self.on_published = on_published
        self.uploader: Any = None  # a streamkd.state.publish.Uploader when built from a config with publish_to
        self.directory.mkdir(parents=True, exist_ok=True)
        self._publish_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        # version -> (file names, their stat signature, manifest or failure reason)
        self._cache: dict[int, tuple[tuple[str, ...], tuple, dict | str]] = {}
        self._reported: set[tuple[int, str]] = set()  # (version, reason) already passed to on_fallback
        self._cleaned = False
        self._last_published = 0

    # ---- reading -------------------------------------------------------

    def versions(self) -> list[int]:
        """Published version numbers on disk, ascending."""
        return list_versions(self.directory)

    def _read_latest(self) -> int | None:
        return read_latest(self.directory)

    def _signature(self, vdir: Path, names: list[str]) -> tuple:
        return tuple(_stat_key(vdir / n) for n in [MANIFEST_FILE, *names])

    def _verify(self, version: int) -> dict | str:
        """The manifest, or why the version is broken; raises _Gone when its folder does not exist."""
        vdir = self.directory / str(version)
        with self._cache_lock:
            cached = self._cache.get(version)
        if cached is not None:
            names, sig, result = cached
            if self._signature(vdir, list(names)) == sig:
                return result
        if not vdir.is_dir():
            raise _Gone(version)
        result, names, sig = self._verify_uncached(version, vdir)
        if not vdir.is_dir():  # pruned while we were hashing: gone, not broken
            raise _Gone(version)
        with self._cache_lock:
            self._cache[version] = (tuple(names), sig, result)
        return result

    def _verify_uncached(self, version: int, vdir: Path) -> tuple[dict | str, list[str], tuple]:
        # Stat before reading: if a file changes after this, the next call sees a new signature.
        sig = self._signature(vdir, [])
        try:
            manifest = parse_manifest((vdir / MANIFEST_FILE).read_bytes(), MANIFEST_FILE)
            files = check_manifest(manifest, MANIFEST_FILE, version=version)
        except FileNotFoundError:
            return f"{MANIFEST_FILE} missing", [], sig
        except SnapshotError as e:
            return str(e), [], sig
        names = sorted(files)
        sig = self._signature(vdir, names)
        try:
            verify_files(vdir, files)
        except SnapshotError as e:
            return str(e), names, sig
        return manifest, names, sig

    def _check(self, version: int, report: bool) -> dict | None:
        """Verified manifest of `version` or None; `report`: tell on_fallback (once) when broken."""
        try:
            result = self._verify(version)
        except _Gone:
            return None
        if isinstance(result, str):
            if report:
                self._report(version, result)
            return None
        return result

    def _report(self, version: int, reason: str) -> None:
        with self._cache_lock:
            if (version, reason) in self._reported:
                return
            self._reported.add((version, reason))
        log.warning("snapshot %d is unusable (%s); falling back to an older one", version, reason)
        if self.on_fallback is not None:
            self.on_fallback(version, reason)

    def latest(self) -> dict | None:
        """Manifest of the newest valid snapshot (LATEST first, then older ones), or None.

        Verification (sha256 of every file) is cached per version and file
        stat (inode, size, mtime), so repeated calls only stat.
        `on_fallback(version, reason)` is called once per broken version and reason.
        """
        for attempt in range(5):
            head = self._read_latest()
            older = [v for v in reversed(self.versions()) if head is None or v < head]
            if head is not None:
                found = self._check(head, report=True)
                if found is not None:
                    return copy.deepcopy(found)
                if not (self.directory / str(head)).is_dir():
                    if self._read_latest() == head:
                        self._report(head, "version folder missing")
                    elif attempt < 4:
                        continue  # a publisher moved LATEST on and pruned `head`: read it again
            for v in older:
                found = self._check(v, report=True)
                if found is not None:
                    return copy.deepcopy(found)
            return None
        return None

    def manifest(self, version: int) -> dict | None:
        """Verified manifest of one version, or None when missing or broken."""
        found = self._check(version, report=False)
        return copy.deepcopy(found) if found is not None else None

    def file_path(self, version: int, name: str) -> Path | None:
        """Path of a file listed in that version's manifest (or manifest.json itself).

        Anything else (unlisted, '..', '/', NUL, absolute) -> None.
        """
        if not safe_name(name):
            return None
        found = self._check(version, report=False)
        if found is None or (name != MANIFEST_FILE and name not in found["files"]):
            return None
        path = self.directory / str(version) / name
        # Belt and braces: the resolved file must sit directly in the version folder.
        if path.resolve().parent != (self.directory / str(version)).resolve():
            return None
        return path

    # ---- publishing ----------------------------------------------------

    def publish(
        self,
        weights: Mapping[str, torch.Tensor],
        manifest: Mapping[str, Any],
        extra_files: Mapping[str, Callable[[Path], None]] | None = None,
        write_extras: Callable[[Path], None] | None = None,
    ) -> dict:
        """Write a new version and point LATEST at it; returns the full manifest.

        `weights` may live on any device; contiguous CPU copies are saved (so
        tied/shared tensors are fine). `extra_files[name](path)` must write
        `path` (e.g. model.onnx). `write_extras(folder)` then runs with the
        version folder under construction (model.safetensors already in it) and
        may add any plain files (e.g. exports made by another process). Every
        file is hashed into the manifest. Raises NonFiniteWeights on NaN/Inf.
        """
        cpu = {}
        for name, t in weights.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weights[{name!r}] is {type(t).__name__}, not a Tensor")
            cpu[name] = t.detach().to("cpu", copy=True).contiguous()
        floating = {n: t for n, t in cpu.items() if t.is_floating_point() or t.is_complex()}
        bad = [n for n, t in floating.items() if not bool(torch.isfinite(t).all())]
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise NonFiniteWeights(f"refusing to publish non-finite weights in {', '.join(bad[:5])}{more}")
        extra_files = dict(extra_files or {})
        for name in extra_files:
            if not safe_name(name) or name in (MODEL_FILE, MANIFEST_FILE):
                raise ValueError(f"invalid extra file name {name!r}")
        base = _json_safe(dict(manifest))
        json.dumps(base, allow_nan=False)  # fail on non-JSON values before touching disk

        with self._publish_lock:
            if not self._cleaned:
                self._remove_stale()
            version = self._next_version()
            tmp = self.directory / f".tmp-{version}"
            remove_tree(tmp)
            tmp.mkdir()
            try:
                save_file(cpu, str(tmp / MODEL_FILE), metadata={"format": "pt"})
                for name, write in extra_files.items():
                    write(tmp / name)
                    if not (tmp / name).is_file():
                        raise FileNotFoundError(f"extra file writer for {name!r} did not create it")
                if write_extras is not None:
                    write_extras(tmp)
                files = {}
                for p in sorted(tmp.iterdir()):  # writers may add companions (e.g. ONNX external data)
                    if not p.is_file() or not safe_name(p.name):
                        raise ValueError(f"unexpected entry {p.name!r} in snapshot (only plain files)")
                    files[p.name] = sha256_file(p)
                full = {**base, "version": version, "created_at": rfc3339_now(), "files": files}
                (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, allow_nan=False) + "\n", encoding="utf-8")
                # Model-level copies before the version folder appears: a poller that sees it reads a matching config.
                for name in MODEL_LEVEL_FILES:
                    if name in files:
                        atomic_write_bytes(self.directory / name, (tmp / name).read_bytes())
                atomic_publish_dir(tmp, self.directory / str(version))
            except BaseException:
                remove_tree(tmp)  # e.g. ENOSPC: the published versions and LATEST stay as they were
                raise
            # Only now is the version complete on disk; readers follow LATEST.
            atomic_write_bytes(self.directory / LATEST_FILE, f"{version}\n".encode())
            self._last_published = version
            self._prune(head=version)
        if self.on_published is not None:
            self.on_published(version, self.directory / str(version))
        return copy.deepcopy(full)

    # ---- lifecycle -----------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, on_fallback: Callable[[int, str], None] | None = None) -> SnapshotStore:
        """A store for the `snapshot` config section: `dir`, `keep`, and with `publish_to` an
        :class:`~streamkd.state.publish.Uploader` that copies every published version there in the background."""
        store = cls(cfg.dir, keep=cfg.keep, on_fallback=on_fallback)
        if getattr(cfg, "publish_to", None):
            from streamkd.state.publish import Uploader

            uploader = Uploader(cfg.publish_to, dict(cfg.publish_options), keep=cfg.keep,
                                backoff_max_s=cfg.publish_backoff_max_s)
            uploader.start()
            store.on_published = uploader.submit
            store.uploader = uploader
        return store

    def close(self, timeout: float = 30.0) -> None:
        """Let background uploads finish (up to `timeout` seconds), then stop them."""
        if self.uploader is not None:
            self.uploader.close(timeout)

    def _next_version(self) -> int:
        """Newest number ever used + 1: folders, LATEST, trash, and this process's memory.

        Never reusing a number matters because clients cache by version (ETags).
        """
        used = [self._last_published, self._read_latest() or 0]
        for n in os.listdir(self.directory):
            if n.isascii() and n.isdigit():
                used.append(int(n))
            elif m := _TRASH.match(n):
                used.append(int(m.group(1)))
        return max(used) + 1

    def _remove_stale(self) -> None:
        """Drop leftovers of a crashed publisher (done lazily by the writer, never by readers
        in other processes, which could otherwise delete an in-flight publication)."""
        remove_leftovers(self.directory)
        self._cleaned = True

    def _prune(self, head: int) -> None:
        vs = self.versions()
        old = [v for v in vs[: max(0, len(vs) - self.keep)] if v != head]
        pruned = {int(p.name) for p in prune_dirs(self.directory / str(v) for v in old)}
        with self._cache_lock:
            for v in pruned:
                self._cache.pop(v, None)
