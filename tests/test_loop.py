"""The daemon loop without a broker: an in-memory intake feeds batches to the real loop and models.

Cadence of checkpoints and snapshots, the order "checkpoint durable, then commit", rollback after
non-finite updates, the prequential windows, and shutdown.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from streamkd import daemon
from streamkd.config import load_config
from streamkd.ingest.batcher import Batch
from streamkd.learn.accounting import Window
from streamkd.state.checkpoint import CheckpointStore
from streamkd.state.snapshot import SnapshotStore

BATCH = 8


class MemoryIntake:
    """Stands in for KafkaIntake: batches from a list, commits recorded."""

    def __init__(self, batches: list[Batch], checkpoints: CheckpointStore | None = None):
        self.pending = deque(batches)
        self.rejected = 0
        self.started_at: dict[int, int] | None = None
        self.commits: list[tuple[dict[int, int], int | None]] = []  # (offsets, newest durable checkpoint step)
        self.checkpoints = checkpoints
        self.steps_begun = self.steps_ended = 0
        self.closed = False
        self.flushes = 0
        self.failed_steps: list = []
        self.dead_letters_stuck = False

    def start(self, offsets):
        self.started_at = dict(offsets)

    @property
    def ready(self):
        return self.started_at is not None and not self.closed

    def next(self, timeout):
        return self.pending.popleft() if self.pending else None

    def step_failed(self, token):
        self.failed_steps.append(token)

    def begin_step(self, batch):
        self.steps_begun += 1
        return self.steps_begun

    def end_step(self, token):
        self.steps_ended += 1

    def flush_dead_letters(self):
        self.flushes += 1
        if self.dead_letters_stuck:
            raise RuntimeError("3 dead letters not acknowledged within 30 s")

    def commit(self, offsets):
        newest = self.checkpoints.load_latest() if self.checkpoints else None
        self.commits.append((dict(offsets), newest.step if newest else None))

    def highwater(self):
        return {}

    def stop(self):
        pass

    def close(self):
        self.closed = True


def batches(n: int, start: int = 0, labels: bool = True) -> list[Batch]:
    g = torch.Generator().manual_seed(start)
    out = []
    for i in range(start, start + n):
        x = torch.randint(0, 256, (BATCH, 1, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (BATCH,), generator=g) if labels else torch.full((BATCH,), -1)
        out.append(Batch(images=x, labels=y, offsets={0: (i + 1) * BATCH}, records=BATCH,
                         first_offsets={0: i * BATCH}))
    return out


PLAIN = ("replay.enabled=false", "ema.enabled=false", "gate.enabled=false", "drift.enabled=false")


def config(tmp_path, *extra: str, plain: bool = True):
    """Frequent cadences off; the plain online KD step unless ``plain=False`` (replay, EMA, gate, drift on)."""
    return load_config(None, [f"checkpoint.dir={tmp_path}/ck", f"snapshot.dir={tmp_path}/sn", "metrics.port=0",
                              "train.device=cpu", f"train.batch_size={BATCH}", "checkpoint.every_seconds=3600",
                              "snapshot.every_seconds=3600", *(PLAIN if plain else ()), *extra], env={})


def run(parts, n_records: int):
    return daemon.run(parts, threading.Event(), stop_when=lambda p: p.records_done >= n_records)


def test_the_final_checkpoint_does_not_wait_for_a_snapshot_in_flight(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=1000", "snapshot.every_steps=3")
    intake = MemoryIntake(batches(5), CheckpointStore(tmp_path / "ck"))
    parts = daemon.build(cfg, intake=intake)
    release, exporting = threading.Event(), threading.Event()

    def slow_exports(student):  # the serving exports of each snapshot: held until released
        def write(folder):
            exporting.set()
            assert release.wait(60)
        return write

    parts.persistence.extras = slow_exports
    loop = threading.Thread(target=run, args=(parts, 5 * BATCH), daemon=True)
    loop.start()
    assert exporting.wait(60)  # the step-3 snapshot is exporting; the loop trains on and stops after step 5
    for _ in range(200):  # its final checkpoint and commit land while that export still runs
        if intake.commits:
            break
        time.sleep(0.1)
    assert [c for c, _ in intake.commits] == [{0: 5 * BATCH}] and loop.is_alive()
    assert CheckpointStore(tmp_path / "ck").load_latest().step == 5
    assert SnapshotStore(tmp_path / "sn").versions() == []
    release.set()
    loop.join(60)
    assert not loop.is_alive()
    store = SnapshotStore(tmp_path / "sn")
    assert [store.manifest(v)["step"] for v in store.versions()] == [3, 5]


def test_checkpoint_and_snapshot_cadence_and_commits_after_durable_checkpoints(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=3", "snapshot.every_steps=5")
    intake = MemoryIntake(batches(12), CheckpointStore(tmp_path / "ck"))
    parts = daemon.build(cfg, intake=intake)
    prog = run(parts, 12 * BATCH)
    assert (prog.step, prog.samples_seen, prog.offsets) == (12, 12 * BATCH, {0: 12 * BATCH})
    assert intake.started_at == {} and intake.closed
    ckpt_steps = sorted(int(p.name[len("step-"):]) for p in CheckpointStore(tmp_path / "ck").list())
    assert ckpt_steps == [6, 9, 12]  # keep=3 of 3, 6, 9, 12
    # Every commit covers exactly what the newest durable checkpoint holds (never ahead of it).
    assert [c for c, _ in intake.commits] == [{0: s * BATCH} for s in (3, 6, 9, 12)]
    assert [s for _, s in intake.commits] == [3, 6, 9, 12]
    manifests = [SnapshotStore(tmp_path / "sn").manifest(v) for v in SnapshotStore(tmp_path / "sn").versions()]
    assert [m["step"] for m in manifests] == [5, 10, 12]  # every 5 steps, then the final one
    assert intake.steps_begun == intake.steps_ended == 12  # every step's crash-journal entry was closed


def test_resume_starts_the_intake_at_the_checkpoint_offsets(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=4")
    run(daemon.build(cfg, intake=MemoryIntake(batches(6))), 6 * BATCH)
    again = MemoryIntake(batches(2, start=6))
    prog = run(daemon.build(cfg, intake=again), 2 * BATCH)  # records consumed by this run
    assert again.started_at == {0: 6 * BATCH}  # the final checkpoint of the first run
    assert (prog.step, prog.samples_seen, prog.offsets) == (8, 8 * BATCH, {0: 8 * BATCH})


def test_consecutive_non_finite_updates_roll_back_to_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=4", "train.max_consecutive_skips=3")
    parts = daemon.build(cfg, intake=MemoryIntake(batches(10)))
    teacher = parts.teacher
    calls = {"n": 0}

    def flaky_teacher(x):
        calls["n"] += 1
        out = teacher(x)
        return torch.full_like(out, float("nan")) if 5 <= calls["n"] <= 7 else out  # batches 5, 6, 7: no usable target

    parts.labeller.teacher = flaky_teacher
    saved: dict[str, torch.Tensor] = {}
    real_save = parts.checkpoints.save

    def save(st):
        saved.setdefault(st.step, {k: v.clone() for k, v in st.student.items()})
        return real_save(st)

    parts.checkpoints.save = save
    loaded = []
    real_load = parts.learner.load_state
    parts.learner.load_state = lambda w, o: (loaded.append({k: v.clone() for k, v in w.items()}), real_load(w, o))
    prog = run(parts, 10 * BATCH)
    assert parts.registry.get_sample_value("streamkd_rollbacks_total") == 1
    assert sum(parts.registry.get_sample_value("streamkd_updates_skipped_total", {"reason": r})
               for r in ("nonfinite_loss", "nonfinite_grad")) == 3
    assert len(loaded) == 1 and all(torch.equal(loaded[0][k], saved[4][k]) for k in saved[4])  # back to step 4
    # 4 good steps, 3 skipped (rolled back to step 4), then batches 8-10 train on top of step 4.
    assert prog.step == 7 and prog.samples_seen == 7 * BATCH
    assert prog.offsets == {0: 10 * BATCH}  # the skipped batches' records are consumed, not in the model


def test_prequential_windows_score_before_learning(tmp_path):
    cfg = config(tmp_path, "train.agreement_window=16")
    parts = daemon.build(cfg, intake=MemoryIntake(batches(4)))
    student = parts.learner.student
    seen = []  # (agreeing, correct) of the weights *before* each batch's update
    real_step = parts.learner.step

    def step(images, t_logits, labels, fresh=None, weight=None):
        with torch.no_grad():
            pred = student(parts.learner.spec(images)).argmax(1)
        seen.append(((pred == t_logits.argmax(1)).sum().item(), (pred == labels).sum().item()))
        return real_step(images, t_logits, labels, fresh=fresh, weight=weight)

    parts.learner.step = step
    prog = run(parts, 4 * BATCH)
    # Window of 16 samples = the last two batches of 8.
    assert prog.agreement == pytest.approx(sum(a for a, _ in seen[-2:]) / 16)
    assert prog.label_accuracy == pytest.approx(sum(c for _, c in seen[-2:]) / 16)
    assert parts.registry.get_sample_value("streamkd_teacher_agreement_ratio") == pytest.approx(prog.agreement)


def test_window_keeps_the_most_recent_samples():
    w = Window(10)
    assert w.ratio is None
    w.add(4, 4)
    w.add(0, 4)
    assert w.ratio == 0.5
    w.add(3, 4)  # the newest batches that hold at least 10 samples: all three
    assert (w.hits, w.total) == (7, 12)
    w.add(1, 4)  # now the oldest batch can leave and 12 samples remain
    assert (w.hits, w.total) == (4, 12)
    w.add(0, 0)  # an empty batch changes nothing
    assert w.ratio == 4 / 12


def test_stop_keeps_what_was_trained_and_closes_the_edges(tmp_path):
    cfg = config(tmp_path, "checkpoint.every_steps=1000", "snapshot.every_steps=1000")
    intake = MemoryIntake(batches(3))
    parts = daemon.build(cfg, intake=intake)
    prog = run(parts, 3 * BATCH)
    newest = CheckpointStore(tmp_path / "ck").load_latest()
    assert newest is not None and newest.step == 3 and newest.offsets == {cfg.kafka.topic: {0: 3 * BATCH}}
    assert SnapshotStore(tmp_path / "sn").latest()["samples_seen"] == prog.samples_seen == 3 * BATCH
    assert intake.commits[-1][0] == {0: 3 * BATCH} and intake.closed
    assert parts.registry.get_sample_value("streamkd_ready") == 0
    assert not parts.health.alive() or parts.health.ready() is False


def test_no_checkpoint_covers_dead_letters_that_are_not_acknowledged(tmp_path):
    """A restart resumes after the checkpoint's offsets: a rejected record inside them whose dead letter is
    not acknowledged would be lost. So the dead letters are flushed first, and a failed flush means no
    checkpoint (and no commit) at all."""
    cfg = config(tmp_path, "checkpoint.every_steps=2")
    intake = MemoryIntake(batches(6), CheckpointStore(tmp_path / "ck"))
    intake.dead_letters_stuck = True
    parts = daemon.build(cfg, intake=intake)
    run(parts, 6 * BATCH)
    assert intake.flushes >= 3 and intake.commits == []
    assert CheckpointStore(tmp_path / "ck").list() == []
    assert parts.registry.get_sample_value("streamkd_checkpoint_write_failures_total") >= 3


def test_a_step_that_raises_is_reported_to_the_crash_journal_and_stops_the_loop(tmp_path):
    cfg = config(tmp_path)
    intake = MemoryIntake(batches(3))
    parts = daemon.build(cfg, intake=intake)
    real = parts.labeller.teacher
    calls = {"n": 0}

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device-side assert")
        return real(x)

    parts.labeller.teacher = failing
    with pytest.raises(RuntimeError, match="device-side assert"):
        run(parts, 3 * BATCH)
    assert intake.failed_steps == [2]  # the second batch's token
    newest = CheckpointStore(tmp_path / "ck").load_latest()
    assert newest is not None and newest.offsets == {cfg.kafka.topic: {0: BATCH}}  # only what trained
