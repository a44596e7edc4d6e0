"""Decode records in a thread pool and assemble training batches that carry their resume offsets.

A batch holds at most ``batch_size`` images. An npy record with more images
than fit is split over consecutive batches; every batch but the last of such a
record is ``partial``: its offsets stop *before* that record, which counts as
done only with its last image. The loop takes no checkpoint while it is in the
middle of a record, so "every record before these offsets is in the model, and
no image after them" stays exactly true at every checkpoint. Rejected records
advance the offsets too: they are dead-lettered, not retried.

Labels are checked against the teacher's classes here, before any step sees them.

With a :class:`~streamkd.ingest.journal.DecodeJournal`, every decode is journaled
so that a record whose decoding kills the process (a native decoder crash) is
found and dead-lettered after a few restarts instead of crash-looping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from streamkd.ingest.decode import Decoded, Limits, Rejected, check_decoded_bytes, decode_record
from streamkd.ingest.gpu_decode import GpuJpegDecoder, JpegRef, check_jpeg
from streamkd.ingest.journal import DecodeJournal, TrainJournal, chunk_ranges
from streamkd.ingest.source import RawRecord, RecordQueue
from streamkd.learn.preprocess import resize_uint8

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Images ready for the teacher, and how far the stream is covered once they are trained."""

    images: torch.Tensor  # uint8 N×C×H×W at the teacher's size and channels (pinned on CUDA hosts)
    labels: torch.Tensor  # int64 N, -1 where the record carried no label
    offsets: dict[int, int]  # partition -> next offset, for every partition this batch touched
    records: int  # Kafka records in the batch (rejected ones included)
    first_offsets: dict[int, int]  # partition -> first offset in the batch (for logs on rollback)
    ready: torch.cuda.Event | None = None  # images already on the GPU: wait on this event before use
    partial: bool = False  # the last record here continues in the next batch (take no checkpoint after this one)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


def prepare(rec: RawRecord, limits: Limits, size: tuple[int, int], channels: int,
            gpu_jpeg: bool = False, num_classes: int | None = None) -> Decoded | Rejected | JpegRef:
    """Decode one record and bring every image to the teacher's size/channels (runs in the pool).

    With ``gpu_jpeg``, a JPEG that nvJPEG can take is only checked here (a JpegRef): the GPU decodes it.
    With ``num_classes``, a ``label`` outside ``0..num_classes-1`` is rejected as ``bad_label``.
    """
    if gpu_jpeg:
        ref = check_jpeg(rec.value, rec.headers, limits)
        if ref is not None:
            return _check_label(ref, num_classes) if isinstance(ref, JpegRef) else ref
    out = decode_record(rec.value, rec.headers, limits)
    if isinstance(out, Rejected):
        return out
    bad = _check_label(out, num_classes)
    if isinstance(bad, Rejected):
        return bad
    images = out.images
    # At the teacher's size a record can be far bigger than decoded (a batch of thumbnails
    # for a 224x224 teacher): check before resizing allocates it.
    too_big = check_decoded_bytes(int(images.shape[0]), channels, size[0], size[1], limits)
    if too_big is not None:
        return too_big
    if images.shape[1] != channels or tuple(images.shape[2:]) != tuple(size):
        images = torch.stack([resize_uint8(img, size, channels) for img in images])
    return Decoded(images=images.contiguous(), label=out.label)


def _check_label(out: Decoded | JpegRef, num_classes: int | None) -> Decoded | JpegRef | Rejected:
    if num_classes is not None and out.label is not None and not 0 <= out.label < num_classes:
        return Rejected("bad_label", f"label {out.label} is not a class of the teacher (0..{num_classes - 1})")
    return out


class Batcher:
    """Thread: RecordQueue -> decode pool -> Batch queue (size OR max wait)."""

    def __init__(self, records: RecordQueue, out: queue.Queue[Batch], *, batch_size: int, max_wait_s: float,
                 limits: Limits, size: tuple[int, int], channels: int, workers: int, stop: threading.Event,
                 on_reject: Callable[[RawRecord, Rejected], None], pin_memory: bool = False,
                 journal: DecodeJournal | None = None, gpu: GpuJpegDecoder | None = None,
                 num_classes: int | None = None, paused: Callable[[], bool] = lambda: False,
                 train_journal: TrainJournal | None = None):
        self.records, self.out = records, out
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.limits, self.size, self.channels = limits, size, channels
        self.stop_event = stop
        self.on_reject = on_reject
        self.pin_memory = pin_memory
        self.journal = journal
        self.train_journal = train_journal  # records that crashed the training step: dead-letter, not decode
        self.gpu = gpu  # nvJPEG decoder: JPEG pixels are decoded on the GPU, not in the CPU pool
        self.num_classes = num_classes  # the teacher's: labels outside 0..num_classes-1 are rejected
        self.paused = paused  # True while the intake must wait (e.g. the dead-letter backlog is full)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def _emit(self, images: list[torch.Tensor], labels: list[int], offsets: dict[int, int],
              first: dict[int, int], records: int,
              refs: list[tuple[RawRecord, JpegRef]] | None = None, partial: bool = False) -> bool:
        ready = None
        if images:
            if self.pin_memory:  # collate straight into pinned memory: the host->device copy is then async
                n = sum(int(t.shape[0]) for t in images)
                x = torch.cat(images, out=torch.empty((n, *images[0].shape[1:]), dtype=torch.uint8, pin_memory=True))
            else:
                x = torch.cat(images) if len(images) > 1 else images[0]
        else:  # only rejected records: an empty batch still moves the offsets forward
            x = torch.empty((0, self.channels, *self.size), dtype=torch.uint8)
        if refs:
            assert self.gpu is not None
            # The GPU decode is journaled like the CPU one: if nvJPEG takes the process down (or
            # raises), these records are decoded one by one on the CPU after the restart.
            if self.journal is not None:
                self.journal.begin(chunk_ranges([rec for rec, _ in refs]))
            # CPU-decoded images first, then the JPEGs nvJPEG decodes, all on the decoder's side stream.
            x, failed, ready = self.gpu.decode([r for _, r in refs], x)
            if self.journal is not None:
                self.journal.end()
            for i in failed:
                self.on_reject(refs[i][0], Rejected("corrupt", "nvJPEG could not decode the image"))
            bad = set(failed)
            labels = labels + [-1 if r.label is None else r.label for i, (_, r) in enumerate(refs) if i not in bad]
        # pinned: a pageable host->device copy could stall the stream; pinned ones are truly async
        y = torch.tensor(labels, dtype=torch.int64, pin_memory=self.pin_memory)
        batch = Batch(images=x, labels=y, offsets=dict(offsets),
                      records=records, first_offsets=dict(first), ready=ready, partial=partial)
        while not self.stop_event.is_set():
            try:
                self.out.put(batch, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - surfaced to the main loop, which crashes cleanly
            log.exception("batcher failed")
            self.error = e
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, recs: list[RawRecord]) -> list[Decoded | Rejected]:
        """Decode a chunk in record order; records condemned by the training-crash journal are rejected."""
        tj = self.train_journal
        if tj is None or not tj.active:
            return self._decode_chunk(recs)
        condemned = [tj.condemned(r.partition, r.offset) for r in recs]
        if not any(condemned):
            return self._decode_chunk(recs)
        decoded = iter(self._decode_chunk([r for r, c in zip(recs, condemned, strict=False) if not c]))
        out: list[Decoded | Rejected] = []
        for rec, doomed in zip(recs, condemned, strict=False):
            if doomed:
                crashes = tj.crashes(rec.partition, rec.offset)
                out.append(Rejected("train_crash", f"training crashed the process {crashes} times in a row with "
                                                   "this record in the batch; not retried"))
                tj.passed(rec.partition, rec.offset)
            else:
                out.append(next(decoded))
        return out

    def _decode_chunk(self, recs: list[RawRecord]) -> list[Decoded | Rejected]:
        """Decode a chunk in record order (so offsets per partition only ever move forward)."""
        if not recs:
            return []
        n = len(recs)

        def bulk() -> list[Decoded | Rejected]:
            # list(): every decode finishes here, so the journal's "in flight" window
            # covers decoding only, not the wait for room in the batch queue.
            return list(self.pool.map(prepare, recs, [self.limits] * n, [self.size] * n, [self.channels] * n,
                                      [self.gpu is not None] * n, [self.num_classes] * n))

        j = self.journal
        if j is None:
            return bulk()
        if not (j.active and any(j.suspect(r.partition, r.offset) for r in recs)):
            j.begin(chunk_ranges(recs))  # a crash inside names this chunk at the next start
            out = bulk()
            j.end()
            return out
        # Some of these records were being decoded when an earlier process died:
        # one at a time, each journaled on its own, so the next crash names the culprit.
        out = []
        for rec in recs:
            if j.condemned(rec.partition, rec.offset):
                crashes = j.crashes(rec.partition, rec.offset)
                out.append(Rejected("decoder_crash", f"decoding crashed the process {crashes} times; not retried"))
                j.passed(rec.partition, rec.offset)
                continue
            j.begin([(rec.partition, rec.offset, rec.offset)])
            # On the CPU even when nvJPEG is on: a JPEG left for the GPU would be decoded in
            # _emit, outside this record's journal entry (and nvJPEG may be what crashed).
            out.append(prepare(rec, self.limits, self.size, self.channels, False, self.num_classes))
            j.passed(rec.partition, rec.offset)
            j.end()
        return out

    def _loop(self) -> None:
        images: list[torch.Tensor] = []  # CPU-decoded, uint8 k×C×H×W each
        labels: list[int] = []  # one per image in `images`
        refs: list[tuple[RawRecord, JpegRef]] = []  # JPEGs left for the GPU (one image each)
        offsets: dict[int, int] = {}
        first: dict[int, int] = {}
        records = n = 0
        started = 0.0
        chunk = max(self.batch_size, 64)

        def flush(partial: bool = False) -> bool:
            nonlocal images, labels, refs, offsets, first, records, n
            ok = self._emit(images, labels, offsets, first, records, refs, partial)
            images, labels, refs, offsets, first, records, n = [], [], [], {}, {}, 0, 0
            return ok

        while not self.stop_event.is_set():
            if self.paused():
                recs: list[RawRecord] = []  # the records wait in the queue (and the consumers behind it)
                self.stop_event.wait(0.05)
            else:
                wait = 0.05 if not records else max(0.0, min(0.05, started + self.max_wait_s - time.monotonic()))
                recs = self.records.get_many(chunk, timeout=wait)
            results = self._decode(recs)
            for rec, res in zip(recs, results, strict=False):
                if isinstance(res, Rejected):
                    self.on_reject(rec, res)
                else:
                    k = 1 if isinstance(res, JpegRef) else int(res.images.shape[0])
                    if n and n + k > self.batch_size and not flush():  # a record starts a batch unless it fits
                        return
                    if isinstance(res, JpegRef):
                        refs.append((rec, res))
                    else:
                        label = -1 if res.label is None else res.label
                        done = 0
                        while k - done > self.batch_size:
                            # More images than one batch holds: train them batch by batch. Until its
                            # last image is trained the record is not done, so these batches resume at it.
                            images.append(res.images[done:done + self.batch_size])
                            labels.extend([label] * self.batch_size)
                            done += self.batch_size
                            n = self.batch_size
                            first.setdefault(rec.partition, rec.offset)
                            offsets[rec.partition] = rec.offset  # resume AT this record: it is not done yet
                            if not flush(partial=True):
                                return
                        images.append(res.images[done:] if done else res.images)
                        labels.extend([label] * (k - done))
                        k -= done
                    n += k
                if not records:
                    started = time.monotonic()
                records += 1
                first.setdefault(rec.partition, rec.offset)
                offsets[rec.partition] = rec.offset + 1  # resume at the next record, not this one
                if n >= self.batch_size and not flush():
                    return
            if records and time.monotonic() - started >= self.max_wait_s and not flush():
                return
