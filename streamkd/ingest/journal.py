"""The decode journal: find the record whose decoding kills the process, and dead-letter it instead of crash-looping.

A pure-Python decode error is a `Rejected` value (decode.py never raises), but
a native decoder (libpng, libjpeg, libwebp, numpy) can still take the whole
process down: SIGSEGV, SIGABRT, an OOM kill. After a restart the daemon reads
the same records again and would crash again, forever. The journal breaks that
loop:

1. Before a chunk of records is decoded, the batcher records the chunk's
   offset ranges as *in flight*; after the chunk is decoded it clears them.
   The write is a small file replaced by rename, without fsync: it only has to
   survive a *process* crash (the page cache does), not a power loss.
2. At start, an in-flight entry means the previous process died while
   decoding those records. Each such record gets one crash on its count, and
   the range becomes *suspect*.
3. Records in a suspect range are decoded one at a time, each journaled on its
   own, so the next crash names the exact record.
4. A record that was in flight during ``max_crashes`` crashes is dead-lettered
   (reason ``decoder_crash``) without being decoded again.

A crash that has nothing to do with decoding (kill -9, a bug elsewhere) only
makes one chunk suspect once: it is then decoded one record at a time, every
record passes, and the entries go away. ``max_crashes`` > 1 keeps such
coincidences from condemning a good record.

Entries below the checkpoint's offsets are dropped at start: those records are
in the lineage (or the DLQ) and are never read again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_FILE = "decode-journal.json"
MAX_CRASHES = 3  # crashes with a record in flight before it is dead-lettered undecoded
_FORMAT = 1


@dataclass
class _Range:
    partition: int
    first: int  # inclusive
    last: int  # inclusive
    crashes: int

    def holds(self, partition: int, offset: int) -> bool:
        return self.partition == partition and self.first <= offset <= self.last


class DecodeJournal:
    """Crash-attribution state for decoding, kept in ``<directory>/decode-journal.json``.

    Used from one thread (the batcher's); not thread-safe.
    """

    FILE = JOURNAL_FILE
    STAGE = "decoding"
    count_inflight = True  # the previous process's in-flight entries count as crashes of their records
    died_inflight = False  # set at load: the previous process died with something in flight here

    def __init__(self, directory: str | Path, resume_offsets: dict[int, int] | None = None,
                 max_crashes: int = MAX_CRASHES):
        if max_crashes < 1:
            raise ValueError(f"max_crashes must be >= 1, got {max_crashes}")
        self.path = Path(directory) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_crashes = max_crashes
        self.ranges: list[_Range] = []  # suspect: one record each when a == b
        self._inflight: list[tuple[int, int, int]] = []
        self._write_failed = False
        self._load()
        self._prune(resume_offsets or {})
        self._write()

    # -- start-up ----------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            ranges = [_Range(int(p), int(a), int(b), int(c)) for p, a, b, c in data.get("suspects", [])]
            inflight = [(int(p), int(a), int(b)) for p, a, b in data.get("inflight", [])]
        except FileNotFoundError:
            return
        except (ValueError, TypeError, AttributeError) as e:
            # Unreadable journal: we lose crash attribution for one round, never data.
            log.warning("crash journal %s unreadable (%s); starting a fresh one", self.path, e)
            return
        self.ranges = ranges
        self.died_inflight = bool(inflight)
        if inflight and not self.count_inflight:
            log.warning("the previous process died with %s in flight, but the crash is attributed to decoding "
                        "(also in flight); not counted against these records", self.STAGE)
            return
        for p, a, b in inflight:
            log.error("the previous process died while %s partition %d offsets %d..%d", self.STAGE, p, a, b)
            self._count_crash(p, a, b)

    def _count_crash(self, p: int, a: int, b: int) -> None:
        same = next((r for r in self.ranges if (r.partition, r.first, r.last) == (p, a, b)), None)
        if same is not None:
            same.crashes += 1
        else:
            self.ranges.append(_Range(p, a, b, 1))

    def _prune(self, resume: dict[int, int]) -> None:
        kept = []
        for r in self.ranges:
            start = resume.get(r.partition)
            if start is not None:
                if r.last < start:
                    continue  # already in the lineage or the DLQ
                r.first = max(r.first, start)
            kept.append(r)
        self.ranges = kept

    # -- queries -------------------------------------------------------------------------
    def suspect(self, partition: int, offset: int) -> bool:
        """True when this record was in flight during an earlier crash: decode it on its own."""
        return any(r.holds(partition, offset) for r in self.ranges)

    def crashes(self, partition: int, offset: int) -> int:
        """Process crashes that happened while this record was being decoded."""
        return sum(r.crashes for r in self.ranges if r.holds(partition, offset))

    def condemned(self, partition: int, offset: int) -> bool:
        """True when the record must not be decoded again (dead-letter it as ``decoder_crash``)."""
        return self.crashes(partition, offset) >= self.max_crashes

    # -- the batcher's calls around each decode --------------------------------------------
    def begin(self, ranges: list[tuple[int, int, int]]) -> None:
        """Mark ``[(partition, first, last)]`` as being decoded now (before the decode starts)."""
        self._inflight = list(ranges)
        self._write()

    def end(self) -> None:
        """The decode started by :meth:`begin` finished (with values or rejections, not a crash)."""
        self._inflight = []
        self._write()

    def passed(self, partition: int, offset: int) -> None:
        """A suspect record is handled (decoded, rejected, or dead-lettered as condemned).

        Ranges shrink past it; a condemned record keeps a one-record entry at the
        full count, so that if we crash before a checkpoint covers it, it is
        dead-lettered again rather than decoded again. Call :meth:`end` (or
        :meth:`begin`) afterwards to persist.
        """
        doomed = self.condemned(partition, offset)
        kept = []
        for r in self.ranges:
            if r.holds(partition, offset):
                if r.first == r.last:
                    continue
                r.first = offset + 1
                if r.first > r.last:
                    continue
            kept.append(r)
        if doomed:
            kept.append(_Range(partition, offset, offset, self.max_crashes))
        self.ranges = kept

    @property
    def active(self) -> bool:
        return bool(self.ranges)

    def _write(self) -> None:
        data = {"format": _FORMAT, "inflight": [list(r) for r in self._inflight],
                "suspects": [[r.partition, r.first, r.last, r.crashes] for r in self.ranges]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            # No fsync on purpose: this must survive a process crash, which the page cache
            # does; a power loss merely loses crash attribution for one round.
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            # A full disk must not stop decoding (that would turn it into a crash loop);
            # we only lose crash attribution until writes succeed again.
            if not self._write_failed:
                log.warning("crash journal %s not writable (%s); continuing without it", self.path, e)
            self._write_failed = True
        else:
            self._write_failed = False


def chunk_ranges(records) -> list[tuple[int, int, int]]:
    """``[(partition, first_offset, last_offset)]`` covering the records (any object with .partition/.offset)."""
    span: dict[int, list[int]] = {}
    for rec in records:
        lo_hi = span.setdefault(rec.partition, [rec.offset, rec.offset])
        lo_hi[0] = min(lo_hi[0], rec.offset)
        lo_hi[1] = max(lo_hi[1], rec.offset)
    return [(p, lo, hi) for p, (lo, hi) in sorted(span.items())]


TRAIN_JOURNAL_FILE = "train-journal.json"


class TrainJournal(DecodeJournal):
    """The same crash attribution for the training step, in ``<directory>/train-journal.json``.

    A batch's offset ranges are in flight from before the teacher sees it until
    its step's stats have been read on the host (on CUDA one step later, so an
    asynchronous device error is still attributed to its batch). A record that
    was in flight during ``max_crashes`` consecutive crashes (a Python exception
    or a signal, it makes no difference) is dead-lettered by the batcher with
    reason ``train_crash`` instead of being trained again. A batch that trains
    clears its records' counts, so only crashes in a row condemn a record.

    Used from the loop thread (begin/end) and the batcher thread (condemned/passed)
    under one lock.
    """

    FILE = TRAIN_JOURNAL_FILE
    STAGE = "training"

    def __init__(self, directory: str | Path, resume_offsets: dict[int, int] | None = None,
                 max_crashes: int = MAX_CRASHES, *, decoding_died: bool = False):
        # A process that died with records in flight in *both* stages (the batcher decodes the next
        # batches while the loop trains) is counted against the decoding: the decode journal then
        # decodes those records one by one and finds the culprit, and an innocent batch in training
        # is not condemned for it. A step that raises says so itself (step_failed), so exceptions are
        # always counted here.
        self.count_inflight = not decoding_died
        self._lock = threading.RLock()
        self._steps: dict[int, list[tuple[int, int, int]]] = {}
        self._next_token = 0
        super().__init__(directory, resume_offsets, max_crashes)

    def begin_step(self, ranges: list[tuple[int, int, int]]) -> int:
        """Mark a batch's ``[(partition, first, last)]`` as in training; returns the token for :meth:`end_step`."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._steps[token] = list(ranges)
            self._inflight = [r for rs in self._steps.values() for r in rs]
            self._write()
            return token

    def step_failed(self, token: object) -> None:
        """The step raised: count the crash now (the process is about to stop, whatever else is in flight)."""
        with self._lock:
            for p, a, b in self._steps.pop(token, None) or []:  # type: ignore[arg-type]
                log.error("training raised with partition %d offsets %d..%d in the batch", p, a, b)
                self._count_crash(p, a, b)
            self._inflight = [r for rs in self._steps.values() for r in rs]
            self._write()

    def end_step(self, token: object) -> None:
        """The step is on the host: its records trained without taking the process down."""
        with self._lock:
            ranges = self._steps.pop(token, None)  # type: ignore[arg-type]
            if ranges is None:
                return
            if self.ranges:
                for p, a, b in ranges:
                    for r in [r for r in self.ranges if r.partition == p and r.first <= b and a <= r.last
                              and r.crashes < self.max_crashes]:  # condemned ones stay until a checkpoint
                        self.ranges.remove(r)
            self._inflight = [r for rs in self._steps.values() for r in rs]
            self._write()

    def condemned(self, partition: int, offset: int) -> bool:
        with self._lock:
            return super().condemned(partition, offset)

    def crashes(self, partition: int, offset: int) -> int:
        with self._lock:
            return super().crashes(partition, offset)

    def passed(self, partition: int, offset: int) -> None:
        with self._lock:
            super().passed(partition, offset)
            self._write()


def batch_ranges(first: dict[int, int], next_offsets: dict[int, int]) -> list[tuple[int, int, int]]:
    """``[(partition, first, last)]`` of a batch, from its first offsets and its resume (next) offsets."""
    # A batch that holds only part of a big record resumes *at* that record: it is still one offset.
    return [(p, first[p], max(first[p], next_offsets[p] - 1)) for p in sorted(next_offsets) if p in first]
