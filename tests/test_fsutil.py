"""Pruning whole folders in one visible step, and clearing what an interrupted writer left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from streamkd.state import fsutil
from streamkd.state.fsutil import prune_dirs, remove_leftovers


def make_folder(path: Path) -> Path:
    path.mkdir()
    (path / "data").write_bytes(b"x" * 100)
    return path


def test_prune_renames_to_trash_before_deleting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = [make_folder(tmp_path / n) for n in ("1", "2")]
    keep = make_folder(tmp_path / "3")
    seen: list[tuple[str, list[str]]] = []
    real_remove = fsutil.remove_tree

    def remove(path):  # when the contents go, the folder's own name must already be gone
        seen.append((Path(path).name, sorted(os.listdir(tmp_path))))
        real_remove(path)

    monkeypatch.setattr(fsutil, "remove_tree", remove)
    assert prune_dirs(old) == old
    assert sorted(os.listdir(tmp_path)) == ["3"] and (keep / "data").is_file()
    assert len(seen) == 2
    for trash, listing in seen:
        name = trash.split("-")[1]  # .trash-<name>-<random>
        assert trash.startswith(".trash-") and trash in listing and name not in listing


def test_a_folder_that_cannot_be_renamed_is_left_and_logged(tmp_path: Path, monkeypatch, caplog) -> None:
    a, b = make_folder(tmp_path / "1"), make_folder(tmp_path / "2")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == a:
            raise OSError(errno.EBUSY, "busy")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert prune_dirs([a, b]) == [b]
    assert sorted(os.listdir(tmp_path)) == ["1"] and "could not prune" in caplog.text


def test_remove_leftovers_clears_temporary_folders_and_files_only(tmp_path: Path) -> None:
    make_folder(tmp_path / ".tmp-4")
    make_folder(tmp_path / ".trash-2-abcd1234")
    (tmp_path / ".tmp-LATEST.x1y2").write_text("3\n")  # an atomic write cut short
    make_folder(tmp_path / "3")
    (tmp_path / "LATEST").write_text("3\n")
    (tmp_path / ".etags.json").write_text("{}")
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".etags.json", "3", "LATEST"]
