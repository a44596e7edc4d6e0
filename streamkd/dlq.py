"""Dead letters: rejected records go to ``kafka.dlq_topic`` with ``streamkd-error`` / ``streamkd-source`` headers.

Each dead letter is kept until the broker acknowledges it; the daemon flushes them before it
commits offsets that cover them, so a rejected record is never lost between DLQ and checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time

from .config import KafkaConfig
from .source import RawRecord, client_config

log = logging.getLogger(__name__)


_TOO_LARGE = ("MessageSizeTooLargeError", "RecordListTooLargeError", "RecordBatchTooLargeError")


class DeadLetterError(RuntimeError):
    """Some dead letters are not acknowledged by the broker (yet); they stay queued for the next flush."""


class DeadLetters:
    """Produces rejected records to ``kafka.dlq_topic`` with ``streamkd-error`` / ``streamkd-source`` headers.

    Every dead letter is kept until the broker acknowledges it: a send that
    fails (broker down, producer not yet connected, delivery timeout) is
    retried at the next :meth:`flush`, and :meth:`flush` raises while any is
    unacknowledged. The daemon flushes before each checkpoint, so offsets that
    cover a rejected record are never committed before its dead letter is
    durable in Kafka. (``KafkaProducer.flush`` alone is not enough: it waits
    for sends to *finish*, and a failed one finishes too.)
    """

    def __init__(self, cfg: KafkaConfig, max_value_bytes: int):
        self.cfg = cfg
        self.max_value_bytes = max_value_bytes
        self._producer = None
        self._lock = threading.Lock()
        # [message kwargs, future or None (not sent yet)] in send order; acknowledged ones are dropped.
        self._pending: list[list] = []

    def _get(self):
        from kafka import KafkaProducer

        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(acks="all", linger_ms=20, retries=10, **client_config(self.cfg))
            return self._producer

    def send(self, rec: RawRecord, reason: str) -> None:
        """Queue one dead letter. Never raises for broker trouble: what fails now is retried by flush()."""
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
        msg = {"value": value, "key": rec.key, "headers": headers}
        entry = [msg, self._try_send(msg)]
        with self._lock:
            # Drop what is already acknowledged, so a burst of big rejects between two
            # checkpoints does not pile up in memory.
            self._pending = [e for e in self._pending if not (e[1] is not None and e[1].succeeded())]
            self._pending.append(entry)

    def _try_send(self, msg: dict):
        from kafka.errors import MessageSizeTooLargeError

        try:
            return self._get().send(self.cfg.dlq_topic, **msg)
        except MessageSizeTooLargeError as e:
            # A huge key or headers: retrying the same bytes would block checkpoints forever.
            if self._shrink(msg):
                log.warning("dead letter too large for the producer (%s); sending only its streamkd- headers", e)
                return self._try_send(msg)
            log.warning("dead letter too large even without payload (%s); retried at the next flush", e)
            return None
        except Exception as e:  # noqa: BLE001 - no broker, metadata timeout: flush() sends it again
            log.warning("dead-letter send failed (%s: %s); it stays queued and is retried", type(e).__name__, e)
            return None

    @staticmethod
    def _shrink(msg: dict) -> bool:
        """Keep only our own headers: streamkd-source still names the original. False if already done."""
        ours = [(k, v) for k, v in msg["headers"] if k.startswith("streamkd-") and k != "streamkd-truncated"]
        shrunk = {"value": b"", "key": None, "headers": [*ours, ("streamkd-truncated", b"1")]}
        if msg == shrunk:
            return False
        msg.update(shrunk)
        return True

    @property
    def pending(self) -> int:
        """Dead letters not yet acknowledged."""
        with self._lock:
            return len(self._pending)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every dead letter is acknowledged; raises DeadLetterError after ``timeout_s``.

        Called before offsets covering them are committed.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                entries = list(self._pending)
            if not entries:
                return
            if self._producer is not None:
                try:
                    self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - KafkaTimeoutError: checked below
                    log.debug("dead-letter flush: %s", e)
            done = []
            for entry in entries:
                fut = entry[1]
                if fut is not None and fut.is_done and fut.succeeded():
                    done.append(entry)
                elif fut is None or (fut.is_done and fut.failed()):
                    if fut is not None and type(fut.exception).__name__ in _TOO_LARGE:
                        self._shrink(entry[0])  # the broker's limit is below the producer's
                    entry[1] = self._try_send(entry[0])  # failed or never sent: again
            with self._lock:
                self._pending = [e for e in self._pending if not any(e is d for d in done)]
                left = len(self._pending)
            if not left:
                return
            if time.monotonic() >= deadline:
                raise DeadLetterError(f"{left} dead letters not acknowledged within {timeout_s:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
