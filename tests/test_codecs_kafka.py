"""Compressed topics, written by a client that is not ours (librdkafka, through confluent-kafka): every codec
is trained, records whose label is not a class of the teacher go to the (compressed) DLQ as bad_label, and
``streamkd produce --compression`` writes what librdkafka reads back."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from conftest import REPO, fmnist_pngs, free_port, write_config
from kafka import KafkaConsumer

from streamkd.state.snapshot import SnapshotStore

pytestmark = [pytest.mark.kafka]

CODECS = ("gzip", "snappy", "lz4", "zstd")


def librdkafka_produce(bootstrap: str, topic: str, records, codec: str) -> None:
    """records: (partition, value, headers); waits for every acknowledgement."""
    import confluent_kafka

    failed = []
    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 20,
                                  "acks": "all"})
    for partition, value, headers in records:
        p.produce(topic, value=value, partition=partition, headers=headers,
                  on_delivery=lambda err, msg: err is not None and failed.append(err))
    assert p.flush(60) == 0 and not failed, failed


@pytest.mark.slow
def test_every_codec_is_trained_and_bad_labels_are_dead_lettered(broker, topic, tmp_path, daemon_factory):
    per_codec = 60
    values, headers = fmnist_pngs(per_codec * len(CODECS), labels=True)
    counts = {0: 0, 1: 0, 2: 0}
    bad: set[tuple[int, int]] = set()
    for c, codec in enumerate(CODECS):
        batch = []
        for i in range(c * per_codec, (c + 1) * per_codec):
            p = i % 3
            batch.append((p, values[i], headers(i)))
            counts[p] += 1
        if codec == "zstd":  # out of the teacher's 10 classes, or not a class id at all
            for label in (b"598", b"10", b"x"):
                batch.append((1, values[0], [("label", label)]))
                bad.add((1, counts[1]))
                counts[1] += 1
        librdkafka_produce(broker.bootstrap, topic, batch, codec)

    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, topic, port, kafka={"dlq_compression": "zstd"})
    d = daemon_factory(config, port)
    d.wait_metric("streamkd_messages_rejected_total", 3, timeout=240, labels='reason="bad_label"')
    d.wait_metric("streamkd_samples_trained_total", per_codec * len(CODECS), timeout=240)
    assert d.get("/readyz")[0] == 200
    assert d.stop() == 0, d.tail()
    m = SnapshotStore(tmp_path / "snap").latest()
    assert m["samples_seen"] == per_codec * len(CODECS)
    assert m["offsets"] == {topic: {str(p): n for p, n in counts.items()}}

    c = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000)
    letters = [dict(r.headers) for r in c]
    c.close()
    assert sorted(h["streamkd-source"] for h in letters) == sorted(f"{topic}/{p}/{o}".encode() for p, o in bad)
    assert {h["streamkd-error"] for h in letters} == {b"bad_label"}


def test_produce_command_compresses_with_every_codec(broker, tmp_path):
    import confluent_kafka
    from PIL import Image

    folder = tmp_path / "images" / "3"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("L", (28, 28), color=i * 40).save(folder / f"{i}.png")
    for codec in CODECS:
        topic = f"produce-{codec}-{uuid.uuid4().hex[:6]}"
        out = subprocess.run([sys.executable, "-m", "streamkd", "produce", "--bootstrap-servers", broker.bootstrap,
                              "--topic", topic, "--partitions", "1", "--folder", str(folder.parent),
                              "--compression", codec, "--quiet"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        consumer = confluent_kafka.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": topic,
                                             "auto.offset.reset": "earliest"})
        # The partition directly: a group join costs the broker's rebalance delay (about 20 s) per codec.
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
        got = []
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(dict(msg.headers())["label"])
            if len(got) == 5:
                break
        consumer.close()
        assert got == [b"3"] * 5, codec
