"""Kafka at the edge: consumer threads feeding a bounded queue, and offset commits (dead letters: dlq.py).

Decisions (see README "Delivery semantics"):

* **assign(), not subscribe().** One daemon is one model lineage, and the
  lineage's checkpoint is the source of truth for offsets, so there is nothing
  for a group rebalance to decide. With ``assign()`` there are no group joins,
  no heartbeats and no ``max_poll_interval_ms``: a slow GPU step can never get
  the consumer evicted, and blocking on the full queue is safe. The group id
  is still used to *commit* offsets, so lag exporters and operators see
  progress.
* **Seek to the checkpoint, not to the committed offsets.** Committed offsets
  trail the newest durable checkpoint, never lead it; on start every partition
  is sought to the checkpoint's next offset (or ``auto_offset_reset`` for a
  partition it does not know).
* **Parallel consumption.** ``kafka.consumers`` threads each own the partitions
  ``p % consumers == i``; a partition stays on one thread, so its records reach
  the queue in offset order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamkd.backoff import Backoff
from streamkd.config import KafkaConfig

log = logging.getLogger(__name__)

_SECURITY_KEYS = ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
                  "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname")


@dataclass(frozen=True)
class RawRecord:
    """One Kafka record as consumed: bytes untouched, offsets for resume."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def nbytes(self) -> int:
        return len(self.value or b"") + len(self.key or b"")


def client_config(cfg: KafkaConfig) -> dict[str, Any]:
    """Settings shared by every kafka-python client we create (security passes straight through)."""
    out: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()],
        "client_id": cfg.client_id,
        "request_timeout_ms": cfg.request_timeout_ms,
        "reconnect_backoff_max_ms": cfg.reconnect_backoff_max_ms,
    }
    for key in _SECURITY_KEYS:
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    return out


class RecordQueue:
    """A FIFO bounded by records AND bytes, so a burst of big images cannot exhaust memory."""

    def __init__(self, max_records: int, max_bytes: int):
        self.max_records, self.max_bytes = max_records, max_bytes
        self._items: deque[RawRecord] = deque()
        self._bytes = 0
        self._cv = threading.Condition()

    def put(self, rec: RawRecord, stop: threading.Event) -> bool:
        """Block until there is room (one oversized record is always admitted into an empty queue)."""
        with self._cv:
            while self._items and (len(self._items) >= self.max_records or self._bytes + rec.nbytes > self.max_bytes):
                if stop.is_set():
                    return False
                self._cv.wait(0.1)
            self._items.append(rec)
            self._bytes += rec.nbytes
            self._cv.notify_all()
            return True

    def get_many(self, max_items: int, timeout: float) -> list[RawRecord]:
        """Up to ``max_items`` records; waits up to ``timeout`` seconds for the first."""
        with self._cv:
            if not self._items:
                self._cv.wait(timeout)
            out = []
            while self._items and len(out) < max_items:
                rec = self._items.popleft()
                self._bytes -= rec.nbytes
                out.append(rec)
            if out:
                self._cv.notify_all()
            return out

    def __len__(self) -> int:
        return len(self._items)


class ErrorStreak:
    """Errors of one consumer thread with no progress between them: a codec the client lacks, a
    topic the credentials may not read, a deleted topic. A restart does not cure those, so after
    ``unhealthy_after_s`` the source stops looking ready, and the cause is logged as an ERROR at
    least every ``log_every_s`` while the streak lasts (the first error, possibly transient, is a WARNING).
    """

    def __init__(self, unhealthy_after_s: float, log_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.unhealthy_after_s, self.log_every_s, self.clock = unhealthy_after_s, log_every_s, clock
        self.since: float | None = None  # first error of the current streak
        self.errors = 0
        self._next_error_log = 0.0

    def failed(self, cause: str) -> None:
        now = self.clock()
        if self.since is None:
            self.since, self.errors = now, 0
            self._next_error_log = now + min(self.unhealthy_after_s, self.log_every_s)
            log.warning("%s; retrying (not ready if it lasts %.0f s)", cause, self.unhealthy_after_s)
        self.errors += 1
        if now >= self._next_error_log:
            self._next_error_log = now + self.log_every_s
            log.error("%s: failing for %.0f s (%d errors) without a record delivered%s", cause, now - self.since,
                      self.errors, "; not ready" if self.unhealthy else "")

    def ok(self) -> None:
        if self.since is not None:
            log.info("Kafka consumption recovered after %.0f s of errors", self.clock() - self.since)
        self.since = None

    @property
    def unhealthy(self) -> bool:
        return self.since is not None and self.clock() - self.since >= self.unhealthy_after_s


class _PollFailed(Exception):
    """A poll error: the consumer is recreated (kafka-python can keep a partition parked after one)."""


@dataclass
class SourceStatus:
    """What the consumer threads report; read by the loop and /readyz."""

    assigned: set[int] = field(default_factory=set)
    highwater: dict[int, int] = field(default_factory=dict)
    reachable: bool = False
    last_ok: float = 0.0


class KafkaSource:
    """Consumer threads that fill ``queue`` from every partition of ``cfg.topic``, starting at ``start_offsets``."""

    def __init__(self, cfg: KafkaConfig, queue: RecordQueue, start_offsets: dict[int, int],
                 stop: threading.Event, *, on_consumed: Callable[[int], None] = lambda n: None,
                 on_error: Callable[[str], None] = lambda op: None, probe_every_s: float = 5.0):
        self.cfg = cfg
        self.queue = queue
        self.start_offsets = dict(start_offsets)
        # partition -> next offset to fetch: the checkpoint's at start, then one past the last
        # record queued, so a consumer recreated after a failure neither skips nor repeats.
        self._next: dict[int, int] = dict(start_offsets)
        self.stop_event = stop
        self.on_consumed = on_consumed
        self.on_error = on_error
        self.probe_every_s = probe_every_s
        self.status = SourceStatus()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._committer = None
        self._commit_lock = threading.Lock()
        self._streaks = [ErrorStreak(cfg.unhealthy_after_s) for _ in range(cfg.consumers)]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.cfg.consumers):
            t = threading.Thread(target=self._run, args=(i,), name=f"kafka-consumer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def ready(self) -> bool:
        with self._lock:
            return (bool(self.status.assigned) and self.status.reachable
                    and not any(streak.unhealthy for streak in self._streaks))

    def highwater(self) -> dict[int, int]:
        with self._lock:
            return dict(self.status.highwater)

    # -- commits -------------------------------------------------------------------------
    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit ``{partition: next_offset}`` to the group (call only after the checkpoint is durable).

        Uses its own client, so the consumer threads never block on it. A failed
        commit is logged and counted, not fatal: the checkpoint, not the group,
        is the source of truth, and the next checkpoint commits again.
        """
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return True
        with self._commit_lock:
            try:
                if self._committer is None:
                    self._committer = KafkaConsumer(group_id=self.cfg.group_id, enable_auto_commit=False,
                                                    **client_config(self.cfg), **dict(self.cfg.extra))
                # Bounded: kafka-python's commit otherwise retries forever while the broker is
                # away, holding up the checkpoint writer and, at shutdown, the grace period.
                self._committer.commit({TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1)
                                        for p, o in offsets.items()}, timeout_ms=self.cfg.request_timeout_ms)
                return True
            except Exception as e:  # noqa: BLE001 - broker trouble: retried at the next checkpoint
                log.warning("offset commit failed (%s); the next checkpoint retries it", type(e).__name__)
                self.on_error("commit")
                self._close_committer()
                return False

    def close(self) -> None:
        with self._commit_lock:
            self._close_committer()

    def _close_committer(self) -> None:
        if self._committer is not None:
            try:
                self._committer.close(autocommit=False)
            except Exception:  # noqa: BLE001
                pass
            self._committer = None

    # -- the consumer thread ------------------------------------------------------------------
    def _consumer_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            # Never let the client re-position a partition by itself: kafka-python's reset on
            # OffsetOutOfRange is silent (an INFO line in a logger we mute) and, with "latest",
            # skips records. We get the error instead and re-position loudly (_reposition).
            "auto_offset_reset": "none",
            # A consumer must not create the topic it reads (with the broker's default
            # partition count) just because it started before the producer did.
            "allow_auto_create_topics": False,
            # Bootstrap gives up after this long, so our retry loop logs and /readyz reports
            # an absent broker within seconds (kafka-python's default is 30 s of silence).
            "bootstrap_timeout_ms": min(5000, self.cfg.request_timeout_ms),
        }
        settings.update(self.cfg.extra)  # the operator's explicit kafka.extra wins
        return settings

    def _connect(self, index: int):
        """A KafkaConsumer, retrying with capped exponential backoff until the broker answers or we stop."""
        from kafka import KafkaConsumer

        backoff = self._backoff()
        while not self.stop_event.is_set():
            try:
                return KafkaConsumer(
                    group_id=self.cfg.group_id,
                    enable_auto_commit=False,  # offsets are committed only after a durable checkpoint
                    max_poll_records=self.cfg.max_poll_records,
                    fetch_max_bytes=self.cfg.fetch_max_bytes,
                    max_partition_fetch_bytes=self.cfg.max_partition_fetch_bytes,
                    **client_config(self.cfg), **self._consumer_settings())
            except Exception as e:  # noqa: BLE001 - NoBrokersAvailable, DNS, TLS handshake...
                delay = backoff.next_delay()
                self._set_reachable(False, f"cannot reach Kafka at {self.cfg.bootstrap_servers} "
                                           f"({type(e).__name__}: {e}); not ready; retrying in {delay:.1f} s")
                self.on_error("connect")
                backoff.wait(delay)
        return None

    def _backoff(self) -> Backoff:
        """Reconnect delays: from 0.5 s up to ``kafka.reconnect_backoff_max_ms``, ended early by the stop event."""
        return Backoff(0.5, self.cfg.reconnect_backoff_max_ms / 1000, stop=self.stop_event)

    def _set_reachable(self, ok: bool, message: str = "") -> None:
        with self._lock:
            was = self.status.reachable
            self.status.reachable = ok
            if ok:
                self.status.last_ok = time.monotonic()
        if was != ok or (not ok and message):
            (log.info if ok else log.warning)(message or ("Kafka reachable" if ok else "Kafka unreachable"))

    def _caught_up(self, consumer, owned: list[int]) -> bool:
        """Every owned partition's position is at its fetched high watermark."""
        from kafka import TopicPartition

        for p in owned:
            tp = TopicPartition(self.cfg.topic, p)
            hw = consumer.highwater(tp)
            if hw is None or consumer.position(tp) < hw:
                return False
        return True

    def _mine(self, partitions: Iterable[int], index: int) -> list[int]:
        return sorted(p for p in partitions if p % self.cfg.consumers == index)

    def _assign_new(self, consumer, index: int, owned: list[int], unverified: dict[int, int]) -> list[int]:
        """Assign this thread's partitions; newly sought known positions go into ``unverified``."""
        from kafka import TopicPartition

        parts = consumer.partitions_for_topic(self.cfg.topic)
        if not parts:
            if owned:
                raise LookupError(f"topic {self.cfg.topic!r} is gone from the cluster metadata (deleted?)")
            return owned
        mine = self._mine(parts, index)
        if mine == owned:
            return owned
        tps = [TopicPartition(self.cfg.topic, p) for p in mine]
        consumer.assign(tps)
        known = {}
        for p in mine:
            if p in owned:
                continue
            tp = TopicPartition(self.cfg.topic, p)
            if p in self._next:
                # Resume at the next record not yet queued: the checkpoint's offset at start,
                # where this thread left off after a reconnect.
                consumer.seek(tp, self._next[p])
                known[p] = self._next[p]
            elif self.cfg.auto_offset_reset == "earliest":
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek_to_end(tp)
        # A fetch beyond the log end returns nothing, forever, without an error (the log end
        # may be re-filled by new records later, which we would then skip): _consume checks
        # these positions against the high watermark of the first fetch response.
        unverified.update(known)
        with self._lock:
            self.status.assigned.update(mine)
        log.info("consumer %d assigned partitions %s of %s (start offsets %s)", index, mine, self.cfg.topic,
                 {p: self._next.get(p, self.cfg.auto_offset_reset) for p in mine})
        return mine

    def _reposition(self, consumer, positions: dict[int, int | None], why: str) -> None:
        """Move partitions whose position lies outside the log back into it, loudly (never silently).

        Below the log start: those records were deleted (retention) before we
        trained them; they are gone, we continue at the log start. Beyond the
        log end: the topic was recreated or truncated; ``auto_offset_reset``
        decides (``earliest``, the default, re-reads rather than skips).
        """
        from kafka import TopicPartition

        tps = {p: TopicPartition(self.cfg.topic, p) for p in positions}
        begin = consumer.beginning_offsets(list(tps.values()))
        # The log end: the high watermark of the last fetch response when there is one. Not
        # ListOffsets(latest) first: the embedded Tansu broker answers it with the base offset
        # of the last batch (494 for 500 records), which would look like a truncated log.
        hws = {p: consumer.highwater(tp) for p, tp in tps.items()}
        end = consumer.end_offsets([tps[p] for p, hw in hws.items() if hw is None]) if None in hws.values() else {}
        for p, pos in positions.items():
            lo, hi = begin[tps[p]], hws[p] if hws[p] is not None else end[tps[p]]
            if pos is not None and lo <= pos <= hi:
                if why != "resume offset":
                    consumer.seek(tps[p], pos)  # a transient error: fetch from the same place again
                continue
            if pos is None:
                target = lo if self.cfg.auto_offset_reset == "earliest" else hi
                log.error("partition %d: %s unknown; continuing at %d per kafka.auto_offset_reset=%s", p, why,
                          target, self.cfg.auto_offset_reset)
            elif pos < lo:
                target = lo
                log.error("partition %d: %s %d is below the log start %d: %d records were deleted (retention?) "
                          "before they were trained; continuing at %d", p, why, pos, lo, lo - pos, lo)
            else:
                target = lo if self.cfg.auto_offset_reset == "earliest" else hi  # hi: the next record to arrive
                log.error("partition %d: %s %s is beyond the log end %d (topic recreated or truncated?); "
                          "continuing at %d per kafka.auto_offset_reset=%s", p, why, pos, hi, target,
                          self.cfg.auto_offset_reset)
            consumer.seek(tps[p], target)
            self._next[p] = target
            self.on_error("offset_reset")

    def _run(self, index: int) -> None:
        """One consumer thread: (re)connect, consume until stopped; any client failure reconnects."""
        backoff = self._backoff()
        while not self.stop_event.is_set():
            consumer = self._connect(index)
            if consumer is None:
                return
            self._set_reachable(True, f"connected to Kafka at {self.cfg.bootstrap_servers}")
            try:
                self._consume(consumer, index)
                return  # stopped
            except _PollFailed:
                pass  # counted and logged by the streak; reconnect below, resuming at self._next
            except Exception as e:  # noqa: BLE001 - a dead thread would stall the daemon silently
                self.on_error("consumer")
                self._set_reachable(False, f"consumer {index} failed ({type(e).__name__}: {e}); reconnecting")
            finally:
                try:
                    consumer.close(autocommit=False)
                except Exception:  # noqa: BLE001
                    pass
            backoff.wait()

    def _poll(self, consumer, index: int, owned: list[int]) -> dict | None:
        """One poll; None after re-positioning (offset out of range, log truncation). Other errors raise."""
        from kafka.errors import LogTruncationError, OffsetOutOfRangeError

        try:
            return consumer.poll(timeout_ms=200)
        except OffsetOutOfRangeError as e:
            positions = {tp.partition: off for tp, off in (e.args[0] if e.args and isinstance(e.args[0], dict)
                                                           else {}).items()}
            self._reposition(consumer, positions or {p: self._next.get(p) for p in owned}, "position")
        except LogTruncationError as e:
            # Records we read no longer exist on the broker (unclean leader election).
            div = {tp.partition: om for tp, om in e.divergent_offsets.items()}
            log.error("log truncation detected on partitions %s; re-positioning", sorted(div))
            self._reposition(consumer, {p: (om.offset if om is not None else None) for p, om in div.items()},
                             "position")
        except Exception as e:  # noqa: BLE001 - codec, authorization, deleted topic, broker trouble
            # Not a transient blip to wait out: kafka-python can leave the partition parked
            # behind a failed record batch, fetching nothing more, while the probe still
            # succeeds. A fresh consumer fetches the same offsets again; the streak decides
            # when a failure that keeps coming back makes the source unready.
            self.on_error("poll")
            self._streaks[index].failed(f"consumer {index}: Kafka poll failed ({type(e).__name__}: {e})")
            raise _PollFailed from e
        return None

    def _record_highwater(self, consumer, owned: list[int]) -> None:
        from kafka import TopicPartition

        with self._lock:
            for p in owned:
                hw = consumer.highwater(TopicPartition(self.cfg.topic, p))
                if hw is not None:
                    self.status.highwater[p] = hw

    def _probe(self, consumer, owned: list[int]) -> None:
        """Idle: make sure the broker is still there (a frozen broker looks idle too)."""
        from kafka import TopicPartition

        try:
            consumer.end_offsets([TopicPartition(self.cfg.topic, owned[0])])
            self._set_reachable(True, "Kafka reachable again")
        except Exception as e:  # noqa: BLE001
            self.on_error("probe")
            self._set_reachable(False, f"Kafka not answering ({type(e).__name__}); waiting for it to come back")

    def _consume(self, consumer, index: int) -> None:
        from kafka import TopicPartition

        owned: list[int] = []
        unverified: dict[int, int] = {}  # partition -> sought position not yet checked against the log
        last_refresh = last_probe = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if not owned or now - last_refresh > self.cfg.metadata_refresh_s:
                last_refresh = now
                try:
                    owned = self._assign_new(consumer, index, owned, unverified)
                except Exception as e:  # noqa: BLE001
                    self.on_error("metadata")
                    self._streaks[index].failed(f"consumer {index}: partition discovery failed "
                                                f"({type(e).__name__}: {e})")
                    raise _PollFailed from e
                if not owned:
                    try:
                        exists = self.cfg.topic in (consumer.topics() or set())
                    except Exception:  # noqa: BLE001 - broker trouble: same wait
                        exists = True
                    if not exists:
                        self.on_error("metadata")
                        self._streaks[index].failed(f"topic {self.cfg.topic!r} does not exist")
                    self.stop_event.wait(1.0)
                    continue
            batches = self._poll(consumer, index, owned)
            if batches is None:
                continue
            for p in list(unverified):
                hw = consumer.highwater(TopicPartition(self.cfg.topic, p))
                if hw is not None:  # a fetch response arrived: its high watermark is the log end
                    pos = unverified.pop(p)
                    if pos > hw:
                        self._reposition(consumer, {p: pos}, "resume offset")
            n = 0
            for _tp, records in batches.items():
                for r in records:
                    rec = RawRecord(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []))
                    if not self.queue.put(rec, self.stop_event):
                        return  # stopping: what is not queued is re-read after restart
                    self._next[r.partition] = r.offset + 1  # a reconnect resumes here, not at the start
                    n += 1
            if n:
                self.on_consumed(n)
                self._set_reachable(True, "Kafka reachable again")
                self._streaks[index].ok()
                last_probe = time.monotonic()
            elif self._streaks[index].since is not None and self._caught_up(consumer, owned):
                self._streaks[index].ok()  # nothing left to fetch: the error is behind us
            self._record_highwater(consumer, owned)
            if not n and time.monotonic() - last_probe > self.probe_every_s:
                last_probe = time.monotonic()
                self._probe(consumer, owned)
