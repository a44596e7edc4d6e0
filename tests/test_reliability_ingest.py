"""The daemon loop (in process, real broker) with hostile ingest: npy batch records bigger than
``train.batch_size``, and a dead-letter topic that does not accept letters."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import fmnist_pngs, free_port, produce_values

from streamkd import daemon
from streamkd.commands.broker import ensure_topics
from streamkd.config import load_config
from streamkd.ingest.dlq import DeadLetters

pytestmark = [pytest.mark.kafka]


def npy_batch(n: int, seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
    return buf.getvalue()


def overrides(broker, topic: str, tmp_path: Path, *extra: str) -> list[str]:
    return [f"kafka.bootstrap_servers={broker.bootstrap}", f"kafka.topic={topic}", f"kafka.dlq_topic={topic}.dlq",
            f"checkpoint.dir={tmp_path}/ck", f"snapshot.dir={tmp_path}/sn", "train.device=cpu",
            "input.max_wait_ms=50", "gate.enabled=false", *extra]


def test_big_npy_records_train_in_batch_size_steps_and_checkpoints_stay_exact(broker, tmp_path):
    topic = "npy-split"
    ensure_topics(broker.bootstrap, {topic: 1})
    sizes = [40, 3, 40, 1, 33]
    produce_values(broker.bootstrap, topic, [npy_batch(n, i) for i, n in enumerate(sizes)], partitions=1)
    cfg = load_config(None, overrides(broker, topic, tmp_path, "metrics.port=0", "train.batch_size=16",
                                      "checkpoint.every_steps=1", "checkpoint.keep=1000"), env={})
    parts = daemon.build(cfg)
    steps: list[int] = []
    real_step = parts.learner.step
    # Fresh rows per step (replayed rows come on top of them).
    parts.learner.step = lambda x, t, y, fresh=None, **k: steps.append(fresh) or real_step(x, t, y, fresh=fresh, **k)
    prog = daemon.run(parts, threading.Event(), stop_when=lambda p: p.records_done >= len(sizes))
    assert prog.samples_seen == sum(sizes) and prog.offsets == {0: len(sizes)}
    assert max(steps) <= 16 and sum(steps) == sum(sizes)
    # Every checkpoint (one per step was asked for) holds exactly the images of the records its offsets
    # cover: never a checkpoint taken in the middle of a record, whose images would be trained twice.
    done = {0: 0}
    for i, n in enumerate(sizes):
        done[i + 1] = done[i] + n
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "ck").glob("step-*/meta.json"))]
    assert len(metas) >= 3
    for meta in metas:
        offset = int(meta["offsets"][topic]["0"])
        assert meta["samples_seen"] == done[offset], (meta["step"], offset, meta["samples_seen"])


class UnackedProducer:
    """A DLQ that never acknowledges (until `up`): every send fails like a delivery timeout."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.acked: list[bytes] = []

    def send(self, topic: str, **msg):
        from kafka.future import Future

        fut = Future()
        if not self.up.is_set():
            return fut.failure(TimeoutError("delivery timeout"))
        self.acked.append(dict(msg["headers"])["streamkd-source"])
        return fut.success(None)

    def close(self, timeout=None) -> None:
        pass


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_full_dead_letter_backlog_pauses_intake_and_fails_readyz(broker, tmp_path, monkeypatch):
    topic = "dlq-full"
    ensure_topics(broker.bootstrap, {topic: 1, f"{topic}.dlq": 1})
    good, _ = fmnist_pngs(200)
    values = [b"not an image"] * 20 + good  # 20 rejects first, then good records
    produce_values(broker.bootstrap, topic, values, partitions=1)
    prod = UnackedProducer()
    monkeypatch.setattr(DeadLetters, "_new_producer", lambda self: prod)
    port = free_port()
    cfg = load_config(None, overrides(broker, topic, tmp_path, f"metrics.port={port}", "kafka.dlq_max_pending=5",
                                      "train.batch_size=8"), env={})
    parts = daemon.build(cfg)
    stop = threading.Event()
    done: list = []
    progress = {"records": 0}
    t = threading.Thread(target=lambda: done.append(daemon.run(
        parts, stop, on_progress=lambda p: progress.update(records=p.records_done),
        stop_when=lambda p: p.records_done >= len(values))), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while (parts.registry.get_sample_value("streamkd_dlq_pending") or 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert parts.registry.get_sample_value("streamkd_dlq_pending") >= 5
        # Paused: what was being decoded with the rejects (one chunk of records) trains, nothing after it.
        time.sleep(1.0)
        before = progress["records"]
        time.sleep(1.5)
        assert readyz(port) == 503
        assert progress["records"] == before < len(values) and not done
        prod.up.set()  # the DLQ is back: the backlog drains, the intake resumes
        t.join(120)
        assert done, "daemon did not finish"
        prog = done[0]
        assert prog.records_done == len(values) and prog.samples_seen == 200
        assert sorted(prod.acked) == sorted(f"{topic}/0/{o}".encode() for o in range(20))  # each once
        assert parts.registry.get_sample_value("streamkd_dlq_pending") == 0
    finally:
        stop.set()
        t.join(30)
