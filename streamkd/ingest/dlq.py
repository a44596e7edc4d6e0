"""Dead letters: rejected records go to ``kafka.dlq_topic`` with ``streamkd-error`` / ``streamkd-source`` headers.

Each dead letter is kept until the broker acknowledges it; the daemon flushes them before it
commits offsets that cover them, so a rejected record is never lost between DLQ and checkpoint.
Sending happens on a thread of its own: a slow, unreachable or misconfigured DLQ never blocks the
decode path, only fills the bounded pending set (then :attr:`DeadLetters.full` pauses intake).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamkd.backoff import Backoff
from streamkd.config import KafkaConfig
from streamkd.ingest.source import RawRecord, client_config

log = logging.getLogger(__name__)


_TOO_LARGE = ("MessageSizeTooLargeError", "RecordListTooLargeError", "RecordBatchTooLargeError")
_MAX_BACKOFF_S = 5.0


class DeadLetterError(RuntimeError):
    """Some dead letters are not acknowledged by the broker (yet); they stay queued for the next flush."""


@dataclass
class _Letter:
    msg: dict  # KafkaProducer.send keyword arguments: value, key, headers
    future: Any = None  # kafka-python FutureRecordMetadata; None: not sent (yet, or the send raised)

    @property
    def nbytes(self) -> int:
        return len(self.msg["value"] or b"") + len(self.msg["key"] or b"") + sum(
            len(k) + len(v or b"") for k, v in self.msg["headers"])

    @property
    def acked(self) -> bool:
        return self.future is not None and self.future.is_done and self.future.succeeded()

    @property
    def needs_send(self) -> bool:
        return self.future is None or (self.future.is_done and self.future.failed())


def producer_config(cfg: KafkaConfig) -> dict[str, Any]:
    """The DLQ producer's settings: the consumer's connection and security settings, the ``kafka.extra``
    entries a producer knows, bounded blocking, and ``kafka.dlq_compression``."""
    from kafka import KafkaProducer

    settings: dict[str, Any] = {
        "acks": "all", "linger_ms": 20, "retries": 10,
        # Dead letters are delivered at least once (a letter is sent again until acknowledged), so the
        # idempotent producer buys nothing here, and after a dropped connection it can fail for good
        # (OutOfOrderSequenceNumber, then no new producer id): a plain producer recovers.
        "enable_idempotence": False,
        # send() waits this long at most for metadata (a missing topic) or buffer room.
        "max_block_ms": cfg.dlq_max_block_ms,
        # A delivery that the broker never confirms fails after this, and is sent again.
        "delivery_timeout_ms": 20 + 2 * cfg.request_timeout_ms,
        "compression_type": None if cfg.dlq_compression == "none" else cfg.dlq_compression,
        # Creating the producer gives up after this (the sender thread retries with backoff).
        "bootstrap_timeout_ms": min(5000, cfg.request_timeout_ms),
        **client_config(cfg),
    }
    # kafka.extra is checked against the consumer's settings; a producer takes only the shared ones.
    settings.update({k: v for k, v in cfg.extra.items() if k in KafkaProducer.DEFAULT_CONFIG})
    return settings


class DeadLetters:
    """Produces rejected records to ``kafka.dlq_topic`` with ``streamkd-error`` / ``streamkd-source`` headers.

    :meth:`send` only queues (it never blocks on the network); a sender thread
    delivers, and re-sends what fails (broker down, topic missing, delivery
    timeout) with capped backoff. Every dead letter is kept until the broker
    acknowledges it, and :meth:`flush` raises while any is unacknowledged when
    its deadline passes. The daemon flushes before each checkpoint, so offsets
    that cover a rejected record are never committed before its dead letter is
    durable in Kafka. (``KafkaProducer.flush`` alone is not enough: it waits
    for sends to *finish*, and a failed one finishes too.)

    The pending set is bounded by ``kafka.dlq_max_pending`` letters and
    ``kafka.dlq_max_pending_bytes``: :attr:`full` tells the intake to pause.
    A letter is never dropped, so a pause overshoots the bound by at most what
    was already being decoded.
    """

    def __init__(self, cfg: KafkaConfig, max_value_bytes: int, *,
                 on_pending: Callable[[int], None] = lambda n: None,
                 on_error: Callable[[str], None] = lambda op: None,
                 producer_factory: Callable[[], Any] | None = None):
        self.cfg = cfg
        self.max_value_bytes = max_value_bytes
        self.on_pending = on_pending
        self.on_error = on_error
        self._factory = producer_factory or self._new_producer
        self._producer = None
        self._cv = threading.Condition()
        self._pending: list[_Letter] = []  # in send order; acknowledged ones are dropped
        self._retry_at = 0.0  # no (re)send before this (monotonic), after a failure
        self._backoff = Backoff(0.1, _MAX_BACKOFF_S)  # between re-sends after a failure
        self._was_full = False
        self._next_warning = 0.0  # delivery failures are logged at most once a minute
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the hot path ---------------------------------------------------------------------
    def send(self, rec: RawRecord, reason: str) -> None:
        """Queue one dead letter and return at once; the sender thread delivers it."""
        if self.cfg.dlq_topic is None:
            return
        value = rec.value or b""
        headers = [(k, v) for k, v in rec.headers if not k.startswith("streamkd-")]
        if len(value) > self.max_value_bytes:
            # Keep the DLQ within broker limits; the source header still points at the original.
            value = value[: self.max_value_bytes]
            headers.append(("streamkd-truncated", b"1"))
        headers += [("streamkd-error", reason.encode()),
                    ("streamkd-source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
        letter = _Letter({"value": value, "key": rec.key, "headers": headers})
        with self._cv:
            if self._closed:
                raise DeadLetterError("dead letters are closed")
            self._pending.append(letter)
            self._changed()
            self._cv.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)
                self._thread.start()

    @property
    def pending(self) -> int:
        """Dead letters not yet acknowledged."""
        with self._cv:
            self._drop_acked()
            return len(self._pending)

    @property
    def full(self) -> bool:
        """The pending set reached its bound: the intake should pause until the DLQ catches up."""
        with self._cv:
            self._drop_acked()
            return self._is_full()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every dead letter is acknowledged; raises DeadLetterError when ``timeout_s`` passes first.

        Called before offsets covering them are committed. It only waits: the
        sender thread does the sending, so the deadline holds however long a
        single send blocks.
        """
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._retry_at = 0.0  # someone is waiting: retry now rather than after the backoff
            self._cv.notify_all()
            while True:
                self._drop_acked()
                if not self._pending:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadLetterError(f"{len(self._pending)} dead letters not acknowledged within "
                                          f"{timeout_s:.0f} s")
                self._cv.wait(min(left, 0.1))

    def close(self) -> None:
        """Stop the sender and close the producer (bounded). Unacknowledged letters are not lost: the
        offsets that cover their records were not committed, so they are read (and rejected) again."""
        with self._cv:
            self._closed = True
            self._drop_acked()
            left = len(self._pending)
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(self.cfg.dlq_max_block_ms / 1000 + 1.0)
        if left:
            log.warning("%d dead letters not acknowledged at shutdown; their records are read again after a "
                        "restart (their offsets were not committed)", left)
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass

    # -- bookkeeping (caller holds self._cv) -----------------------------------------------
    def _is_full(self) -> bool:
        return (len(self._pending) >= self.cfg.dlq_max_pending
                or sum(letter.nbytes for letter in self._pending) >= self.cfg.dlq_max_pending_bytes)

    def _drop_acked(self) -> None:
        if any(letter.acked for letter in self._pending):
            self._pending = [letter for letter in self._pending if not letter.acked]
            self._backoff.reset()
            self._changed()

    def _changed(self) -> None:
        self.on_pending(len(self._pending))
        full = self._is_full()
        if full and not self._was_full:
            log.error("dead-letter topic %r: %d letters (%d bytes) not acknowledged (limits kafka.dlq_max_pending="
                      "%d, kafka.dlq_max_pending_bytes=%d); intake paused and not ready until it accepts them",
                      self.cfg.dlq_topic, len(self._pending), sum(letter.nbytes for letter in self._pending),
                      self.cfg.dlq_max_pending,
                      self.cfg.dlq_max_pending_bytes)
        elif self._was_full and not full:
            log.info("dead-letter topic %r accepts letters again; intake resumed", self.cfg.dlq_topic)
        self._was_full = full

    def _wake(self, _result: Any = None) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the sender thread ------------------------------------------------------------------
    def _new_producer(self):
        from kafka import KafkaProducer

        return KafkaProducer(**producer_config(self.cfg))

    def _get(self):
        if self._producer is None:
            self._producer = self._factory()
        return self._producer

    def _run(self) -> None:
        while True:
            with self._cv:
                self._drop_acked()
                if self._closed:
                    return
                todo = [letter for letter in self._pending if letter.needs_send]
                wait = self._retry_at - time.monotonic()
                if not todo or wait > 0:
                    self._cv.wait(min(wait, 0.2) if todo else 0.2)
                    continue
            failed = False
            for letter in todo:
                if self._closed:
                    return
                if letter.future is not None and type(letter.future.exception).__name__ in _TOO_LARGE:
                    self._shrink(letter.msg)  # the broker's limit is below the producer's
                future = self._try_send(letter.msg)
                with self._cv:
                    letter.future = future
                if future is None:
                    failed = True
                    break
                future.add_both(self._wake)
            with self._cv:
                undelivered = [letter.future.exception for letter in self._pending
                               if letter.future is not None and letter.future.is_done and letter.future.failed()]
                if undelivered and self._warn_now():
                    log.warning("%d dead letters were not delivered to %r (%s); sending them again",
                                len(undelivered), self.cfg.dlq_topic, type(undelivered[0]).__name__)
                if failed or undelivered:
                    self.on_error("dlq")
                    self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _try_send(self, msg: dict):
        """A future for the send, or None when it raised (no broker, metadata timeout): sent again later."""
        from kafka.errors import MessageSizeTooLargeError

        try:
            return self._get().send(self.cfg.dlq_topic, **msg)
        except MessageSizeTooLargeError as e:
            # A huge key or headers: retrying the same bytes would block checkpoints forever.
            if self._shrink(msg):
                log.warning("dead letter too large for the producer (%s); sending only its streamkd- headers", e)
                return self._try_send(msg)
            log.warning("dead letter too large even without payload (%s); retried later", e)
            return None
        except Exception as e:  # noqa: BLE001 - no broker, topic missing (metadata timeout): sent again later
            if self._warn_now():
                log.warning("dead-letter send to %r failed (%s: %s); it stays queued and is retried",
                            self.cfg.dlq_topic, type(e).__name__, e)
            return None

    def _warn_now(self) -> bool:
        now = time.monotonic()
        if now < self._next_warning:
            return False
        self._next_warning = now + 60.0
        return True

    @staticmethod
    def _shrink(msg: dict) -> bool:
        """Keep only our own headers: streamkd-source still names the original. False if already done."""
        ours = [(k, v) for k, v in msg["headers"] if k.startswith("streamkd-") and k != "streamkd-truncated"]
        shrunk = {"value": b"", "key": None, "headers": [*ours, ("streamkd-truncated", b"1")]}
        if msg == shrunk:
            return False
        msg.update(shrunk)
        return True
