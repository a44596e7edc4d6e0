"""Chaos benchmark: kill -9, a frozen broker, a DLQ outage and hostile records against the real daemon, then an audit.

    nice python bench/chaos.py [--records 20000] [--kills 3] [--freezes 1] [--freeze-s 15]
                               [--dlq-outage-s 20] [--dlq-outage-mode hold|cut] [--second-daemons 1]
                               [--seed N] [--smoke]

Starts its own embedded broker behind a small TCP proxy (the broker advertises
the proxy, so every client, the daemon's included, talks through it), produces
``--records`` tiny npy images over 3 partitions with ``--poison`` of them
invalid, and runs ``streamkd run`` as a subprocess under a supervisor that
restarts it when it dies. The last line of output is one JSON object.

What the stream holds:

* Poison of every kind, each with the dead-letter reason it must get: random
  bytes (``unknown_format``), empty (``empty``), truncated npy (``corrupt``),
  float32 (``bad_dtype``), a 4-d array of the wrong shape (``bad_shape``), and
  ``label`` headers outside the teacher's 10 classes: ``598``, ``-3`` and
  ``x`` (``bad_label``). About a third of the valid records carry a valid
  label (0..9).
* Several producers and codecs: the stream is written in blocks that rotate
  over kafka-python (uncompressed, gzip) and confluent-kafka / librdkafka
  (zstd, lz4, snappy), each block flushed before the next, so every codec is
  spread over the whole stream. Every record's (partition, offset) comes from
  its delivery report.

What happens to it, at random points of the stream (fraction of records
committed), one event at a time:

* ``--kills`` kill -9 of the daemon (restarted at once, like a Deployment).
* ``--freezes`` SIGSTOPs of the broker for ``--freeze-s`` seconds.
* ``--dlq-outages`` DLQ outages of ``--dlq-outage-s`` seconds. The embedded
  broker (Tansu) creates any topic a producer names, whatever
  ``allow.auto.create.topics`` says, so "the DLQ topic does not exist yet"
  cannot be staged against it, and a broker freeze stops the consumer too.
  Instead the proxy stops Produce requests: only the daemon's dead-letter
  producer produces, so the DLQ is unreachable while fetching and committing
  keep going. ``--dlq-outage-mode hold`` (the default) leaves each Produce
  request unanswered until the outage ends, as a hung DLQ broker would
  (shorter than ``kafka.request_timeout_ms``, so the producer keeps its
  connection); ``cut`` closes every connection that sends one. Against Tansu,
  ``cut`` leaves kafka-python's idempotent producer unable to send again
  (``OutOfOrderSequenceNumberError``, then ``InitProducerId`` refused): the
  dead letters stay pending and the run ends as ``stalled``.
  ``kafka.dlq_max_pending`` is set low (``--dlq-max-pending``), so the poison
  read during the outage fills the pending set: intake pauses and ``/readyz``
  fails until the DLQ accepts letters again. ``/readyz`` and
  ``streamkd_dlq_pending`` are polled through the outage.
  ``--kill-in-dlq-outage`` also kill -9s the daemon at the outage's end, with
  its held letters dropped.
* ``--second-daemons`` starts of a second ``streamkd run`` on the same
  checkpoint and snapshot directories (its own metrics port): it must exit
  with code 2 naming the directory and the first daemon's pid, while the
  first (same pid, never restarted by this) keeps training.

When every offset is committed (or the committed offsets have not moved for
``--stall-s``: ``stalled``) it stops the daemon with SIGTERM and audits.
``events_skipped``: events still due when the stream ended.

How each number is measured (all from artefacts outside the daemon's memory):

* ``records``: produced and acknowledged. ``valid``: records minus the poison
  ones, whose (partition, offset) the delivery reports give.
  ``compressed_records``: records written with a compression codec;
  ``codecs`` gives the count per codec.
* ``trained``: ``samples_seen`` of the final lineage (newest checkpoint, equal
  to the final snapshot manifest's). Every valid record is one 28×28 image, so
  one record trained = one sample.
* Exactly-once is checked at every *resume point*: each restarted daemon logs
  the checkpoint it resumed from (samples, offsets), and the final checkpoint
  is one more. A checkpoint's offsets say "every record below these is in the
  lineage"; so at each resume point ``samples`` must equal the number of
  valid records below its offsets. ``trained_twice`` is the largest excess
  of samples over that count seen at any resume point (or at the end), ``lost``
  the largest shortfall at any resume point, plus valid records never covered
  by the final offsets. A duplicate and a loss could only cancel if both fell
  between the same two resume points. ``resume_points`` says how many were
  checked.
* The DLQ is read back in full; each dead letter is a (source, reason) pair
  from its ``streamkd-source`` and ``streamkd-error`` headers.
  ``dlq_distinct``: distinct pairs that are expected (a poison record with
  its reason); ``dlq_unexpected``: distinct pairs that are not (a valid
  record, or a poison record with another reason); ``dlq_missing``: poison
  records with no dead letter. ``dlq_total`` may exceed ``dlq_distinct``:
  after a kill, rejects between the last checkpoint and the kill are
  dead-lettered again (at-least-once). ``bad_label``: out-of-range label
  records produced; ``dlq_bad_label``: those in the DLQ as ``bad_label``.
* ``dlq_outage_s``: total seconds Produce was stopped; ``trained_during_dlq_outage``:
  samples the daemon trained meanwhile. ``dlq_outage_readyz_failed``:
  ``/readyz`` answered non-200 during the outage; ``dlq_pending_max``: the
  largest ``streamkd_dlq_pending`` seen; ``dlq_drain_s``: from the end of the
  outage to ``streamkd_dlq_pending`` back at 0.
* ``second_daemon_exit_code``: the second daemon's exit code (the last one
  started); ``second_daemon_message_ok``: its output names the directory and
  the first daemon's pid; ``first_daemon_untouched``: the first daemon kept
  its pid and trained more samples after the second exited.
* ``committed_ok``: the group's committed offsets equal the produced counts.
* ``max_recovery_s``: the longest time from a daemon (re)start or a broker thaw
  to the next trained sample (the daemon's ``streamkd_samples_trained_total``
  rising), polled every 0.1 s. ``cold_start_s`` is the same for the very
  first start (the same-run reference: a restart is a cold start plus
  recovery), and ``recovery_ratio`` = max_recovery_s / cold_start_s.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from streamkd.commands.broker import EmbeddedBroker, ensure_topics, free_port

REPO = Path(__file__).resolve().parent.parent
PARTITIONS = 3
NUM_CLASSES = 10  # the default teacher's (streamkd:fmnist_cnn)
# (client, codec) per block of the stream, in rotation.
PRODUCERS = [("kafka-python", "none"), ("librdkafka", "zstd"), ("kafka-python", "gzip"),
             ("librdkafka", "lz4"), ("librdkafka", "snappy")]
PRODUCE_API_KEY = 0  # Kafka protocol: the Produce request


def npy(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, img)
    return buf.getvalue()


# Poison kinds: (value, headers) and the dead-letter reason each must get.
POISON = [
    (lambda: (b"\0" + os.urandom(199), []), "unknown_format"),  # the NUL rules out every magic number
    (lambda: (b"", []), "empty"),
    (lambda: (npy(np.zeros((28, 28), np.uint8))[:100], []), "corrupt"),
    (lambda: (npy(np.zeros((28, 28), np.float32)), []), "bad_dtype"),
    (lambda: (npy(np.zeros((2, 5, 5, 7), np.uint8)), []), "bad_shape"),
    (lambda: (npy(np.zeros((28, 28), np.uint8)), [("label", b"598")]), "bad_label"),
    (lambda: (npy(np.zeros((28, 28), np.uint8)), [("label", b"-3")]), "bad_label"),
    (lambda: (npy(np.zeros((28, 28), np.uint8)), [("label", b"x")]), "bad_label"),
]


def make_records(n: int, poison_rate: float, rng: random.Random) -> tuple[list[tuple[bytes, list]], dict[int, str]]:
    """(value, headers) per record, and the poison ones' indices with the reason each must be rejected for."""
    bad = sorted(rng.sample(range(n), round(n * poison_rate)))
    reasons = {}
    gen = np.random.default_rng(rng.randrange(1 << 30))
    out = []
    for _ in range(n):
        out.append((npy(gen.integers(0, 256, (28, 28), dtype=np.uint8)),
                    [("label", str(rng.randrange(NUM_CLASSES)).encode())] if rng.random() < 0.3 else []))
    for k, i in enumerate(bad):
        make, reasons[i] = POISON[k % len(POISON)]
        out[i] = make()
    return out, reasons


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, list]],
            blocks: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Write the records in ``blocks`` consecutive blocks, rotating over PRODUCERS; each block is
    acknowledged before the next starts. Returns each record's (partition, offset) and the count per codec."""
    from confluent_kafka import Producer
    from kafka import KafkaProducer

    where: list[tuple[int, int] | None] = [None] * len(records)
    codecs: dict[str, int] = {}
    size = -(-len(records) // blocks)
    for b, lo in enumerate(range(0, len(records), size)):
        client, codec = PRODUCERS[b % len(PRODUCERS)]
        idx = range(lo, min(lo + size, len(records)))
        codecs[codec] = codecs.get(codec, 0) + len(idx)
        if client == "kafka-python":
            prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, client_id="chaos-producer",
                                 compression_type=None if codec == "none" else codec)
            futs = {i: prod.send(topic, value=records[i][0], headers=records[i][1], partition=i % PARTITIONS)
                    for i in idx}
            prod.flush()
            for i, f in futs.items():
                md = f.get(timeout=60)
                where[i] = (md.partition, md.offset)
            prod.close()
        else:
            errors: list[str] = []
            prod = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                             "client.id": "chaos-producer", "compression.type": codec})

            def report(err, msg, i, errors=errors):
                if err is not None:
                    errors.append(str(err))
                else:
                    where[i] = (msg.partition(), msg.offset())

            for i in idx:
                prod.produce(topic, value=records[i][0], headers=records[i][1], partition=i % PARTITIONS,
                             on_delivery=lambda err, msg, i=i: report(err, msg, i))
                prod.poll(0)
            if prod.flush(60) or errors:
                raise RuntimeError(f"librdkafka {codec} producer: {len(errors)} failed deliveries {errors[:3]}")
    assert all(w is not None for w in where)
    return where, codecs  # type: ignore[return-value]


class Outage:
    """One DLQ outage: ``hold`` keeps each Produce request unanswered until :meth:`ProduceGate.end` (then
    forwards it, or drops it with its connection); ``cut`` closes each connection that sends one."""

    def __init__(self, mode: str):
        self.mode = mode
        self.over = threading.Event()
        self.drop = False


class ProduceGate:
    """A TCP proxy in front of the broker that can stop Produce requests (api key 0) reaching it; every
    other request (metadata, fetch, offsets) passes. The broker advertises this proxy, so it sees all
    traffic, and only the daemon's dead-letter producer produces while the daemon runs."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.outage: Outage | None = None
        self.held = self.cut = 0  # Produce requests held, connections cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name="gate-accept", daemon=True).start()

    def begin(self, mode: str) -> None:
        self.outage = Outage(mode)

    def end(self, drop: bool = False) -> None:
        """Let Produce through again; ``drop``: requests held so far are dropped with their connections."""
        o, self.outage = self.outage, None
        if o is not None:
            o.drop = drop
            o.over.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._copy, args=(server, client), daemon=True).start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        """Client -> broker, one framed request at a time (size, then api_key first in the body)."""
        try:
            while True:
                head = self._read(client, 4)
                if head is None:
                    break
                body = self._read(client, struct.unpack(">i", head)[0])
                if body is None:
                    break
                o = self.outage
                if o is not None and struct.unpack(">h", body[:2])[0] == PRODUCE_API_KEY:
                    if o.mode == "hold":  # later requests on this connection queue up behind it
                        self.held += 1
                        o.over.wait()
                    if o.mode == "cut" or o.drop:
                        self.cut += 1
                        break
                server.sendall(head + body)
        except OSError:
            pass
        self._close(client, server)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


class GatedBroker(EmbeddedBroker):
    """The embedded broker, advertising a ProduceGate in front of it instead of its own listener."""

    def __init__(self, log_file: Path):
        super().__init__(log_file=log_file)
        self.gate = ProduceGate((self.host, self.port))
        self.advertised_port = self.gate.port  # clients reach the broker through the gate


class Daemon:
    def __init__(self, config: Path, port: int, log: Path):
        self.port, self.log = port, log
        self.started = time.monotonic()
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "streamkd", "run", "-c", str(config)], cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
        return float(m.group(1)) if m else None

    def trained(self) -> float | None:
        return self.metric("streamkd_samples_trained_total")

    def ready(self) -> bool | None:
        """/readyz: True (200), False (any other answer), None (no answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False
        except OSError:
            return None


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        c.close()


def read_dlq(bootstrap: str, topic: str) -> list[tuple[tuple[int, int], str]]:
    """Every dead letter as ((partition, offset) of its source, reason)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or {0})]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    end = c.end_offsets(parts)
    out = []
    deadline = time.monotonic() + 60
    while any(c.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=500).values():
            for r in recs:
                h = dict(r.headers)
                _, p, o = h["streamkd-source"].decode().rsplit("/", 2)
                out.append(((int(p), int(o)), h["streamkd-error"].decode()))
    c.close()
    return out


def dlq_outage(broker: GatedBroker, d: Daemon, seconds: float, mode: str, kill: bool) -> dict:
    """Stop Produce for ``seconds`` while polling /readyz and the pending gauge, then wait for the drain.
    ``kill``: kill -9 the daemon at the end of the outage, its held dead letters dropped with it."""
    trained0 = d.trained() or 0.0
    broker.gate.begin(mode)
    t0 = time.monotonic()
    readyz_failed, pending_max = False, 0.0
    while time.monotonic() - t0 < seconds:
        readyz_failed |= d.ready() is False
        pending_max = max(pending_max, d.metric("streamkd_dlq_pending") or 0.0)
        time.sleep(0.5)
    trained = (d.trained() or 0.0) - trained0
    if kill:
        d.proc.kill()
        d.proc.wait()
    broker.gate.end(drop=kill)
    t1 = time.monotonic()
    drain = None
    while not kill and time.monotonic() - t1 < 120 and d.proc.poll() is None:
        if d.metric("streamkd_dlq_pending") == 0:
            drain = time.monotonic() - t1
            break
        time.sleep(0.1)
    return {"seconds": t1 - t0, "readyz_failed": readyz_failed, "pending_max": pending_max, "drain_s": drain,
            "trained": trained}


def second_daemon(config: Path, work: Path, n: int, first: Daemon, finished: Callable[[], bool]) -> dict:
    """Start a daemon on the first one's state directories; it must exit 2 while the first trains on
    (``finished``: the whole stream is committed, so there is nothing left to train)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["metrics"]["port"] = free_port()  # its own port: only the state directories are shared
    second_cfg = work / f"config-second-{n}.yaml"
    second_cfg.write_text(yaml.safe_dump(cfg))
    before = first.trained() or 0.0
    log = work / f"second-{n}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamkd", "run", "-c", str(second_cfg)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        rc = proc.wait(120)
    except subprocess.TimeoutExpired:  # it did not stop: it must not keep running on the same state
        proc.kill()
        rc = proc.wait()
    text = log.read_text(errors="replace")
    message_ok = f"pid {first.proc.pid}" in text and str(cfg["checkpoint"]["dir"]) in text
    deadline = time.monotonic() + 60
    after = first.trained() or 0.0
    while after <= before and time.monotonic() < deadline and first.proc.poll() is None and not finished():
        time.sleep(0.2)
        after = first.trained() or 0.0
    return {"exit_code": rc, "message_ok": message_ok,
            "first_untouched": first.proc.poll() is None and (after > before or finished())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--poison", type=float, default=0.01)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--freezes", type=int, default=1)
    ap.add_argument("--freeze-s", type=float, default=15.0)
    ap.add_argument("--dlq-outages", type=int, default=1)
    ap.add_argument("--dlq-outage-s", type=float, default=20.0)
    ap.add_argument("--dlq-max-pending", type=int, default=4,
                    help="kafka.dlq_max_pending for the daemon (low: an outage fills it)")
    ap.add_argument("--dlq-outage-mode", choices=("hold", "cut"), default="hold",
                    help="hold: Produce requests wait unanswered; cut: connections sending one are closed")
    ap.add_argument("--kill-in-dlq-outage", action="store_true",
                    help="kill -9 the daemon at the end of each DLQ outage, with dead letters still pending")
    ap.add_argument("--second-daemons", type=int, default=1)
    ap.add_argument("--stall-s", type=float, default=300.0,
                    help="stop and audit when the committed offsets have not moved for this long")
    ap.add_argument("--blocks", type=int, default=20, help="producer blocks (rotating over clients and codecs)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="train.device for the daemon (cpu, cuda, auto)")
    ap.add_argument("--workdir", default=None, help="keep logs and state here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="a small run of every part: 5000 records, 1 kill, a 5 s freeze, a 10 s DLQ outage")
    args = ap.parse_args()
    if args.smoke:
        args.records, args.kills, args.freeze_s, args.dlq_outage_s, args.blocks = 5000, 1, 5.0, 10.0, 10
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamkd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    broker = GatedBroker(log_file=work / "broker.log").start()
    try:
        topic, group = "chaos", "g-chaos"
        ensure_topics(broker.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": 1})
        records, reasons = make_records(args.records, args.poison, rng)
        where, codecs = produce(broker.bootstrap, topic, records, args.blocks)
        counts: dict[int, int] = {}
        for p, _ in where:
            counts[p] = counts.get(p, 0) + 1
        if sorted(where) != [(p, o) for p in sorted(counts) for o in range(counts[p])]:
            raise SystemExit("the produced offsets are not 0..n-1 per partition")
        print(f"produced {args.records} records ({len(reasons)} poison; per codec {codecs}) in "
              f"{time.monotonic() - t_start:.1f} s; seed {seed}; work dir {work}", flush=True)
        port = free_port()
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic, "group_id": group,
                      "dlq_topic": f"{topic}.dlq", "queue_records": 128, "max_poll_records": 100,
                      "max_partition_fetch_bytes": 32768, "dlq_max_pending": args.dlq_max_pending},
            "train": {"batch_size": 32, "device": args.device},
            "input": {"max_wait_ms": 50},
            "checkpoint": {"dir": str(work / "ckpt"), "every_steps": 10, "every_seconds": 1, "keep": 3},
            "snapshot": {"dir": str(work / "snap"), "every_steps": 50, "every_seconds": 5, "keep": 3},
            "metrics": {"host": "127.0.0.1", "port": port},
            "logging": {"progress_every_s": 5},
        }))

        # Events at random points of the stream (fraction of records committed). The daemon trains on
        # through a DLQ outage and a second daemon's start, so those come first, while most of the
        # stream (and its poison) is still ahead; events left when the stream ends are counted as skipped.
        events = sorted([(rng.uniform(0.1, 0.3), "dlq_outage") for _ in range(args.dlq_outages)]
                        + [(rng.uniform(0.1, 0.3), "second_daemon") for _ in range(args.second_daemons)]
                        + [(rng.uniform(0.35, 0.85), "kill") for _ in range(args.kills)]
                        + [(rng.uniform(0.35, 0.85), "freeze") for _ in range(args.freezes)])
        starts = 0
        d = Daemon(config, port, work / f"daemon-{starts}.log")
        recoveries: list[float] = []
        cold_start = None
        waiting_since: float | None = d.started  # a recovery being timed: since when
        waiting_base = 0.0
        kills = freezes = 0
        outages: list[dict] = []
        seconds: list[dict] = []
        total = sum(counts.values())
        last_check = 0.0
        progress = 0.0
        last_committed: dict[int, int | None] = {}
        moved_at, stalled = time.monotonic(), False
        while True:
            now = time.monotonic()
            if d.proc.poll() is not None:  # died by itself: restart it, like a Deployment would
                print(f"daemon exited with {d.proc.returncode}; restarting", flush=True)
                starts += 1
                d = Daemon(config, port, work / f"daemon-{starts}.log")
                waiting_since, waiting_base = d.started, 0.0
            if waiting_since is not None:
                value = d.trained()
                if value is not None and value > waiting_base:
                    took = time.monotonic() - waiting_since
                    if cold_start is None:
                        cold_start = took
                    else:
                        recoveries.append(took)
                    waiting_since = None
            if now - last_check > 0.5:
                last_check = now
                got = committed(broker.bootstrap, topic, group)
                if got != last_committed:
                    last_committed, moved_at = got, now
                progress = sum(v or 0 for v in got.values()) / total
                if got == counts:
                    break
                if now - moved_at > args.stall_s:
                    print(f"committed offsets stuck at {got} for {args.stall_s:.0f} s: stopping", flush=True)
                    stalled = True
                    break
            if events and progress >= events[0][0] and waiting_since is None:
                _, what = events.pop(0)
                time.sleep(rng.uniform(0, 1.0))  # not aligned with our own polling
                if what == "kill":
                    d.proc.kill()
                    d.proc.wait()
                    kills += 1
                    print(f"kill -9 at {progress:.0%} of the stream", flush=True)
                    starts += 1
                    d = Daemon(config, port, work / f"daemon-{starts}.log")
                    waiting_since, waiting_base = d.started, 0.0
                elif what == "freeze":
                    broker.freeze()
                    print(f"broker frozen at {progress:.0%} for {args.freeze_s:.0f} s", flush=True)
                    time.sleep(args.freeze_s)
                    broker.thaw()
                    freezes += 1
                    waiting_since, waiting_base = time.monotonic(), d.trained() or 0.0
                elif what == "dlq_outage":
                    print(f"DLQ refused at {progress:.0%} for {args.dlq_outage_s:.0f} s", flush=True)
                    outages.append(dlq_outage(broker, d, args.dlq_outage_s, args.dlq_outage_mode,
                                              args.kill_in_dlq_outage))
                    print(f"DLQ back: {outages[-1]}", flush=True)
                    if args.kill_in_dlq_outage:
                        kills += 1
                        starts += 1
                        d = Daemon(config, port, work / f"daemon-{starts}.log")
                        waiting_since, waiting_base = d.started, 0.0
                else:
                    seconds.append(second_daemon(config, work, len(seconds), d,
                                                 lambda: committed(broker.bootstrap, topic, group) == counts))
                    print(f"second daemon at {progress:.0%}: {seconds[-1]}", flush=True)
                moved_at = time.monotonic()  # an event's own time is not a stall
            time.sleep(0.1)
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(120)

        # ---- the audit ----------------------------------------------------------------------
        expected = {where[i]: reason for i, reason in reasons.items()}  # (partition, offset) -> reason

        def valid_below(offsets: dict[int, int]) -> int:
            below = sum(offsets.values())
            return below - sum(1 for p, o in expected if o < offsets.get(p, 0))

        points: list[tuple[int, dict[int, int]]] = []
        pattern = re.compile(r"resumed from checkpoint step \d+ \((\d+) samples\); offsets (\{.*\})")
        for log in sorted(work.glob("daemon-*.log")):
            for m in pattern.finditer(log.read_text(errors="replace")):
                points.append((int(m.group(1)), {int(k): v for k, v in ast.literal_eval(m.group(2)).items()}))
        meta = json.loads(max((work / "ckpt").glob("step-*/meta.json")).read_text())
        final_offsets = {int(p): o for p, o in meta["offsets"][topic].items()}
        points.append((meta["samples_seen"], final_offsets))
        excess = max(0, *(s - valid_below(o) for s, o in points))
        shortfall = max(0, *(valid_below(o) - s for s, o in points))
        valid = args.records - len(reasons)
        manifest = json.loads((work / "snap" / (work / "snap" / "LATEST").read_text().strip() / "manifest.json")
                              .read_text())
        dlq = read_dlq(broker.bootstrap, f"{topic}.dlq")
        pairs = set(dlq)
        wanted = set(expected.items())
        bad_label_at = {w for w, r in expected.items() if r == "bad_label"}
        result = {
            "records": args.records,
            "valid": valid,
            "trained": meta["samples_seen"],
            "lost": shortfall + (valid - valid_below(final_offsets)),
            "trained_twice": excess,
            "dlq_distinct": len(pairs & wanted),
            "dlq_unexpected": len(pairs - wanted),
            "dlq_missing": len(set(expected) - {src for src, _ in pairs}),
            "dlq_total": len(dlq),
            "poison": len(reasons),
            "bad_label": len(bad_label_at),
            "dlq_bad_label": len({src for src, r in pairs if r == "bad_label"} & bad_label_at),
            "compressed_records": sum(n for c, n in codecs.items() if c != "none"),
            "codecs": codecs,
            "kills": kills,
            "broker_freezes": freezes,
            "dlq_outages": len(outages),
            "dlq_outage_s": round(sum(o["seconds"] for o in outages), 1),
            "dlq_outage_readyz_failed": all(o["readyz_failed"] for o in outages) if outages else None,
            "dlq_pending_max": max((o["pending_max"] for o in outages), default=None),
            # None when none ran, or when the pending set never drained within 120 s.
            "trained_during_dlq_outage": sum(o["trained"] for o in outages) if outages else None,
            "dlq_drain_s": (round(max(o["drain_s"] for o in outages), 2)
                            if outages and all(o["drain_s"] is not None for o in outages) else None),
            "dlq_outage_mode": args.dlq_outage_mode if outages else None,
            "dlq_requests_held": broker.gate.held,
            "dlq_connections_cut": broker.gate.cut,
            "second_daemon_exit_code": seconds[-1]["exit_code"] if seconds else None,
            "second_daemon_message_ok": all(s["message_ok"] for s in seconds) if seconds else None,
            "first_daemon_untouched": all(s["first_untouched"] for s in seconds) if seconds else None,
            "events_skipped": len(events),
            "restarts": starts,
            "max_recovery_s": round(max(recoveries), 2) if recoveries else None,
            "cold_start_s": round(cold_start, 2) if cold_start else None,
            "recovery_ratio": round(max(recoveries) / cold_start, 2) if recoveries and cold_start else None,
            "resume_points": len(points),
            "manifest_samples_seen": manifest["samples_seen"],
            "committed_ok": committed(broker.bootstrap, topic, group) == counts,
            "stalled": stalled,
            "final_exit_code": rc,
            "wall_s": round(time.monotonic() - t_start, 1),
            "seed": seed,
            "device": args.device,
        }
    finally:
        if broker.proc and broker.proc.poll() is None:
            broker.thaw()  # a frozen process ignores SIGTERM until it is thawed
        broker.stop()
        broker.gate.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
