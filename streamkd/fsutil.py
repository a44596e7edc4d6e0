"""Durable, atomic file-system writes shared by checkpoints and snapshots.

The rule everywhere: write under a temporary name in the *same* directory
(so the final rename never crosses file systems), fsync the data, rename
over the final name, then fsync the directory. Only the directory fsync
makes the rename itself survive a power loss; fsyncing the file alone
persists its bytes but not the name pointing at them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_publish_dir", "atomic_write_bytes", "fsync_dir", "fsync_tree", "remove_tree", "sha256_file"]

_CHUNK = 1 << 20


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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
    for root, dirs, files in os.walk(directory, topdown=False):
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
