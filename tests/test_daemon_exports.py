"""The daemon with snapshot.formats [onnx, torchscript] and a snapshot every 5 steps, uploading to a
file:// target: it trains through every record, and each export comes from a child process."""

from __future__ import annotations

import pytest
from conftest import fmnist_pngs, free_port, produce_values, write_config

from streamkd.state.snapshot import SnapshotStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_daemon_exports_every_few_steps_and_uploads(broker, topic, tmp_path, daemon_factory):
    values, _ = fmnist_pngs(480)
    produce_values(broker.bootstrap, topic, values)
    port = free_port()
    remote = tmp_path / "bucket" / "student"
    config = write_config(tmp_path, broker.bootstrap, topic, port,
                          snapshot={"every_steps": 5, "formats": ["onnx", "torchscript"],
                                    "publish_to": f"file://{remote}"},
                          # The final snapshot waits for the one exporting, then exports: seconds each on a
                          # small CPU. The checkpoint is durable before either (test_loop.py).
                          train={"shutdown_grace_s": 120})
    d = daemon_factory(config, port)
    d.wait_metric("streamkd_samples_trained_total", 480, timeout=300)
    assert d.stop(timeout=180) == 0, d.tail()
    log = d.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
    store = SnapshotStore(tmp_path / "snap")
    m = store.latest()
    assert m["samples_seen"] == 480
    assert {"model.onnx", "model.pt", "config.pbtxt"} <= set(m["files"])
    assert (tmp_path / "snap" / "config.pbtxt").is_file()
    # The upload of the final snapshot finished before the daemon exited: LATEST last, files verified.
    uploaded = SnapshotStore(remote).latest()
    assert uploaded is not None and uploaded["version"] == m["version"] and uploaded["files"] == m["files"]
