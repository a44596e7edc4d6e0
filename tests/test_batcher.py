"""The batcher: batch_size holds for npy batch records too, offsets count a record only when it is done,
labels outside the teacher's classes are rejected, the decoded-size cap holds at the teacher's size,
and intake pauses when asked."""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time

import numpy as np
import torch
from PIL import Image

from streamkd.ingest.batcher import Batch, Batcher, prepare
from streamkd.ingest.decode import Decoded, Limits, Rejected
from streamkd.ingest.gpu_decode import JpegRef
from streamkd.ingest.source import RawRecord, RecordQueue


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def images(first: int, n: int) -> np.ndarray:
    """n 28x28 images whose pixels all equal their running number (so order is checkable)."""
    return np.stack([np.full((28, 28, 1), (first + i) % 256, np.uint8) for i in range(n)])


def rec(offset: int, value: bytes, label: bytes | None = None, partition: int = 0) -> RawRecord:
    return RawRecord("t", partition, offset, None, value, [("label", label)] if label is not None else [])


def run(recs: list[RawRecord], *, batch_size: int, expect_records: int | None = None, **kw) -> tuple[list[Batch], list]:
    rq = RecordQueue(1000, 1 << 30)
    stop = threading.Event()
    for r in recs:
        rq.put(r, stop)
    out: queue.Queue = queue.Queue()
    rejects: list = []
    b = Batcher(rq, out, batch_size=batch_size, max_wait_s=0.05, limits=kw.pop("limits", Limits()),
                size=kw.pop("size", (28, 28)), channels=1, workers=2, stop=stop,
                on_reject=lambda r, why: rejects.append((r.offset, why.reason)), **kw)
    b.start()
    batches: list[Batch] = []
    want = len(recs) if expect_records is None else expect_records
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(x.records for x in batches) < want:
        with contextlib.suppress(queue.Empty):
            batches.append(out.get(timeout=0.1))
    stop.set()
    b.thread.join(5)
    assert b.error is None
    return batches, rejects


def test_npy_record_bigger_than_a_batch_is_split_and_counts_only_when_done() -> None:
    recs = [rec(0, npy(images(0, 1))), rec(1, npy(images(1, 10))), rec(2, npy(images(11, 1))),
            rec(3, npy(images(12, 3)))]
    batches, rejects = run(recs, batch_size=4)
    assert not rejects
    assert all(0 < b.size <= 4 for b in batches), [b.size for b in batches]
    # Every image once, in stream order.
    pixels = torch.cat([b.images for b in batches])[:, 0, 0, 0].tolist()
    assert pixels == list(range(15))
    # The 10-image record (offset 1) starts a fresh batch and spans three; until its last piece,
    # the batches resume AT offset 1 (not past it) and say that the record continues.
    assert [(b.size, b.offsets[0], b.partial) for b in batches] == [
        (1, 1, False), (4, 1, True), (4, 1, True), (3, 3, False), (3, 4, False)]
    assert sum(b.records for b in batches) == 4


def test_record_of_exactly_n_batches_ends_complete() -> None:
    batches, _ = run([rec(0, npy(images(0, 8)))], batch_size=4)
    assert [(b.size, b.offsets[0], b.partial) for b in batches] == [(4, 0, True), (4, 1, False)]


def test_labels_outside_the_teachers_classes_are_rejected() -> None:
    one = npy(images(0, 1))
    recs = [rec(0, one, b"9"), rec(1, one, b"10"), rec(2, one, b"598"), rec(3, one, b"abc"), rec(4, one, b"0"),
            rec(5, one)]
    batches, rejects = run(recs, batch_size=8, num_classes=10)
    assert rejects == [(1, "bad_label"), (2, "bad_label"), (3, "bad_label")]
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [9, 0, -1]
    assert max(b.offsets[0] for b in batches) == 6  # rejected records advance the offsets too


def test_label_check_covers_jpegs_left_for_the_gpu() -> None:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="JPEG")
    good = prepare(rec(0, buf.getvalue(), b"3"), Limits(), (28, 28), 1, gpu_jpeg=True, num_classes=10)
    assert isinstance(good, JpegRef) and good.label == 3
    bad = prepare(rec(0, buf.getvalue(), b"10"), Limits(), (28, 28), 1, gpu_jpeg=True, num_classes=10)
    assert isinstance(bad, Rejected) and bad.reason == "bad_label"


def test_decoded_size_cap_holds_at_the_teachers_size() -> None:
    # 4 images of 28x28 decode to 3136 bytes, but a 56x56 teacher needs 12544: checked before resizing.
    value = npy(images(0, 4))
    limits = Limits(max_decoded_bytes=10_000)
    assert isinstance(prepare(rec(0, value), limits, (28, 28), 1), Decoded)
    out = prepare(rec(0, value), limits, (56, 56), 1)
    assert isinstance(out, Rejected) and out.reason == "too_large"


def test_paused_batcher_leaves_records_in_the_queue() -> None:
    rq = RecordQueue(1000, 1 << 30)
    stop = threading.Event()
    for o in range(5):
        rq.put(rec(o, npy(images(o, 1))), stop)
    paused = threading.Event()
    paused.set()
    out: queue.Queue = queue.Queue()
    b = Batcher(rq, out, batch_size=2, max_wait_s=0.05, limits=Limits(), size=(28, 28), channels=1, workers=1,
                stop=stop, on_reject=lambda r, why: None, paused=paused.is_set)
    b.start()
    try:
        time.sleep(0.5)
        assert len(rq) == 5 and out.empty()
        paused.clear()
        got = 0
        deadline = time.monotonic() + 10
        while got < 5 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got += out.get(timeout=0.1).records
        assert got == 5 and len(rq) == 0
    finally:
        stop.set()
        b.thread.join(5)


def test_batch_size_can_change_while_running() -> None:
    """The loop sizes batches from the teacher budget: a new size applies from the next batch."""
    rq, out, stop = RecordQueue(1000, 1 << 30), queue.Queue(), threading.Event()
    b = Batcher(rq, out, batch_size=4, max_wait_s=5.0, limits=Limits(), size=(28, 28), channels=1, workers=1,
                stop=stop, on_reject=lambda r, why: None)
    b.start()
    try:
        for i in range(8):
            rq.put(rec(i, npy(images(i, 1))), stop)
        first = [out.get(timeout=10).size for _ in range(2)]
        b.batch_size = 12
        for i in range(8, 32):
            rq.put(rec(i, npy(images(i, 1))), stop)
        second = [out.get(timeout=10).size for _ in range(2)]
    finally:
        stop.set()
        b.thread.join(5)
    assert (first, second) == ([4, 4], [12, 12])
