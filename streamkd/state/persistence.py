"""Persistence: resume, checkpoint and snapshot cadence, and rollback to the last good checkpoint.

Exactly-once into the lineage rests on the order kept here: a checkpoint holds
the model together with the offsets it covers; the dead letters for the records
it skips are acknowledged first (a restart resumes *after* them, so they must
not be lost), then the checkpoint is made durable, and only then are its offsets
committed to Kafka.
Checkpoints and snapshots are written on two background threads, one each, so
the loop never waits for the disk and a checkpoint never queues behind a slow
snapshot (its serving exports can take many seconds): on SIGTERM the final
checkpoint is durable first. Each kind is written in the order asked for; a
failed write is logged and counted, and the previous checkpoint or snapshot
stays the newest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import torch
from safetensors.torch import load_file

from streamkd.config import Config
from streamkd.learn.accounting import Progress
from streamkd.learn.learner import Learner
from streamkd.learn.trainer import Trainer
from streamkd.metrics import Metrics
from streamkd.state.checkpoint import CheckpointStore, TrainState, is_finite_state
from streamkd.state.snapshot import MODEL_FILE, NonFiniteWeights, SnapshotStore

log = logging.getLogger(__name__)


class Persistence:
    """When and what to write: checkpoints (for resume) and snapshots (for serving)."""

    def __init__(self, cfg: Config, learner: Learner, checkpoints: CheckpointStore, snapshots: SnapshotStore,
                 metrics: Metrics, manifest: Callable[[Progress], dict], teacher_sha256: str | None,
                 extras: Callable[[dict], Any] | None = None, trainer: Trainer | None = None):
        self.cfg, self.learner, self.metrics = cfg, learner, metrics
        self.lineage = {"config_sha256": cfg.sha256(), "teacher_sha256": teacher_sha256}  # in every checkpoint
        self.checkpoints, self.snapshots = checkpoints, snapshots
        self.manifest = manifest  # Progress -> the manifest body of a snapshot taken now
        self.extras = extras  # manifest["student"] -> the serving formats' writer (publish's write_extras)
        self.trainer = trainer  # replay, EMA, holdout and drift state (checkpointed); the publishing gate
        self.force_requested = False  # an operator asked for a snapshot now, past the gate
        self.commit: Callable[[dict[int, int]], None] = lambda offsets: None  # set to the intake's commit
        self.flush_dead_letters: Callable[[], None] = lambda: None  # set to the intake's
        self._writers: dict[str, ThreadPoolExecutor] = {}  # per kind; started on its first write, stopped by close()
        self._ckpt: Future | None = None
        self._snap: Future | None = None
        self._initial: tuple[dict, dict] | None = None  # rollback target before the first checkpoint
        self.ckpt_step = self.snap_step = 0
        self._ckpt_covers: tuple[int, dict[int, int]] | None = None  # (step, offsets) of the newest checkpoint
        self.ckpt_t = self.snap_t = time.monotonic()

    # -- start ---------------------------------------------------------------------------------
    def resume(self, prog: Progress) -> None:
        """Load the newest valid checkpoint into the learner; ``prog`` then says where to read from."""
        state = self.checkpoints.load_latest()
        if state is not None:
            self.learner.load_state(state.student, state.optimizer)
            prog.step, prog.samples_seen = state.step, state.samples_seen
            prog.offsets = dict(state.offsets.get(self.cfg.kafka.topic, {}))
            self.metrics.checkpoint_restored(self.checkpoints.list()[0].stat().st_mtime)
            if self.trainer is not None:
                self.trainer.load_state_dict(state.learning)
            log.info("resumed from checkpoint step %d (%d samples); offsets %s", prog.step, prog.samples_seen,
                     prog.offsets)
        else:
            self._initial = self.learner.state()
        self.ckpt_step = self.snap_step = prog.step
        self.ckpt_t = self.snap_t = time.monotonic()
        latest = self.snapshots.latest()
        if latest:  # restore the gauges (not the counter: nothing was published by this process yet)
            self.metrics.last_snapshot_version.set(latest["version"])
            self.metrics.last_snapshot_ts.set(_rfc3339_to_unix(latest.get("created_at")))
            if self.trainer is not None:  # the gate compares new candidates with what LATEST serves
                self.trainer.published(self._latest_weights(latest["version"]))

    # -- cadence -------------------------------------------------------------------------------
    def due(self, prog: Progress, now: float) -> bool:
        """True when a checkpoint or a snapshot is due (the caller then reads the step in flight and saves)."""
        return self._ckpt_due(prog, now) or self._snap_due(prog, now)

    def force_publish(self) -> None:
        """Publish a snapshot at the next turn of the loop, whatever the gate says (an operator's call)."""
        self.force_requested = True

    def save_due(self, prog: Progress, now: float) -> None:
        if self._ckpt_due(prog, now):
            self.checkpoint(prog, sync=False)
        if self._snap_due(prog, now):
            self.snapshot(prog, sync=False)

    def _ckpt_due(self, prog: Progress, now: float) -> bool:
        c = self.cfg.checkpoint
        if prog.mid_record:  # the offsets would not match the samples: wait for the record's last image
            return False
        return prog.step - self.ckpt_step >= c.every_steps or (now - self.ckpt_t >= c.every_seconds
                                                                 and bool(prog.offsets))

    def _snap_due(self, prog: Progress, now: float) -> bool:
        s = self.cfg.snapshot
        if self.force_requested and not prog.mid_record:
            return True
        return prog.step - self.snap_step >= s.every_steps or (now - self.snap_t >= s.every_seconds
                                                                and prog.step > self.snap_step)

    # -- writes --------------------------------------------------------------------------------
    def checkpoint(self, prog: Progress, sync: bool) -> None:
        self._wait("_ckpt", "checkpoint")
        weights, opt = self.learner.state()
        self.ckpt_step, self.ckpt_t = prog.step, time.monotonic()
        if not is_finite_state(weights):
            # The step guard checks grads and loss, not what the update did to the weights
            # (or to buffers such as BatchNorm statistics, updated in forward). A non-finite
            # checkpoint would be the rollback target: never write one; roll back instead.
            self.rollback(prog, f"student weights are not finite at step {prog.step}")
            return
        st = TrainState(step=prog.step, samples_seen=prog.samples_seen,
                        offsets={self.cfg.kafka.topic: dict(prog.offsets)}, student=weights, optimizer=opt,
                        extra=dict(self.lineage),
                        learning=self.trainer.state_dict() if self.trainer is not None else {})
        self._ckpt = self.metrics.watch_write(self._submit("checkpoint", self._write_checkpoint, st), "checkpoint")
        self._ckpt_covers = (prog.step, dict(prog.offsets))
        if sync:
            self._wait("_ckpt", "checkpoint")

    def _write_checkpoint(self, st: TrainState) -> None:
        self.flush_dead_letters()  # raises when they are not acknowledged: no checkpoint past them
        self.checkpoints.save(st)
        self.metrics.checkpoint_written()
        self.commit(st.offsets.get(self.cfg.kafka.topic, {}))  # never ahead of the durable checkpoint

    def snapshot(self, prog: Progress, sync: bool) -> None:
        self._wait("_snap", "snapshot")
        self.snap_step, self.snap_t = prog.step, time.monotonic()
        manifest = self.manifest(prog)
        if self.trainer is None:
            weights = self.learner.weights()  # the optimizer state stays on the device: a snapshot does not keep it
        else:
            if self.force_requested:
                self.force_requested, self.trainer.force_next = False, True
            cand = self.trainer.candidate()
            if not cand.accepted:
                return  # counted and logged by the gate; LATEST keeps serving the last published snapshot
            weights = cand.weights
            manifest.update(self.trainer.manifest(), weights=cand.which, holdout=cand.score,
                            gate_decision={"reason": cand.reason, "published": cand.published_score})
            self.trainer.published(weights, cand.predictions)
        self._snap = self.metrics.watch_write(self._submit("snapshot", self._publish, weights, manifest), "snapshot")
        if sync:
            self._wait("_snap", "snapshot")

    def _publish(self, weights: dict[str, torch.Tensor], manifest: dict) -> None:
        try:
            extras = self.extras(manifest["student"]) if self.extras is not None else None
            m = self.snapshots.publish(weights, manifest, write_extras=extras)
        except NonFiniteWeights as e:
            log.error("snapshot refused: %s (the previous snapshot stays the newest)", e)
            return
        self.metrics.snapshot_published(m["version"])
        log.info("published snapshot %d (step %d, %d samples)", m["version"], manifest["step"],
                 manifest["samples_seen"])

    def _submit(self, kind: str, fn: Callable, *args: Any) -> Future:
        """Run ``fn`` on the writer thread of ``kind`` (its writes happen in the order they are asked for)."""
        if kind not in self._writers:
            self._writers[kind] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{kind}-writer")
        return self._writers[kind].submit(fn, *args)

    def _latest_weights(self, version: int) -> dict[str, torch.Tensor] | None:
        path = self.snapshots.file_path(version, MODEL_FILE)
        try:
            return load_file(str(path)) if path is not None else None
        except (OSError, ValueError) as e:  # a damaged file: the gate then starts from the next snapshot
            log.warning("snapshot %d weights unreadable (%s); the gate has no reference yet", version, e)
            return None

    def _wait(self, attr: str, what: str) -> None:
        """Wait for a background write; a failed write is logged (the previous state stays intact)."""
        fut = getattr(self, attr)
        if fut is None:
            return
        setattr(self, attr, None)
        try:
            fut.result()
        except Exception:  # noqa: BLE001 - disk full, permissions: keep training, retry at the next interval
            log.exception("%s write failed; the previous one stays the newest", what)

    # -- recovery ------------------------------------------------------------------------------
    def rollback(self, prog: Progress, why: str) -> None:
        """The weights went bad (K consecutive skipped updates, or non-finite). Return to the last good checkpoint."""
        self._wait("_ckpt", "checkpoint")  # roll back to the newest checkpoint, not the one before it
        st = self.checkpoints.load_latest()
        dropped_from = st.offsets.get(self.cfg.kafka.topic, {}) if st else {}
        if st is not None:
            self.learner.load_state(st.student, st.optimizer)
            if self.trainer is not None:
                self.trainer.load_state_dict(st.learning)
            prog.step, prog.samples_seen = st.step, st.samples_seen
        elif self._initial is not None:
            self.learner.load_state(*self._initial)
            prog.step = prog.samples_seen = 0
        self.metrics.rollbacks.inc()
        log.error("%s: rolled back to checkpoint step %d; records in offsets %s .. %s are not in the model",
                  why, prog.step, dropped_from, prog.offsets)
        prog.consecutive_skips = 0
        # Count the next intervals from the restored step, or they would wait for the old one.
        self.ckpt_step, self.snap_step = min(self.ckpt_step, prog.step), min(self.snap_step, prog.step)

    # -- stop ----------------------------------------------------------------------------------
    def close(self, prog: Progress) -> None:
        """Keep what was trained: a final checkpoint (and commit), a final snapshot, then stop the writers.

        The checkpoint does not wait for a snapshot in flight: it is durable first.

        Stopped inside a big record, the previous checkpoint stays the resume point (that record is trained
        again, from its first image, into that lineage), and no snapshot of the later weights is published.
        """
        try:
            final = not prog.mid_record
            if final and prog.offsets and self._ckpt_covers != (prog.step, prog.offsets):
                self.checkpoint(prog, sync=True)
            self._wait("_ckpt", "checkpoint")
            if final and (prog.step > self.snap_step or not self.snapshots.versions()) and prog.step > 0:
                self.snapshot(prog, sync=True)
            self._wait("_snap", "snapshot")
        finally:
            for writer in self._writers.values():
                writer.shutdown(wait=True)
            self._writers.clear()
            self.snapshots.close()  # waits (bounded) for an upload to object storage in flight


def _rfc3339_to_unix(value: str | None) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
