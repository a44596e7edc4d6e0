"""Training checkpoints: student weights + optimizer + Kafka offsets, for resume.

Layout (one folder per checkpoint, newest = highest step)::

    <dir>/step-000000001200/
        state.pt      # torch.save({"student": ..., "optimizer": ...})
        meta.json     # step, samples_seen, offsets, extra, sha256 of state.pt, sha256 of itself

Exactly-once hinges on this module: the daemon commits Kafka offsets only
after `save` returns, so `save` returns only once the data *and* the rename
are on disk. A checkpoint that fails any check on load (bad meta, checksum
mismatch, unpicklable or non-tensor content; a meta.json that is damaged in
any way, even into other valid JSON) is skipped in favour of the previous
one. `state.pt` is read with `torch.load(weights_only=True)` only: a crafted
file can fail to load, never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamkd.state.fsutil import atomic_publish_dir, fsync_dir, prune_dirs, remove_tree

__all__ = ["CheckpointError", "CheckpointStore", "TrainState", "is_finite_state"]

FORMAT_VERSION = 1
_NAME = re.compile(r"step-(\d{12})")
_STATE, _META = "state.pt", "meta.json"
_MAX_META_BYTES = 16 << 20  # offsets of a few thousand partitions fit many times over
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTITION = re.compile(r"0|[1-9][0-9]{0,9}")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint on disk is unusable (the message says why)."""


@dataclass
class TrainState:
    step: int
    samples_seen: int  # trained samples in this model lineage
    offsets: dict[str, dict[int, int]]  # topic -> partition -> next offset to consume
    student: dict[str, torch.Tensor]  # state_dict, CPU tensors
    optimizer: dict  # optimizer.state_dict() with CPU tensors
    extra: dict = field(default_factory=dict)  # JSON-able: config_sha256, teacher sha256, scheduler step, ...
    # What else the lineage learns with, as tensors and plain values (loads with weights_only=True):
    # the replay buffer, the EMA weights, the holdout, the budget controller, the learning-rate boost, the
    # drift monitor's counters and moving averages.
    learning: dict = field(default_factory=dict)


def is_finite_state(student: dict[str, torch.Tensor]) -> bool:
    """True when no floating/complex tensor of a state_dict holds NaN or Inf."""
    for t in student.values():
        floating = isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
        if floating and not bool(torch.isfinite(t).all()):
            return False
    return True


def _dir_name(step: int) -> str:
    return f"step-{step:012d}"


def _check_offsets(offsets: object) -> dict[str, dict[int, int]]:
    """Validate {topic: {partition: offset}}; JSON gives partition keys as strings."""
    if not isinstance(offsets, dict):
        raise CheckpointError("offsets is not an object")
    out: dict[str, dict[int, int]] = {}
    for topic, parts in offsets.items():
        if not isinstance(topic, str) or not isinstance(parts, dict):
            raise CheckpointError(f"offsets[{topic!r}] is not an object")
        out[topic] = {}
        for p, off in parts.items():
            if not isinstance(p, str) or not _PARTITION.fullmatch(p):
                raise CheckpointError(f"offsets[{topic!r}] has a partition {p!r} that is not a non-negative integer")
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise CheckpointError(f"offsets[{topic!r}][{p!r}] is not a non-negative integer")
            out[topic][int(p)] = off
    return out


def _meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content without its own digest (canonical JSON: key order and spacing fixed)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_meta(path: Path) -> dict:
    """Parse and check meta.json of the checkpoint folder `path`; CheckpointError for any damage."""
    try:
        with open(path / _META, "rb") as f:
            raw = f.read(_MAX_META_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError("meta.json missing") from None
    if len(raw) > _MAX_META_BYTES:
        raise CheckpointError(f"meta.json is larger than {_MAX_META_BYTES} bytes")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"meta.json does not parse: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise CheckpointError("meta.json is not an object")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        # Older checkpoints have no digest; a damaged one that still parses is caught here.
        raise CheckpointError("meta.json sha256 mismatch (damaged)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"meta.json has unknown format {meta.get('format')!r}")
    for key in ("step", "samples_seen"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 0:
            raise CheckpointError(f"meta.json: {key} is not a non-negative integer")
    if _NAME.fullmatch(path.name) and int(path.name[len("step-"):]) != meta["step"]:
        raise CheckpointError(f"meta.json: step {meta['step']} does not match the folder name")
    if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
        raise CheckpointError("meta.json: sha256 of state.pt is missing or malformed")
    if not isinstance(meta.get("extra", {}), dict):
        raise CheckpointError("meta.json: extra is not an object")
    return meta


class CheckpointStore:
    """Atomic, checksummed training checkpoints with fallback to older ones."""

    def __init__(
        self,
        directory: str | Path,
        keep: int = 3,
        on_fallback: Callable[[Path, str], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.on_fallback = on_fallback
        self._lock = threading.Lock()  # save() may run on a background thread
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Undo what a crash mid-save or mid-prune left behind."""
        for p in self.directory.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                remove_tree(p)  # never renamed into place: not a checkpoint
            elif p.name.startswith(".old-"):
                # Crash while replacing a same-step checkpoint: the old one was
                # moved aside; restore it unless the new one made it into place.
                final = self.directory / p.name[len(".old-"):]
                if final.exists():
                    remove_tree(p)
                else:
                    os.rename(p, final)
        fsync_dir(self.directory)

    def list(self) -> list[Path]:
        """Checkpoint folders with a well-formed name, newest (highest step) first."""
        found = [p for p in self.directory.iterdir() if _NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[len("step-"):]), reverse=True)

    def save(self, state: TrainState) -> Path:
        """Write `state` durably; when this returns, the checkpoint survives a crash."""
        if state.step < 0:
            raise ValueError(f"step must be >= 0, got {state.step}")
        offsets = {t: {str(p): int(o) for p, o in parts.items()} for t, parts in state.offsets.items()}
        # Encode meta first: a non-JSON `extra` fails before anything touches disk.
        meta = {
            "format": FORMAT_VERSION,
            "step": int(state.step),
            "samples_seen": int(state.samples_seen),
            "offsets": offsets,
            "extra": state.extra,
        }
        json.dumps(meta)
        buf = io.BytesIO()
        torch.save({"student": state.student, "optimizer": state.optimizer, "learning": state.learning}, buf)
        data = buf.getbuffer()
        meta["sha256"] = hashlib.sha256(data).hexdigest()
        meta["size"] = len(data)
        meta["meta_sha256"] = _meta_digest(meta)

        with self._lock:
            final = self.directory / _dir_name(state.step)
            tmp = self.directory / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                (tmp / _STATE).write_bytes(data)
                (tmp / _META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            except BaseException:
                remove_tree(tmp)  # e.g. ENOSPC: leave the existing checkpoints as they were
                raise
            if final.exists():
                self._replace(tmp, final)
            else:
                atomic_publish_dir(tmp, final)  # fsyncs files, tmp dir, and the parent after the rename
            self._prune(keep_also=final)
        return final

    def _replace(self, tmp: Path, final: Path) -> None:
        """Replace an existing checkpoint of the same step (e.g. later offsets, no new step).

        A non-empty directory cannot be renamed over, so the old one is moved
        aside first; `_recover` puts it back if we crash in between.
        """
        aside = self.directory / f".old-{final.name}"
        remove_tree(aside)
        os.rename(final, aside)
        try:
            atomic_publish_dir(tmp, final)
        except BaseException:
            os.rename(aside, final)
            fsync_dir(self.directory)
            raise
        remove_tree(aside)

    def _prune(self, keep_also: Path) -> None:
        # Runs only after the new checkpoint is durable, so a crash here never
        # leaves fewer than `keep` usable checkpoints behind.
        # Renamed first, so a half-deleted folder never looks like a corrupt checkpoint.
        prune_dirs(old for old in self.list()[self.keep:] if old != keep_also)

    def load(self, path: str | Path) -> TrainState:
        """Load and fully verify one checkpoint folder; raises CheckpointError when unusable."""
        path = Path(path)
        meta = _read_meta(path)
        offsets = _check_offsets(meta.get("offsets"))
        extra = meta.get("extra", {})
        try:
            data = (path / _STATE).read_bytes()  # read once: the bytes we hash are the bytes we load
        except FileNotFoundError:
            raise CheckpointError("state.pt missing") from None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise CheckpointError(f"state.pt sha256 mismatch ({len(data)} bytes)")
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure means "corrupt": UnpicklingError, bad zip, ...
            raise CheckpointError(f"state.pt does not load: {type(e).__name__}: {e}") from None
        if not isinstance(blob, dict) or not all(isinstance(blob.get(k), dict) for k in ("student", "optimizer")):
            raise CheckpointError("state.pt lacks student/optimizer dicts")
        student = blob["student"]
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in student.items()):
            raise CheckpointError("state.pt: student is not a str -> Tensor state_dict")
        learning = blob.get("learning", {})  # absent in checkpoints written before replay/EMA existed
        if not isinstance(learning, dict):
            raise CheckpointError("state.pt: learning is not a dict")
        return TrainState(
            step=meta["step"],
            samples_seen=meta["samples_seen"],
            offsets=offsets,
            student=student,
            optimizer=blob["optimizer"],
            extra=extra,
            learning=learning,
        )

    def load_latest(self) -> TrainState | None:
        """The newest checkpoint that verifies, or None when there is none.

        Each one skipped is reported via `on_fallback(path, reason)` and logged.
        """
        for path in self.list():
            try:
                return self.load(path)
            except (CheckpointError, OSError) as e:
                if not path.exists():
                    continue  # pruned by a concurrent save(): gone, not corrupt
                reason = str(e)
                log.warning("checkpoint %s unusable (%s); falling back to the previous one", path, reason)
                if self.on_fallback is not None:
                    self.on_fallback(path, reason)
        return None
