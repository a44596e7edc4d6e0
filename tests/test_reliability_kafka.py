"""Reliability end to end: the daemon as a subprocess against a real broker, hurt from outside.

Each test checks the delivery guarantee (README "Delivery semantics") with numbers read from outside the
daemon: every valid record is trained into the surviving lineage exactly once
(``samples_seen`` == valid records, checkpoint/manifest offsets == produced,
committed offsets == produced), and the daemon recovers by itself (a restart,
never a crash loop).

This file: kill -9, broker absent / frozen, corrupt checkpoints, SIGTERM during
slow steps. Input-side faults (poison records, decoder crashes, bombs, NaN) are
in test_reliability_inputs.py, which imports the helpers below.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DaemonProc, free_port, produce_values, write_config
from kafka import KafkaConsumer, TopicPartition
from safetensors.torch import load_file

from streamkd.commands.broker import EmbeddedBroker, ensure_topics
from streamkd.state.snapshot import SnapshotStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# Small and fast: tiny npy records, frequent checkpoints, so a test sees many of them.
# STREAMKD_TEST_DEVICE=cuda runs the daemons on a GPU (the one-step-behind stats path).
FAST = {
    "train": {"batch_size": 32, "device": os.environ.get("STREAMKD_TEST_DEVICE", "cpu")},
    "input": {"max_wait_ms": 50},
    "checkpoint": {"every_steps": 5, "every_seconds": 1, "keep": 3},
    "snapshot": {"every_steps": 20, "every_seconds": 3, "keep": 3},
}


# ------------------------------------------------------------------ helpers (shared with test_reliability_inputs)

def tiny_npy(i: int, value: int | None = None) -> bytes:
    """One 28×28 uint8 image as npy (~900 bytes; decodes in microseconds). Content varies with i."""
    rng = np.random.default_rng(i)
    img = rng.integers(0, 200, (28, 28), dtype=np.uint8) if value is None else np.full((28, 28), value, np.uint8)
    buf = io.BytesIO()
    np.save(buf, img)
    return buf.getvalue()


def where(i: int, partitions: int = 3) -> tuple[int, int]:
    """(partition, offset) of the i-th value sent by produce_values into a fresh topic (round-robin)."""
    return i % partitions, i // partitions


def committed(bootstrap: str, topic: str, group: str, partitions: int = 3) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        c.close()


def wait_committed(d: DaemonProc, bootstrap: str, topic: str, counts: dict[int, int], timeout: float) -> None:
    """Until the daemon has checkpointed and committed everything produced (the definition of "done")."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.tail()}")
        got = committed(bootstrap, topic, f"g-{topic}", len(counts))
        if got == counts:
            return
        time.sleep(0.5)
    raise AssertionError(f"committed {got}, produced {counts} after {timeout} s:\n{d.tail()}")


def read_topic(bootstrap: str, topic: str, partitions: int = 1) -> list:
    """Every record of a topic, from the beginning to the current end."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=64 << 20,
                      fetch_max_bytes=64 << 20)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        out = []
        deadline = time.monotonic() + 30
        while any(c.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=500).values():
                out.extend(recs)
        return out
    finally:
        c.close()


def dlq_sources(bootstrap: str, topic: str) -> list[tuple[tuple[int, int], str]]:
    """[((partition, offset), reason)] for every dead letter, from the streamkd-source/-error headers."""
    out = []
    for r in read_topic(bootstrap, f"{topic}.dlq"):
        h = dict(r.headers)
        t, p, o = h["streamkd-source"].decode().rsplit("/", 2)
        assert t == topic
        out.append(((int(p), int(o)), h["streamkd-error"].decode()))
    return out


def final_state(tmp_path: Path, topic: str) -> tuple[dict, dict]:
    """(newest valid snapshot manifest, newest checkpoint meta) after a clean stop."""
    manifest = SnapshotStore(tmp_path / "snap").latest()
    metas = sorted((tmp_path / "ckpt").glob("step-*/meta.json"))
    assert manifest is not None and metas
    return manifest, json.loads(metas[-1].read_text())


def assert_exactly_once(tmp_path: Path, bootstrap: str, topic: str, counts: dict[int, int], trained: int) -> None:
    """The lineage holds `trained` samples and covers every produced offset, and Kafka agrees."""
    manifest, meta = final_state(tmp_path, topic)
    want = {str(p): n for p, n in counts.items()}
    assert meta["samples_seen"] == trained, meta
    assert meta["offsets"] == {topic: want}, meta["offsets"]
    assert manifest["samples_seen"] == trained
    assert manifest["offsets"] == {topic: want}
    assert committed(bootstrap, topic, f"g-{topic}", len(counts)) == counts


def hooks_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """Environment that loads test-only fault hooks into the daemon subprocess (a sitecustomize).

    STREAMKD_TEST_ABORT_ON=<hex>: abort (SIGABRT, like a native decoder crash) when
    decoding a value that starts with those bytes. STREAMKD_TEST_SLOW_STEP_S=<s>: sleep
    in every training step. STREAMKD_TEST_STEP_CRASH_ON=<pixel>[:abort]: the training step raises
    (or, with ``:abort``, aborts the process) when the batch holds an image filled with that value.
    Nothing of this exists in the daemon's own code.
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(textwrap.dedent('''
        import os
        if os.environ.get("STREAMKD_TEST_ABORT_ON"):
            import resource
            import streamkd.ingest.batcher as _b
            _marker = bytes.fromhex(os.environ["STREAMKD_TEST_ABORT_ON"])
            _real = _b.decode_record
            def _decode(value, headers, limits):
                if value and bytes(value).startswith(_marker):
                    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
                    os.abort()
                return _real(value, headers, limits)
            _b.decode_record = _decode
        if os.environ.get("STREAMKD_TEST_SLOW_STEP_S"):
            import time
            import streamkd.learn.learner as _l
            _delay = float(os.environ["STREAMKD_TEST_SLOW_STEP_S"])
            _step = _l.Learner.step
            def _slow(self, *a, **k):
                time.sleep(_delay)
                return _step(self, *a, **k)
            _l.Learner.step = _slow
        if os.environ.get("STREAMKD_TEST_STEP_CRASH_ON"):
            import resource
            import streamkd.learn.learner as _l
            _value, _, _how = os.environ["STREAMKD_TEST_STEP_CRASH_ON"].partition(":")
            _real_step = _l.Learner.step
            def _crashing(self, images, *a, **k):
                flat = images.reshape(images.shape[0], -1)
                if bool(((flat == int(_value)).all(dim=1)).any()):
                    if _how == "abort":
                        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                        os.abort()
                    raise RuntimeError("the training step failed on this batch")
                return _real_step(self, images, *a, **k)
            _l.Learner.step = _crashing
    '''))
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **env}


def snapshot_weights_finite(snap_dir: Path) -> list[int]:
    """Every published version's weights are finite (asserted); returns the versions checked."""
    versions = SnapshotStore(snap_dir).versions()
    for v in versions:
        for name, t in load_file(snap_dir / str(v) / "model.safetensors").items():
            assert torch.isfinite(t).all(), f"snapshot {v} publishes non-finite {name}"
    return versions


# ------------------------------------------------------------------ kill -9

def test_kill9_three_times_trains_each_record_exactly_once(broker, topic, tmp_path, daemon_factory):
    seed = int(os.environ.get("STREAMKD_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    n = 5000
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(n)])
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST)

    d = daemon_factory(config, port)
    for _kill in range(3):
        # A random moment while training: somewhere after 100..900 samples of this process
        # (a checkpoint write, a snapshot publish, a decode, a step: wherever it lands).
        d.wait_metric("streamkd_samples_trained_total", rng.randint(100, 900), timeout=90)
        time.sleep(rng.uniform(0, 0.5))
        d.kill()
        d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=120)
    assert d.stop() == 0, d.tail()
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n), f"seed {seed}"


def test_kill9_at_a_quarter_budget_covers_every_record_once(broker, topic, tmp_path, daemon_factory):
    """Below the full budget a step reads batch_size / budget records and trains only the labelled ones:
    after kills, every record is still covered once (offsets, commits) and a quarter of them trained."""
    n = 4000
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(n)])
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST, teacher={"budget": 0.25})
    d = daemon_factory(config, port)
    for want in (150, 300):
        d.wait_metric("streamkd_samples_trained_total", want, timeout=90)
        d.kill()
        d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=120)
    assert d.stop() == 0, d.tail()
    manifest, meta = final_state(tmp_path, topic)
    want = {str(p): c for p, c in counts.items()}
    assert meta["offsets"] == manifest["offsets"] == {topic: want}
    assert committed(broker.bootstrap, topic, f"g-{topic}", len(counts)) == counts
    assert 0.2 * n < meta["samples_seen"] == manifest["samples_seen"] < 0.3 * n, meta["samples_seen"]
    snapshot_weights_finite(tmp_path / "snap")


# ------------------------------------------------------------------ broker absent, then frozen

def test_broker_absent_at_start_then_frozen_mid_stream(tmp_path, daemon_factory):
    kport = free_port()  # nothing listens here yet
    topic = "images"
    port = free_port()
    config = write_config(tmp_path, f"127.0.0.1:{kport}", topic, port,
                          # Small fetches and a short queue: the consumer keeps fetching while it
                          # trains, so the freeze below really interrupts the stream.
                          kafka={"queue_records": 64, "max_poll_records": 50, "max_partition_fetch_bytes": 16384},
                          **FAST)
    d = daemon_factory(config, port)
    said = f"cannot reach Kafka at 127.0.0.1:{kport}"
    deadline = time.monotonic() + 45  # start-up, then one bootstrap attempt that times out
    while said not in Path(d.log_path).read_text() and time.monotonic() < deadline and d.proc.poll() is None:
        time.sleep(0.5)
    assert d.proc.poll() is None, d.tail()
    assert d.get("/healthz")[0] == 200  # alive...
    assert d.get("/readyz")[0] == 503  # ...not ready
    assert said in Path(d.log_path).read_text(), d.tail()

    with EmbeddedBroker(port=kport) as b:
        ensure_topics(b.bootstrap, {topic: 3, f"{topic}.dlq": 1})
        n1, n2 = 3000, 1000
        counts = produce_values(b.bootstrap, topic, [tiny_npy(i) for i in range(n1)])
        d.wait_metric("streamkd_samples_trained_total", 600, timeout=90)
        assert d.get("/readyz")[0] == 200

        b.freeze()  # SIGSTOP: sockets stay open, nothing answers
        try:
            time.sleep(2)
            at_freeze = d.metric("streamkd_samples_trained_total")
            time.sleep(13)
            during = d.metric("streamkd_samples_trained_total")
        finally:
            b.thaw()
        thawed = time.monotonic()
        assert d.get("/healthz")[0] == 200
        # It was mid-stream: training stalled with records still to read.
        assert during - at_freeze <= 200 and during < n1, (at_freeze, during)
        d.wait_metric("streamkd_samples_trained_total", during + 1, timeout=60)
        recovery = time.monotonic() - thawed
        more = produce_values(b.bootstrap, topic, [tiny_npy(n1 + i) for i in range(n2)])
        counts = {p: counts[p] + more[p] for p in counts}
        wait_committed(d, b.bootstrap, topic, counts, timeout=90)
        assert d.stop() == 0, d.tail()
        assert_exactly_once(tmp_path, b.bootstrap, topic, counts, trained=n1 + n2)
    assert recovery < 45, recovery  # request_timeout_ms is 30 s; it should not need more


# ------------------------------------------------------------------ storage faults

def test_corrupt_newest_checkpoints_and_snapshot_fall_back(broker, topic, tmp_path, daemon_factory):
    n = 1500
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(n)])
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, **FAST)
    d = daemon_factory(config, port)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
    assert d.stop() == 0, d.tail()

    ckpts = sorted((tmp_path / "ckpt").glob("step-*"))
    assert len(ckpts) == 3
    state = ckpts[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    meta = ckpts[-2] / "meta.json"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # zero-filled (a lost page after power loss)
    survivor = json.loads((ckpts[-3] / "meta.json").read_text())
    assert survivor["samples_seen"] < n
    versions = SnapshotStore(tmp_path / "snap").versions()
    newest = tmp_path / "snap" / str(versions[-1]) / "model.safetensors"
    newest.write_bytes(b"\0" * newest.stat().st_size)

    # Restart; no periodic snapshots this time, so "latest" can only be the fallback.
    config = write_config(tmp_path, broker.bootstrap, topic, port,
                          **{**FAST, "snapshot": {"every_steps": 100000, "every_seconds": 3600, "keep": 3}})
    d = daemon_factory(config, port)
    d.wait_metric("streamkd_checkpoint_fallbacks_total", 2, timeout=60)
    assert d.latest_manifest()["version"] == versions[-2]
    assert d.metric("streamkd_checkpoint_fallbacks_total") == 3  # two checkpoints, one snapshot
    # It resumed from the third-newest checkpoint and retrains only what came after it.
    d.wait_metric("streamkd_samples_trained_total", n - survivor["samples_seen"], timeout=60)
    wait_committed(d, broker.bootstrap, topic, counts, timeout=60)
    assert d.metric("streamkd_samples_trained_total") == n - survivor["samples_seen"]
    assert d.stop() == 0, d.tail()
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n)
    assert SnapshotStore(tmp_path / "snap").latest()["version"] > versions[-1]  # never reuses a number


# ------------------------------------------------------------------ shutdown and slow steps

def test_sigterm_during_slow_step_exits_cleanly_and_slow_steps_lose_nothing(broker, topic, tmp_path,
                                                                            daemon_factory):
    n = 320
    counts = produce_values(broker.bootstrap, topic, [tiny_npy(i) for i in range(n)])
    port = free_port()
    grace = 20.0
    # Steps of 3 s against max_poll_interval_ms of 2 s: with subscribe() this consumer would be
    # thrown out of its group and lose its partitions; with assign() nothing happens.
    # No periodic checkpoints in the slow run: only the shutdown's own checkpoint can hold the last step.
    slow = write_config(tmp_path, broker.bootstrap, topic, port, kafka={"extra": {"max_poll_interval_ms": 2000}},
                        **{**FAST, "train": {**FAST["train"], "shutdown_grace_s": grace},
                           "checkpoint": {"every_steps": 1000, "every_seconds": 3600}})
    d = daemon_factory(slow, port, env=hooks_env(tmp_path, STREAMKD_TEST_SLOW_STEP_S="3"))
    steps = d.wait_metric("streamkd_train_steps_total", 2, timeout=90)
    time.sleep(1.0)  # inside the next 3 s step
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(grace + 10)
    took = time.monotonic() - t0
    assert rc == 0, d.tail()
    assert took < grace, took
    log = Path(d.log_path).read_text()
    assert "finishing the batch in flight" in log and "stopped at step" in log
    _, meta = final_state(tmp_path, topic)
    assert meta["step"] >= steps + 1  # the step in flight was finished and kept
    assert sum(meta["offsets"][topic].values()) == meta["samples_seen"]  # all clean records: 1 record, 1 sample
    at = {int(p): o for p, o in meta["offsets"][topic].items()}
    assert committed(broker.bootstrap, topic, f"g-{topic}") == {p: at.get(p) for p in range(3)}

    config = write_config(tmp_path, broker.bootstrap, topic, port, kafka={"extra": {"max_poll_interval_ms": 2000}},
                          **FAST)
    d = daemon_factory(config, port)  # no slow hook: finish the stream
    wait_committed(d, broker.bootstrap, topic, counts, timeout=90)
    assert d.stop() == 0, d.tail()
    assert_exactly_once(tmp_path, broker.bootstrap, topic, counts, trained=n)
