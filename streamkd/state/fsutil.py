"""Durable, atomic file-system writes shared by checkpoints and snapshots.

The rule everywhere: write under a temporary name in the *same* directory
(so the final rename never crosses file systems), fsync the data, rename
over the final name, then fsync the directory. Only the directory fsync
makes the rename itself survive a power loss; fsyncing the file alone
persists its bytes but not the name pointing at them.

`lock_dirs` makes a state directory (checkpoints, snapshots) belong to one
process at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no directory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "DirLockedError", "atomic_publish_dir", "atomic_write_bytes", "fsync_dir", "fsync_tree",
           "lock_dirs", "prune_dirs", "remove_leftovers", "remove_tree", "sha256_file", "unlock_dirs"]

_CHUNK = 1 << 20
log = logging.getLogger(__name__)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames/creations/deletions inside it are durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):  # platforms (Windows) that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems (and Windows) refuse fsync on a directory; the data
        # files themselves were fsynced, which is the best that can be done there.
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably.

    A reader sees either the old content or the new one, never a mix. On any
    failure (ENOSPC, ...) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(directory: str | Path) -> None:
    """fsync every file below `directory`, then every directory bottom-up."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def remove_tree(path: str | Path) -> None:
    """Best-effort recursive delete (used for temporaries and pruning)."""
    shutil.rmtree(path, ignore_errors=True)


def prune_dirs(folders: Iterable[str | Path]) -> list[Path]:
    """Delete whole folders (old checkpoints, old snapshot versions), each in one visible step.

    Each folder is first renamed to ``.trash-<name>-<random>`` beside it, so it
    vanishes at once instead of file by file (a reader never finds it half
    deleted), then the trash is removed. A folder that cannot be renamed is
    logged and left. Returns the folders removed; each parent is fsynced.
    """
    removed: list[Path] = []
    parents: set[Path] = set()
    for folder in map(Path, folders):
        trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
        parents.add(folder.parent)
        try:
            os.rename(folder, trash)
        except OSError as e:
            log.warning("could not prune %s: %s", folder, e)
            continue
        remove_tree(trash)
        removed.append(folder)
    for parent in parents:
        fsync_dir(parent)
    return removed


def remove_leftovers(directory: str | Path, prefixes: tuple[str, ...] = (".tmp-", ".trash-")) -> None:
    """Remove what an interrupted writer or pruner left in `directory`: entries named with one of `prefixes`
    (folders and files). Only for the directory's one writer: another writer's temporaries are in flight."""
    d = Path(directory)
    for name in os.listdir(d):
        if name.startswith(prefixes):
            p = d / name
            if p.is_dir() and not p.is_symlink():
                remove_tree(p)
            else:
                p.unlink(missing_ok=True)


def atomic_publish_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Make a fully written `tmp_dir` appear as `final_dir` in one step.

    Everything is fsynced before the rename, so once the name exists its
    content is complete on disk; the parent is fsynced after, so the name
    itself survives a crash. `final_dir` must not exist (a directory rename
    never overwrites a non-empty one). If the rename fails, `tmp_dir` is
    removed and nothing visible changes.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    try:
        fsync_tree(tmp_dir)
        if final_dir.exists():
            raise FileExistsError(f"{final_dir} already exists")
        os.replace(tmp_dir, final_dir)  # a rename(2); checked above that it replaces nothing
    except BaseException:
        remove_tree(tmp_dir)
        raise
    fsync_dir(final_dir.parent)


# ---- one process per state directory ------------------------------------------------

LOCK_FILE = ".streamkd.lock"

# flock(2) locks belong to an open file: a second open of the same lock file in this
# process would conflict with the first. So a process takes each lock once and keeps
# it (the kernel releases it when the process exits, however it exits).
_held: dict[str, int] = {}
_held_guard = threading.Lock()


class DirLockedError(RuntimeError):
    """Another process holds the state directory's lock (the message names the folder and its pid)."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "a process that has not written its pid yet"
        super().__init__(f"{directory} is in use by another streamkd daemon ({holder}, lock file "
                         f"{directory / LOCK_FILE}); point this one at its own state directory, or stop that one")
        self.directory, self.pid = directory, pid


def lock_dirs(*directories: str | Path) -> None:
    """Hold an exclusive lock on each directory (created if missing) for the rest of this process's life.

    The lock is a `flock` on ``<directory>/.streamkd.lock``, which holds the owner's pid. A lock this
    process already holds is taken again without effect. Raises DirLockedError when another process
    holds one; the locks this call took are released then.
    """
    taken: list[Path] = []
    try:
        for d in directories:
            if _lock(Path(d)):
                taken.append(Path(d))
    except BaseException:
        unlock_dirs(*taken)
        raise


def unlock_dirs(*directories: str | Path) -> None:
    """Release locks taken by `lock_dirs` in this process (no-op for those not held)."""
    for d in directories:
        with _held_guard:
            fd = _held.pop(os.path.realpath(d), None)
        if fd is not None:
            os.close(fd)  # closing releases the flock


def _lock(directory: Path) -> bool:
    """Lock one directory; False when this process held it already."""
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    with _held_guard:
        if key in _held or fcntl is None:
            return False
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DirLockedError(directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # The pid is only for the message a second process prints; the flock is the lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = fd
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
