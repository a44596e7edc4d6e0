"""Dead letters never block the hot path: sends only queue, flush() keeps its deadline, the pending set is
bounded (full -> the intake pauses), and the producer shares the consumer's security settings."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from streamkd.commands.broker import EmbeddedBroker, ensure_topics, free_port
from streamkd.config import KafkaConfig
from streamkd.ingest.dlq import DeadLetterError, DeadLetters, producer_config
from streamkd.ingest.source import RawRecord


def rec(offset: int, value: bytes = b"x" * 10) -> RawRecord:
    return RawRecord("t", 0, offset, None, value, [])


class StuckProducer:
    """Like KafkaProducer.send for a topic that does not exist: waits max_block_ms for metadata, then raises."""

    def __init__(self, block_s: float):
        self.block_s = block_s
        self.up = False
        self.acked: list[dict] = []

    def send(self, topic: str, **msg) -> Future:
        fut = Future()
        if not self.up:
            time.sleep(self.block_s)
            raise KafkaTimeoutError(f"Failed to update metadata after {self.block_s} secs.")
        self.acked.append(msg)
        return fut.success(None)

    def close(self, timeout=None) -> None:
        pass


def test_send_never_blocks_and_flush_keeps_its_deadline() -> None:
    prod = StuckProducer(block_s=1.0)
    dlq = DeadLetters(KafkaConfig(dlq_topic="t.dlq"), 1 << 20, producer_factory=lambda: prod)
    try:
        t = time.monotonic()
        for o in range(50):
            dlq.send(rec(o), "corrupt")
        assert time.monotonic() - t < 0.5  # one blocked send alone would take 1 s
        t = time.monotonic()
        with pytest.raises(DeadLetterError):
            dlq.flush(timeout_s=0.3)
        assert time.monotonic() - t < 0.8
        assert dlq.pending == 50
        prod.up = True
        dlq.flush(timeout_s=10)
        assert [m["headers"][-1] for m in prod.acked] == [("streamkd-source", f"t/0/{o}".encode()) for o in range(50)]
    finally:
        dlq.close()


def test_pending_set_is_bounded_and_reported() -> None:
    prod = StuckProducer(block_s=0.05)
    seen: list[int] = []
    cfg = KafkaConfig(dlq_topic="t.dlq", dlq_max_pending=3, dlq_max_pending_bytes=1 << 20)
    dlq = DeadLetters(cfg, 1 << 20, producer_factory=lambda: prod, on_pending=seen.append)
    try:
        for o in range(2):
            dlq.send(rec(o), "corrupt")
        assert not dlq.full
        dlq.send(rec(2), "corrupt")
        assert dlq.full and seen[-1] == 3
        dlq.send(rec(3), "corrupt")  # still kept: a dead letter is never dropped
        assert dlq.pending == 4
        prod.up = True
        dlq.flush(timeout_s=10)
        assert not dlq.full and seen[-1] == 0 and len(prod.acked) == 4
    finally:
        dlq.close()
    # The byte bound counts too (value, key and headers).
    small = DeadLetters(KafkaConfig(dlq_topic="t.dlq", dlq_max_pending_bytes=1000), 1 << 20,
                        producer_factory=lambda: StuckProducer(block_s=0.05))
    try:
        small.send(rec(0, b"v" * 900), "corrupt")
        assert not small.full
        small.send(rec(1, b"v" * 100), "corrupt")
        assert small.full
    finally:
        small.close()


def test_producer_shares_the_consumers_security_and_extra_settings() -> None:
    cfg = KafkaConfig(dlq_topic="t.dlq", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_plain_username="u", sasl_plain_password="p", ssl_cafile="/ca.pem",
                      extra={"connections_max_idle_ms": 1234, "api_version": (3, 9), "fetch_min_bytes": 5,
                             "isolation_level": "read_committed"},
                      dlq_compression="zstd", dlq_max_block_ms=700, request_timeout_ms=4000)
    s = producer_config(cfg)
    assert {k: s[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
                              "ssl_cafile", "connections_max_idle_ms", "api_version")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
        "sasl_plain_password": "p", "ssl_cafile": "/ca.pem", "connections_max_idle_ms": 1234, "api_version": (3, 9)}
    assert "fetch_min_bytes" not in s and "isolation_level" not in s  # consumer-only: a producer refuses them
    assert s["compression_type"] == "zstd" and s["max_block_ms"] == 700 and s["request_timeout_ms"] == 4000
    assert set(s) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert producer_config(KafkaConfig())["compression_type"] is None


@pytest.mark.kafka
def test_unreachable_dlq_keeps_every_letter_until_it_is_back(tmp_path) -> None:
    """A real producer against a broker that is not there yet, then is: nothing lost, nothing doubled."""
    port = free_port()
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", dlq_topic="late.dlq", dlq_compression="zstd",
                      dlq_max_block_ms=500, request_timeout_ms=3000, reconnect_backoff_max_ms=500)
    dlq = DeadLetters(cfg, 1 << 20)
    try:
        t = time.monotonic()
        for o in range(20):
            dlq.send(rec(o, bytes(1000)), "bad_label")
        assert time.monotonic() - t < 0.5
        with pytest.raises(DeadLetterError):
            dlq.flush(timeout_s=1.0)
        assert time.monotonic() - t < 2.5
        assert dlq.pending == 20
        with EmbeddedBroker(port=port, log_file=tmp_path / "tansu.log") as broker:
            ensure_topics(broker.bootstrap, {"late.dlq": 1})
            dlq.flush(timeout_s=60)
            assert dlq.pending == 0
            c = KafkaConsumer("late.dlq", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                              consumer_timeout_ms=5000)
            got = [dict(r.headers)["streamkd-source"] for r in c]
            c.close()
            dlq.close()
        assert sorted(got) == sorted(f"t/0/{o}".encode() for o in range(20))
    finally:
        dlq.close()


def test_close_is_bounded_with_letters_pending() -> None:
    dlq = DeadLetters(KafkaConfig(dlq_topic="t.dlq", dlq_max_block_ms=300), 1 << 20,
                      producer_factory=lambda: StuckProducer(block_s=0.3))
    dlq.send(rec(0), "corrupt")
    time.sleep(0.1)
    t = time.monotonic()
    dlq.close()
    assert time.monotonic() - t < 2.0


@pytest.mark.parametrize("setting, key", [("kafka.dlq_compression=brotli", "kafka.dlq_compression"),
                                          ("kafka.dlq_max_pending=0", "kafka.dlq_max_pending"),
                                          ("kafka.dlq_max_block_ms=-1", "kafka.dlq_max_block_ms"),
                                          ("kafka.unhealthy_after_s=0", "kafka.unhealthy_after_s"),
                                          ("input.max_decoded_bytes=0", "input.max_decoded_bytes")])
def test_ingest_settings_are_checked_at_start(setting: str, key: str) -> None:
    from streamkd.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [setting], env={})
    assert e.value.key == key
