"""End to end against a real broker: the daemon as a user runs it (a subprocess), checked from outside."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import fmnist_pngs, free_port, produce_values, write_config
from kafka import KafkaConsumer, TopicPartition

from streamkd.serve.pull import pull_once
from streamkd.state.fsutil import sha256_file
from streamkd.state.snapshot import SnapshotStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(3)}
    finally:
        c.close()


def test_daemon_trains_publishes_and_resumes_exactly_once(broker, topic, tmp_path, daemon_factory):
    values, _ = fmnist_pngs(2000)
    counts = produce_values(broker.bootstrap, topic, values)
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port)

    d = daemon_factory(config, port)
    d.wait_metric("streamkd_samples_trained_total", 2000, timeout=240)
    assert d.get("/healthz")[0] == 200
    assert d.get("/readyz")[0] == 200
    assert d.metric("streamkd_messages_consumed_total") == 2000
    assert d.metric("streamkd_train_steps_total") >= 2000 / 32
    body = d.get("/metrics")[1].decode()
    for name in ("streamkd_build_info{", "streamkd_consumer_lag_messages{", "streamkd_teacher_inference_seconds_bucket",
                 "streamkd_train_step_seconds_bucket", "streamkd_kd_loss ", "streamkd_last_snapshot_version "):
        assert name in body, name
    time.sleep(2.5)  # the gauges follow the lineage once a second; nothing more is trained after 2,000
    agreement = d.metric("streamkd_teacher_agreement_ratio")
    assert d.stop() == 0, d.tail()
    # After a clean stop the final snapshot covers everything consumed.
    store = SnapshotStore(tmp_path / "snap")
    m = store.latest()
    assert m is not None
    assert m["samples_seen"] == 2000
    assert m["offsets"] == {topic: {str(p): n for p, n in counts.items()}}
    assert m["metrics"]["agreement"] > 0.5, m["metrics"]  # chance is 0.1 on 10 classes
    # The exported gauge is the lineage's own figure: the one the final manifest carries.
    assert agreement == pytest.approx(m["metrics"]["agreement"], rel=1e-9)
    assert set(m["files"]) >= {"model.safetensors"}
    assert committed(broker.bootstrap, topic, f"g-{topic}") == counts

    # Produce more, restart: it resumes from the checkpoint, training each new record once.
    more, _ = fmnist_pngs(300, start=2000)
    extra = produce_values(broker.bootstrap, topic, more)
    d2 = daemon_factory(config, port)
    d2.wait_metric("streamkd_samples_trained_total", 300, timeout=180)
    m_live = d2.latest_manifest()
    assert m_live["version"] >= 1
    # The serving side pulls from the running daemon: a verified, complete copy of a published version.
    pulled = pull_once(f"http://127.0.0.1:{port}", tmp_path / "pulled")
    assert pulled is not None and pulled >= m_live["version"]
    pm = json.loads((tmp_path / "pulled" / str(pulled) / "manifest.json").read_text())
    for name, digest in pm["files"].items():
        assert sha256_file(tmp_path / "pulled" / str(pulled) / name) == digest
    assert (tmp_path / "pulled" / "LATEST").read_text().strip() == str(pulled)
    assert d2.stop() == 0, d2.tail()
    m2 = SnapshotStore(tmp_path / "snap").latest()
    total = {p: counts[p] + extra[p] for p in counts}
    assert m2["samples_seen"] == 2300
    assert m2["offsets"] == {topic: {str(p): n for p, n in total.items()}}
    assert m2["version"] > m["version"]
    assert committed(broker.bootstrap, topic, f"g-{topic}") == total
    # Offsets committed to Kafka never run ahead of the checkpoint on disk.
    meta = sorted((tmp_path / "ckpt").glob("step-*/meta.json"))[-1]
    ck = json.loads(Path(meta).read_text())
    assert ck["samples_seen"] == 2300
