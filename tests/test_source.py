"""The Kafka source: a poll error that keeps coming back (a codec the client lacks, authorization, a deleted
topic) must not look healthy: it is counted, logged as an ERROR at least once a minute, and makes the source
unready after ``kafka.unhealthy_after_s``; when the cause goes away, consumption resumes where it stopped."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from streamkd.config import KafkaConfig
from streamkd.ingest.source import ErrorStreak, KafkaSource, RecordQueue


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_error_streak_turns_unhealthy_and_logs_errors_every_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    streak = ErrorStreak(unhealthy_after_s=30, log_every_s=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="streamkd.ingest.source"):
        streak.failed("boom (UnsupportedCodecError)")
        assert not streak.unhealthy
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        for _ in range(30):
            clock.t += 1
            streak.failed("boom (UnsupportedCodecError)")
        assert streak.unhealthy  # 30 s of nothing but errors
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "UnsupportedCodecError" in errors[0].getMessage()
        for _ in range(180):  # three more minutes: at least one ERROR a minute, not one per error
            clock.t += 1
            streak.failed("boom (UnsupportedCodecError)")
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 4
        streak.ok()
        assert not streak.unhealthy
        clock.t += 100
        assert not streak.unhealthy


def produce_zstd(bootstrap: str, topic: str, n: int) -> None:
    import confluent_kafka

    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": "zstd", "linger.ms": 5})
    for i in range(n):
        p.produce(topic, value=f"v{i}".encode(), partition=0)
    assert p.flush(30) == 0


@pytest.mark.kafka
def test_persistent_poll_error_makes_the_source_unready_then_recovers(broker, topic, monkeypatch, caplog) -> None:
    import kafka.codec

    produce_zstd(broker.bootstrap, topic, 30)
    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)  # a client without the zstd library
    errors: list[str] = []
    q = RecordQueue(1000, 1 << 20)
    stop = threading.Event()
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic=topic, unhealthy_after_s=2.0,
                      reconnect_backoff_max_ms=300)
    src = KafkaSource(cfg, q, {}, stop, on_error=errors.append, probe_every_s=0.2)
    src.start()
    try:
        with caplog.at_level(logging.WARNING, logger="streamkd.ingest.source"):
            deadline = time.monotonic() + 30
            while not (src.status.assigned and errors.count("poll") >= 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            # Errors keep coming, nothing is delivered; after unhealthy_after_s it stays unready.
            time.sleep(2.5)
            samples = []
            for _ in range(20):
                samples.append(src.ready)
                time.sleep(0.1)
            assert not any(samples), samples
            assert errors.count("poll") >= 3 and len(q) == 0
            assert any(r.levelname == "ERROR" and "UnsupportedCodecError" in r.getMessage() for r in caplog.records)
            monkeypatch.undo()  # the library is back (the operator installed it): every record, once
            got = []
            deadline = time.monotonic() + 30
            while len(got) < 30 and time.monotonic() < deadline:
                got += q.get_many(100, 0.2)
            assert [r.offset for r in got] == list(range(30))
            deadline = time.monotonic() + 5
            while not src.ready and time.monotonic() < deadline:
                time.sleep(0.05)
            assert src.ready
    finally:
        stop.set()
        src.join(5)
