"""One daemon per state directory: an flock on the checkpoint and snapshot folders, held by a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, fmnist_pngs, free_port, produce_values, write_config

from streamkd.state.fsutil import LOCK_FILE, DirLockedError, lock_dirs, unlock_dirs

HOLDER = textwrap.dedent("""
    import sys, time
    from streamkd.state.fsutil import lock_dirs
    lock_dirs(*sys.argv[1:])
    print("locked", flush=True)
    time.sleep(60)
""")


def hold(*dirs: Path) -> subprocess.Popen:
    """Another process that takes the locks on `dirs` and keeps them."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, dirs)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_held_by_another_process_names_folder_and_pid(tmp_path) -> None:
    ckpt, snap = tmp_path / "ckpt", tmp_path / "snap"
    holder = hold(ckpt)
    try:
        with pytest.raises(DirLockedError) as e:
            lock_dirs(snap, ckpt)
        assert e.value.pid == holder.pid
        assert str(ckpt) in str(e.value) and f"pid {holder.pid}" in str(e.value)
        # The lock this call took on `snap` was released with the failure.
        other = hold(snap)
        other.kill()
        other.wait()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with its holder: free again, and the file now names this process.
    lock_dirs(ckpt)
    try:
        assert (ckpt / LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        unlock_dirs(ckpt)


def test_same_process_may_take_its_locks_again_and_share_one_folder(tmp_path) -> None:
    d = tmp_path / "state"
    lock_dirs(d, d)  # checkpoint.dir == snapshot.dir
    try:
        lock_dirs(d)  # a second build() in the same process
    finally:
        unlock_dirs(d)
    holder = hold(d)  # released: another process can take it
    holder.kill()
    holder.wait()


@pytest.mark.kafka
@pytest.mark.slow
def test_second_daemon_on_the_same_state_exits_2_and_first_keeps_training(broker, topic, tmp_path,
                                                                         daemon_factory) -> None:
    values, _ = fmnist_pngs(600)
    produce_values(broker.bootstrap, topic, values[:300])
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port)
    first = daemon_factory(config, port)
    first.wait_metric("streamkd_samples_trained_total", 300, timeout=180)

    second = subprocess.run(
        [sys.executable, "-m", "streamkd", "run", "-c", str(config), "--set", f"metrics.port={free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert str(tmp_path / "ckpt") in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr

    # The first one never noticed: it trains what comes next and stops cleanly.
    produce_values(broker.bootstrap, topic, values[300:])
    first.wait_metric("streamkd_samples_trained_total", 600, timeout=180)
    assert (tmp_path / "ckpt" / LOCK_FILE).read_text().strip() == str(first.proc.pid)
    assert (tmp_path / "snap" / LOCK_FILE).read_text().strip() == str(first.proc.pid)
    assert first.stop() == 0, first.tail()
