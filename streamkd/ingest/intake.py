"""The daemon's input edge: Kafka consumer threads -> record queue -> decode pool -> batches with offsets.

:class:`KafkaIntake` owns everything between the broker and the loop: the
consumer threads, the decode pool and batcher, the dead-letter producer, the
crash journals, and the offset commits. The loop only sees :class:`Batch`
values and calls :meth:`KafkaIntake.commit` with offsets that a durable
checkpoint covers. Any object with the same methods can stand in for it
(the loop tests use an in-memory one).
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from streamkd.config import Config
from streamkd.ingest.batcher import Batch, Batcher
from streamkd.ingest.decode import Limits, Rejected
from streamkd.ingest.dlq import DeadLetters
from streamkd.ingest.journal import DecodeJournal, TrainJournal, batch_ranges
from streamkd.ingest.source import KafkaSource, RawRecord, RecordQueue
from streamkd.metrics import Metrics

log = logging.getLogger(__name__)


class KafkaIntake:
    """Batches from a Kafka topic. Built at start-up, connected by :meth:`start` once the resume offsets are known."""

    def __init__(self, cfg: Config, metrics: Metrics, device: torch.device, num_classes: int):
        self.cfg, self.metrics, self.device = cfg, metrics, device
        self.num_classes = num_classes  # the teacher's: a label outside 0..num_classes-1 is rejected (bad_label)
        self.batches: queue.Queue[Batch] = queue.Queue(maxsize=cfg.train.prefetch_batches)
        self.stop_event = threading.Event()  # stops consuming; the loop itself stops on its own event
        # Values are cut to stay under the producer's (and Kafka's default broker) 1 MiB request limit,
        # with room left for key, headers and batch overhead.
        self.dlq = DeadLetters(cfg.kafka, max_value_bytes=min(cfg.input.max_bytes, 1_000_000),
                               on_pending=metrics.dead_letters_pending,
                               on_error=lambda op: metrics.kafka_errors.labels(op).inc())
        self.rejected = 0
        self.source: KafkaSource | None = None
        self.batcher: Batcher | None = None
        self.train_journal: TrainJournal | None = None
        self._batch_size = cfg.train.batch_size

    def start(self, offsets: dict[int, int]) -> None:
        """Start consuming at ``offsets`` (partition -> next offset; earlier records are in the lineage)."""
        cfg, metrics = self.cfg, self.metrics
        records = RecordQueue(cfg.kafka.queue_records, max_bytes=max(256 << 20, 4 * cfg.input.max_bytes))
        self.source = KafkaSource(cfg.kafka, records, offsets, self.stop_event, on_consumed=metrics.consumed,
                                  on_error=lambda op: metrics.kafka_errors.labels(op).inc())
        # A record whose decoding or training kills the process is found and dead-lettered after a few
        # restarts, instead of crash-looping (journal.py). The journals live beside the checkpoints.
        decode_journal = DecodeJournal(cfg.checkpoint.dir, offsets, max_crashes=cfg.train.max_crashes)
        self.train_journal = TrainJournal(cfg.checkpoint.dir, offsets, max_crashes=cfg.train.max_crashes,
                                          decoding_died=decode_journal.died_inflight)
        limits = Limits(cfg.input.max_bytes, cfg.input.max_pixels, cfg.input.max_images, cfg.input.max_decoded_bytes)
        self.batcher = Batcher(
            records, self.batches, batch_size=self._batch_size, max_wait_s=cfg.input.max_wait_ms / 1000,
            limits=limits, size=cfg.teacher.input_size, channels=cfg.teacher.channels,
            workers=cfg.input.decode_workers, stop=self.stop_event, on_reject=self._reject,
            pin_memory=self.device.type == "cuda", gpu=_gpu_decoder(cfg, self.device), journal=decode_journal,
            train_journal=self.train_journal, num_classes=self.num_classes,
            paused=lambda: self.dlq.full)  # a full dead-letter backlog pauses intake (and fails /readyz)
        self.source.start()
        self.batcher.start()

    @property
    def batch_size(self) -> int:
        """Records per batch (images, for npy records); the loop sets it from the teacher budget."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, records: int) -> None:
        self._batch_size = int(records)
        if self.batcher is not None:
            self.batcher.batch_size = self._batch_size  # from the next batch on

    @property
    def ready(self) -> bool:
        """Consumer assigned, no persistent Kafka errors, room for dead letters."""
        return self.source is not None and self.source.ready and not self.dlq.full

    def next(self, timeout: float) -> Batch | None:
        """The next batch, or None after ``timeout`` seconds without one. Raises if the decode stage died."""
        if self.batcher is not None and self.batcher.error is not None:
            raise RuntimeError("decode stage failed") from self.batcher.error
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self.metrics.queue_depth.set(self.batches.qsize())

    # -- crash attribution for the training step ----------------------------------------------
    def begin_step(self, batch: Batch) -> object:
        """Journal the batch as being trained; returns the token for :meth:`end_step`."""
        assert self.train_journal is not None
        return self.train_journal.begin_step(batch_ranges(batch.first_offsets, batch.offsets))

    def step_failed(self, token: object) -> None:
        """The step raised on this batch: one crash on its records (see TrainJournal)."""
        if self.train_journal is not None and token is not None:
            self.train_journal.step_failed(token)

    def end_step(self, token: object) -> None:
        if self.train_journal is not None and token is not None:
            self.train_journal.end_step(token)

    # -- offsets and lag -------------------------------------------------------------------------
    def flush_dead_letters(self) -> None:
        """Wait (bounded) until every dead letter so far is acknowledged; raises if they are not."""
        self.dlq.flush()

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit offsets that a durable checkpoint covers (its dead letters were flushed before it was written)."""
        if self.source is not None:
            self.source.commit(offsets)

    def highwater(self) -> dict[int, int]:
        return self.source.highwater() if self.source is not None else {}

    def stop(self) -> None:
        """Stop reading (the batches already decoded stay in the queue)."""
        self.stop_event.set()

    def close(self) -> None:
        self.stop_event.set()
        if self.source is not None:
            self.source.join(timeout=2.0)
            self.source.close()
        self.dlq.close()

    def _reject(self, rec: RawRecord, why: Rejected) -> None:
        self.rejected += 1
        self.metrics.rejected(why.reason)
        (log.error if why.reason in ("decoder_crash", "train_crash") else log.debug)(
            "rejected %s/%d/%d: %s (%s)", rec.topic, rec.partition, rec.offset, why.reason, why.detail)
        try:
            self.dlq.send(rec, why.reason)  # kept until acknowledged; the next checkpoint waits for it
        except Exception as e:  # noqa: BLE001 - the DLQ being down must not stop training
            self.metrics.kafka_errors.labels("dlq").inc()
            log.warning("dead-letter send failed for %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, e)


def _gpu_decoder(cfg: Config, device: torch.device):
    """nvJPEG batch decoder on CUDA hosts (``input.gpu_decode``), else None (CPU decode pool only)."""
    if device.type != "cuda" or not cfg.input.gpu_decode:
        return None
    from streamkd.ingest.gpu_decode import GpuJpegDecoder

    return GpuJpegDecoder(device, cfg.teacher.input_size, cfg.teacher.channels)
