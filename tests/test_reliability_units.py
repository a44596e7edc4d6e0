"""Reliability, unit level: the decode journal, dead-letter acknowledgement, out-of-range offsets, full disks.

The end-to-end versions (daemon subprocess, real broker, kill -9, SIGSTOP) are
in test_reliability_kafka.py; these run in seconds and pin the mechanisms.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka.future import Future

import streamkd.ingest.batcher as batcher_mod
from streamkd.config import KafkaConfig
from streamkd.ingest.batcher import Batcher
from streamkd.ingest.decode import Limits
from streamkd.ingest.dlq import DeadLetterError, DeadLetters
from streamkd.ingest.journal import JOURNAL_FILE, DecodeJournal, chunk_ranges
from streamkd.ingest.source import KafkaSource, RawRecord, RecordQueue
from streamkd.state.snapshot import SnapshotStore


def npy(value: int = 7) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.full((28, 28), value, np.uint8))
    return buf.getvalue()


def rec(p: int, off: int, value: bytes | None = None) -> RawRecord:
    return RawRecord("t", p, off, None, npy() if value is None else value, [])


def crash_restart(directory: Path, resume: dict[int, int] | None = None) -> DecodeJournal:
    """What a new process sees after the old one died (whatever was in flight stays in the file)."""
    return DecodeJournal(directory, resume)


# ------------------------------------------------------------------ decode journal

def test_journal_clean_run_leaves_nothing_suspect(tmp_path: Path) -> None:
    j = DecodeJournal(tmp_path)
    j.begin([(0, 0, 63)])
    j.end()
    j = crash_restart(tmp_path)
    assert not j.active and not j.suspect(0, 10)


def test_journal_pinpoints_and_condemns_after_three_crashes(tmp_path: Path) -> None:
    j = DecodeJournal(tmp_path)
    j.begin(chunk_ranges([rec(0, o) for o in range(64)] + [rec(1, o) for o in range(5, 9)]))
    # crash #1 in bulk mode: the whole chunk becomes suspect, one crash each
    j = crash_restart(tmp_path)
    assert j.suspect(0, 0) and j.suspect(0, 63) and j.suspect(1, 8) and not j.suspect(1, 9)
    assert j.crashes(0, 10) == 1 and not j.condemned(0, 10)
    for o in range(10):  # one at a time: these pass
        j.begin([(0, o, o)])
        j.passed(0, o)
        j.end()
    assert not j.suspect(0, 9) and j.suspect(0, 10)
    j.begin([(0, 10, 10)])  # crash #2, on record 10 alone
    j = crash_restart(tmp_path)
    assert j.crashes(0, 10) == 2 and j.crashes(0, 11) == 1 and not j.condemned(0, 10)
    j.begin([(0, 10, 10)])  # crash #3
    j = crash_restart(tmp_path)
    assert j.condemned(0, 10) and not j.condemned(0, 11)
    j.passed(0, 10)  # dead-lettered, not decoded
    j.end()
    # Killed before a checkpoint covered it: it is still condemned after the restart...
    j = crash_restart(tmp_path, resume={0: 0})
    assert j.condemned(0, 10)
    # ...until a checkpoint's offsets pass it.
    j = crash_restart(tmp_path, resume={0: 11, 1: 9})
    assert not j.suspect(0, 10) and j.suspect(0, 11) and not j.suspect(1, 8)


def test_journal_unreadable_file_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b"\0\0\0")
    with caplog.at_level(logging.WARNING):
        j = DecodeJournal(tmp_path)
    assert not j.active and "unreadable" in caplog.text
    assert json.loads((tmp_path / JOURNAL_FILE).read_text())["suspects"] == []


def run_batcher(recs: list[RawRecord], journal: DecodeJournal | None) -> tuple[list, list]:
    """Feed records through a real Batcher; returns (batches, rejects)."""
    rq = RecordQueue(1000, 1 << 30)
    stop = threading.Event()
    for r in recs:
        rq.put(r, stop)
    out: queue.Queue = queue.Queue()
    rejects: list = []
    b = Batcher(rq, out, batch_size=4, max_wait_s=0.05, limits=Limits(), size=(28, 28), channels=1, workers=2,
                stop=stop, on_reject=lambda r, why: rejects.append((r.partition, r.offset, why.reason)),
                journal=journal)
    b.start()
    batches = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            batches.append(out.get(timeout=0.2))
        if sum(x.records for x in batches) >= len(recs):
            break
    stop.set()
    b.thread.join(5)
    assert b.error is None
    return batches, rejects


def test_batcher_dead_letters_a_condemned_record_without_decoding_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    poison = b"\x93NUMPY-poison"
    recs = [rec(0, o) for o in range(6)] + [rec(0, 6, poison)] + [rec(0, o) for o in range(7, 10)]
    j = DecodeJournal(tmp_path)
    j.begin([(0, 0, 9)])
    j = crash_restart(tmp_path)
    j.begin([(0, 6, 6)])
    j = crash_restart(tmp_path)
    j.begin([(0, 6, 6)])
    j = crash_restart(tmp_path)  # three crashes with offset 6 in flight
    decoded: list[bytes] = []
    real = batcher_mod.decode_record
    monkeypatch.setattr(batcher_mod, "decode_record", lambda v, h, lim: decoded.append(v) or real(v, h, lim))
    batches, rejects = run_batcher(recs, j)
    assert rejects == [(0, 6, "decoder_crash")]
    assert poison not in decoded and len(decoded) == 9
    assert sum(b.size for b in batches) == 9
    assert max(b.offsets[0] for b in batches) == 10  # moved past it
    assert not crash_restart(tmp_path, resume={0: 10}).active


def test_batcher_journals_each_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a chunk decodes, the journal on disk names it as in flight."""
    seen: list[list] = []
    real = batcher_mod.decode_record

    def spy(v, h, lim):
        seen.append(json.loads((tmp_path / JOURNAL_FILE).read_text())["inflight"])
        return real(v, h, lim)

    monkeypatch.setattr(batcher_mod, "decode_record", spy)
    recs = [rec(p, o) for o in range(3) for p in range(2)]
    run_batcher(recs, DecodeJournal(tmp_path))
    assert seen and all(s == [[0, 0, 2], [1, 0, 2]] for s in seen), seen
    assert json.loads((tmp_path / JOURNAL_FILE).read_text())["inflight"] == []


# ------------------------------------------------------------------ dead letters

class FakeProducer:
    """Acknowledges a send only once `up` is True; earlier sends fail (like a delivery timeout)."""

    def __init__(self) -> None:
        self.up = False
        self.acked: list[dict] = []

    def send(self, topic: str, **msg) -> Future:
        fut = Future()
        if self.up:
            self.acked.append(msg)
            fut.success(None)
        else:
            fut.failure(TimeoutError("delivery timeout"))
        return fut

    def flush(self, timeout=None) -> None:
        pass


def test_dead_letters_are_kept_until_acknowledged() -> None:
    dlq = DeadLetters(KafkaConfig(dlq_topic="t.dlq"), max_value_bytes=4)
    prod = FakeProducer()
    dlq._producer = prod
    dlq.send(RawRecord("t", 2, 17, b"k", b"0123456789", [("label", b"3")]), "corrupt")
    with pytest.raises(DeadLetterError):
        dlq.flush(timeout_s=0.5)  # KafkaProducer.flush() would have returned: the send *finished*
    assert dlq.pending == 1 and prod.acked == []
    prod.up = True
    dlq.flush(timeout_s=5)
    assert dlq.pending == 0
    [msg] = prod.acked
    assert msg["value"] == b"0123" and msg["key"] == b"k"
    assert dict(msg["headers"]) == {"label": b"3", "streamkd-truncated": b"1", "streamkd-error": b"corrupt",
                                    "streamkd-source": b"t/2/17"}


def test_dead_letter_send_that_raises_is_retried() -> None:
    dlq = DeadLetters(KafkaConfig(dlq_topic="t.dlq"), max_value_bytes=1 << 20)
    prod = FakeProducer()

    def no_broker():
        raise RuntimeError("NoBrokersAvailable")

    dlq._get = no_broker  # type: ignore[method-assign]
    dlq.send(rec(0, 5), "bad_shape")  # must not raise
    assert dlq.pending == 1
    prod.up = True
    dlq._get = lambda: prod  # type: ignore[method-assign]
    dlq.flush(timeout_s=5)
    assert dlq.pending == 0 and len(prod.acked) == 1


# ------------------------------------------------------------------ offsets outside the log

class FakeConsumer:
    """Just enough of KafkaConsumer for KafkaSource._consume; the log of partition 0 is [lo, hi).

    Like Kafka: a fetch below the log start raises OffsetOutOfRange, a fetch at or
    beyond the end returns nothing (and the high watermark).
    """

    def __init__(self, source: KafkaSource, lo: int, hi: int, fail_first_poll_at: int | None):
        from kafka import TopicPartition

        self.source, self.lo, self.hi = source, lo, hi
        self.tp = TopicPartition("t", 0)
        self.pos: int | None = None
        self.fail_at = fail_first_poll_at
        self.fetched = False
        self.empty_polls = 0

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, tps):
        pass

    def seek(self, tp, off):
        self.pos = off

    def beginning_offsets(self, tps):
        return {tp: self.lo for tp in tps}

    def end_offsets(self, tps):
        return {tp: self.hi - 6 for tp in tps}  # wrong, like Tansu's ListOffsets: must not be needed

    def highwater(self, tp):
        return self.hi if self.fetched else None

    def poll(self, timeout_ms):
        from kafka.consumer.fetcher import ConsumerRecord
        from kafka.errors import OffsetOutOfRangeError

        if self.fail_at is not None:
            self.fail_at, at = None, self.fail_at
            raise OffsetOutOfRangeError({self.tp: at})
        if self.pos < self.lo:
            raise OffsetOutOfRangeError({self.tp: self.pos})
        self.fetched = True
        if self.pos >= self.hi:
            self.empty_polls += 1
            if self.empty_polls > 3:
                self.source.stop_event.set()
            return {}
        out = [ConsumerRecord("t", 0, -1, o, 0, 0, None, b"v", [], None, -1, 1, -1)
               for o in range(self.pos, self.hi)]
        self.pos = self.hi
        return {self.tp: out}


@pytest.mark.parametrize("start, lo, hi, fail_at, expect_first, logged", [
    # checkpoint below the log start (retention deleted 2..4): continue at the start, loudly
    (2, 5, 10, None, 5, "partition 0: position 2 is below the log start 5: 3 records were deleted"),
    # beyond the log end (topic recreated): "earliest" re-reads rather than skips, loudly
    (50, 0, 10, None, 0, "partition 0: resume offset 50 is beyond the log end 10"),
    (10, 0, 10, None, None, None),  # exactly at the end: nothing to do, nothing to say
    # an OffsetOutOfRange from poll for an offset that is in range: fetch it again, quietly
    (5, 0, 10, 3, 3, None),
], ids=["below-start", "beyond-end", "at-end", "poll-error-in-range"])
def test_out_of_range_positions_are_reset_loudly(start, lo, hi, fail_at, expect_first, logged,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    errors: list[str] = []
    q = RecordQueue(100, 1 << 20)
    src = KafkaSource(KafkaConfig(topic="t"), q, {0: start}, threading.Event(), on_error=errors.append)
    with caplog.at_level(logging.ERROR, logger="streamkd.ingest.source"):
        src._consume(FakeConsumer(src, lo, hi, fail_at), 0)
    got = q.get_many(100, 0)
    if expect_first is None:
        assert got == []
    else:
        assert got[0].offset == expect_first and got[-1].offset == hi - 1
    assert errors == (["offset_reset"] if logged else [])
    assert (logged or "") in caplog.text and (logged is not None or not caplog.text)


# ------------------------------------------------------------------ disk full

@pytest.mark.parametrize("where", ["model", "latest"])
def test_snapshot_disk_full_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import streamkd.state.snapshot as snap

    store = SnapshotStore(tmp_path)
    first = store.publish({"w": torch.ones(4)}, {"step": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "model":
        monkeypatch.setattr(snap, "save_file", full)
    else:
        monkeypatch.setattr(snap, "atomic_write_bytes", full)
    with pytest.raises(OSError):
        store.publish({"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "LATEST").read_text().strip() == "1"
    assert store.latest() == first
    assert store.publish({"w": torch.zeros(4)}, {"step": 3})["version"] == 2 + (where == "latest")


@pytest.mark.kafka
def test_resume_positions_checked_against_a_real_broker(broker, topic) -> None:
    """Tansu answers ListOffsets(latest) with the last batch's base offset: a resume at the true
    end must not look "beyond the end" (that re-read everything once), and one really beyond it
    must be re-positioned."""
    from conftest import produce_values

    counts = produce_values(broker.bootstrap, topic, [b"x" * 100] * 600)  # 200 per partition, several batches
    errors: list[str] = []
    q = RecordQueue(1000, 1 << 24)
    stop = threading.Event()
    src = KafkaSource(KafkaConfig(bootstrap_servers=broker.bootstrap, topic=topic), q,
                      {0: counts[0], 1: counts[1] + 50, 2: 190}, stop, on_error=errors.append)
    src.start()
    got: list[RawRecord] = []
    deadline = time.monotonic() + 30
    while len(got) < 210 and time.monotonic() < deadline:
        got += q.get_many(1000, 0.2)
    time.sleep(1.0)  # anything more would be a duplicate
    got += q.get_many(1000, 0)
    stop.set()
    src.join(5)
    by_part = {p: sorted(r.offset for r in got if r.partition == p) for p in range(3)}
    assert by_part == {0: [], 1: list(range(200)), 2: list(range(190, 200))}
    assert errors == ["offset_reset"]


def test_journal_write_failure_does_not_stop_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    j = DecodeJournal(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            j.begin([(0, 0, 9)])
            j.end()
    assert caplog.text.count("not writable") == 1  # said once, not per chunk


def test_dead_letter_too_large_for_the_producer_is_sent_without_payload() -> None:
    from kafka.errors import MessageSizeTooLargeError

    class SizeLimited(FakeProducer):
        def send(self, topic: str, **msg) -> Future:
            if len(msg["value"] or b"") + len(msg["key"] or b"") > 1000:
                raise MessageSizeTooLargeError("record too large")
            return super().send(topic, **msg)

    dlq = DeadLetters(KafkaConfig(dlq_topic="t.dlq"), max_value_bytes=500)
    prod = SizeLimited()
    prod.up = True
    dlq._producer = prod
    dlq.send(RawRecord("t", 1, 9, b"k" * 5000, b"v" * 800, []), "too_large")  # a hostile key
    dlq.flush(timeout_s=5)
    [msg] = prod.acked
    assert msg["value"] == b"" and msg["key"] is None
    assert dict(msg["headers"])["streamkd-source"] == b"t/1/9"
    assert [k for k, _ in msg["headers"]].count("streamkd-truncated") == 1


def test_consumer_failure_reconnects_where_it_left_off() -> None:
    """Any client failure recreates the consumer, which resumes after the last queued record, not at the start."""
    q = RecordQueue(100, 1 << 20)
    errors: list[str] = []
    src = KafkaSource(KafkaConfig(topic="t", reconnect_backoff_max_ms=10), q, {0: 0}, threading.Event(),
                      on_error=errors.append)

    class Flaky(FakeConsumer):
        def poll(self, timeout_ms):
            out = super().poll(timeout_ms)
            if out:  # deliver 0..4 of [0, 10), then break down
                self.hi = 10
            return out

        calls = 0

        def highwater(self, tp):
            self.calls += 1
            if self.pos == 5 and self.calls > 1:  # after 0..4 are queued
                raise RuntimeError("connection lost")
            return super().highwater(tp)

        def close(self, autocommit=False):
            pass

    first = Flaky(src, 0, 5, None)
    second = FakeConsumer(src, 0, 10, None)
    second.close = lambda autocommit=False: None
    made = iter([first, second])
    src._connect = lambda index: next(made)  # type: ignore[method-assign]
    src._run(0)
    assert [r.offset for r in q.get_many(100, 0)] == list(range(10))  # once each
    assert errors == ["consumer"] and second.pos == 10


def test_gpu_jpeg_decode_is_journaled_and_suspects_go_to_the_cpu(tmp_path: Path) -> None:
    """nvJPEG decodes in the batcher's emit step; a crash there must be attributed too, and
    after the restart those records are decoded on the CPU, one by one (no CUDA needed here)."""
    from PIL import Image

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((28, 28), 10 * i, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    class Gpu:
        def __init__(self, crash: bool) -> None:
            self.crash, self.calls = crash, 0

        def decode(self, refs, cpu_images):
            self.calls += 1
            if self.crash:
                raise RuntimeError("nvJPEG: illegal memory access")
            return torch.cat([cpu_images, torch.zeros((len(refs), 1, 28, 28), dtype=torch.uint8)]), [], None

    recs = [rec(0, o, jpeg(o)) for o in range(4)]

    def run(gpu: Gpu) -> tuple[list, BaseException | None]:
        rq = RecordQueue(100, 1 << 30)
        stop = threading.Event()
        for r in recs:
            rq.put(r, stop)
        out: queue.Queue = queue.Queue()
        b = Batcher(rq, out, batch_size=4, max_wait_s=0.05, limits=Limits(), size=(28, 28), channels=1, workers=1,
                    stop=stop, on_reject=lambda r, why: None, journal=DecodeJournal(tmp_path), gpu=gpu)
        b.start()
        batches = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and b.error is None and sum(x.records for x in batches) < 4:
            with contextlib.suppress(queue.Empty):
                batches.append(out.get(timeout=0.1))
        stop.set()
        b.thread.join(5)
        return batches, b.error

    batches, error = run(Gpu(crash=True))
    assert isinstance(error, RuntimeError) and not batches
    assert json.loads((tmp_path / JOURNAL_FILE).read_text())["inflight"] == [[0, 0, 3]]
    gpu = Gpu(crash=False)
    batches, error = run(gpu)  # the restart
    assert error is None and gpu.calls == 0  # all four went the CPU way
    assert sum(x.size for x in batches) == 4
    assert (batches[0].images[1].int() - 10).abs().max() <= 2  # CPU-decoded pixels, not the fake GPU's zeros
