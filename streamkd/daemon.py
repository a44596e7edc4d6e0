"""The daemon: Kafka -> decode -> teacher -> prequential score -> student step -> checkpoints and snapshots.

:func:`build` loads the models and builds every collaborator of the loop
(intake, accounting, persistence, health, HTTP server); :func:`run` is the
loop and reads top to bottom. Tests build the parts with other collaborators
(an in-memory intake, a server on port 0) and drive the same loop.

The loop meets the models at one narrow seam: a :class:`Labelled` batch
(uint8 images, the teacher's logits, labels, the offsets it covers). The
labelling stage (decode + teacher) produces it and the training stage
(student step + persistence) consumes it, so the two can later run apart.

Delivery semantics (README "Delivery semantics"): records are *delivered*
at least once (after a crash, everything after the newest checkpoint is read
again) but *trained into the surviving model lineage* exactly once, because a
checkpoint holds the model together with the offsets it covers, offsets are
committed only after that checkpoint is durable, and a restart seeks to the
checkpoint's offsets.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from streamkd.config import Config
from streamkd.ingest.batcher import Batch
from streamkd.ingest.intake import KafkaIntake
from streamkd.learn.accounting import Progress, Reporter, StepAccounting
from streamkd.learn.labeller import Labelled, Labeller, TeacherBudget
from streamkd.learn.learner import InputSpec, Learner, Teacher, precision_name, resolve_device, resolve_precision
from streamkd.learn.models import TEACHER_SPEC, build_model, file_sha256, num_classes_of, shipped_teacher_weights
from streamkd.learn.trainer import Trainer
from streamkd.metrics import Metrics
from streamkd.serve.export import snapshot_extras
from streamkd.serve.health import Health
from streamkd.serve.server import HttpServer
from streamkd.state.checkpoint import CheckpointStore
from streamkd.state.fsutil import lock_dirs
from streamkd.state.persistence import Persistence
from streamkd.state.snapshot import SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything the loop needs, built once at start (so tests can build them differently)."""

    cfg: Config
    device: torch.device
    teacher: Teacher
    learner: Learner
    teacher_info: dict
    num_classes: int
    checkpoints: CheckpointStore
    snapshots: SnapshotStore
    metrics: Metrics
    registry: CollectorRegistry
    intake: KafkaIntake
    accounting: StepAccounting
    persistence: Persistence
    labeller: Labeller
    trainer: Trainer
    health: Health
    server: HttpServer


def build(cfg: Config, registry: CollectorRegistry | None = None, *, intake: KafkaIntake | None = None) -> Parts:
    """Load the teacher and student, open the stores, build the loop's collaborators.

    ``intake`` replaces the Kafka intake (anything with its methods: tests feed batches from memory).
    Raises on anything that should stop the start.
    """
    lock_dirs(cfg.checkpoint.dir, cfg.snapshot.dir)  # one daemon per state directory: DirLockedError otherwise
    if "onnx" in cfg.snapshot.formats:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("snapshot.formats has onnx, which needs the export extra: "
                             "pip install 'streamkd[export]'") from None
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry, device=str(device))
    amp = resolve_precision(cfg.train.precision, device)
    teacher_amp = resolve_precision(cfg.teacher.precision, device, inference=True)
    t = cfg.teacher
    weights = t.weights or (str(shipped_teacher_weights()) if t.model == TEACHER_SPEC else None)
    teacher_model = build_model(t.model, t.num_classes, in_channels=t.channels, input_size=t.input_size,
                                weights=weights)
    num_classes = t.num_classes or num_classes_of(teacher_model, t.input_size, t.channels)
    sha = file_sha256(weights) if weights and Path(weights).is_file() else (
        file_sha256(t.model) if Path(t.model).is_file() else None)
    teacher_info = {"model": t.model, "weights": str(weights) if weights else None, "sha256": sha,
                    "num_classes": num_classes, "precision": precision_name(teacher_amp)}
    s = cfg.student
    student_classes = s.num_classes or num_classes
    if student_classes != num_classes:
        raise ValueError(f"student.num_classes={student_classes} but the teacher has {num_classes} classes")
    student_model = build_model(s.model, student_classes, in_channels=cfg.student_channels,
                                input_size=cfg.student_input_size, weights=s.init)
    t_spec = InputSpec(t.input_size, t.channels, t.mean, t.std)
    s_spec = InputSpec(cfg.student_input_size, cfg.student_channels, cfg.student_mean, cfg.student_std)
    teacher = Teacher(teacher_model, t_spec, device, teacher_amp, cfg.train.channels_last, cfg.train.compile)
    learner = Learner(student_model, s_spec, cfg.train, device, amp, cfg.train.channels_last, cfg.train.compile)
    checkpoints = CheckpointStore(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                                  on_fallback=lambda p, why: _fallback(metrics, "checkpoint", p, why))
    snapshots = SnapshotStore.from_config(cfg.snapshot,
                                          on_fallback=lambda v, why: _fallback(metrics, "snapshot", v, why))
    log.info("teacher %s (%d classes, %s, %s), student %s (%s) on %s", t.model, num_classes,
             f"weights sha256 {sha[:12]}" if sha else "random init", precision_name(teacher_amp), s.model,
             precision_name(amp), device)
    budget = TeacherBudget(t.budget, t.budget_floor, t.budget_ceiling, t.random_share, t.target_agreement,
                           cfg.train.seed, t.agreement_drop)
    labeller = Labeller(teacher, budget, learner.predict)
    trainer = Trainer(cfg, learner, budget, metrics)
    intake = intake if intake is not None else KafkaIntake(cfg, metrics, device, num_classes)
    accounting = StepAccounting(Progress(), metrics, cfg.train.agreement_window, device, on_done=intake.end_step)
    persistence = Persistence(cfg, learner, checkpoints, snapshots, metrics, teacher_sha256=sha,
                              manifest=functools.partial(manifest, cfg, num_classes, teacher_info),
                              extras=lambda student: snapshot_extras(student, cfg.snapshot),  # in a child process
                              trainer=trainer)
    health = Health(metrics, lambda: intake.ready)
    server = HttpServer(cfg.metrics.host, cfg.metrics.port, registry, healthy=health.alive, ready=health.ready,
                        snapshots=snapshots, token=cfg.metrics.snapshot_token,
                        max_connections=cfg.metrics.max_connections, request_timeout_s=cfg.metrics.request_timeout_s,
                        force_publish=persistence.force_publish)
    return Parts(cfg, device, teacher, learner, teacher_info, num_classes, checkpoints, snapshots, metrics, registry,
                 intake, accounting, persistence, labeller, trainer, health, server)


def _fallback(metrics: Metrics, what: str, where, why: str) -> None:
    log.error("%s %s is corrupt (%s); falling back to the previous one", what, where, why)
    metrics.checkpoint_fallbacks.inc()


def warm_up(parts: Parts) -> float:
    """Compile and initialise before the first record is read, so neither the first batch's latency nor the
    throughput figures include it (``train.compile``; on CUDA also the lazy start-up: cuBLAS/cuDNN handles,
    kernel selection, the allocator's first blocks). Returns seconds."""
    cfg, device = parts.cfg, parts.device
    if not (cfg.train.compile or device.type == "cuda"):
        return 0.0
    t = time.monotonic()
    h, w = cfg.teacher.input_size
    x = torch.zeros(cfg.train.batch_size, cfg.teacher.channels, h, w, dtype=torch.uint8, device=device)
    parts.teacher(x)
    parts.learner.warmup(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - t
    parts.metrics.warmup_seconds.set(seconds)
    log.info("warm-up (compile=%s) took %.1f s", cfg.train.compile, seconds)
    return seconds


def run(parts: Parts, stop: threading.Event, *, on_progress: Callable[[Progress], None] | None = None,
        stop_when: Callable[[Progress], bool] | None = None) -> Progress:
    """The daemon loop. Returns when ``stop`` is set (or ``stop_when`` says so), after a final checkpoint."""
    cfg, metrics, intake, health = parts.cfg, parts.metrics, parts.intake, parts.health
    accounting, persistence = parts.accounting, parts.persistence
    prog = accounting.prog
    persistence.resume(prog)  # 1. the newest checkpoint: model, optimizer, and where to read from
    persistence.commit, persistence.flush_dead_letters = intake.commit, intake.flush_dead_letters
    _start(parts, prog)  # 2. HTTP, warm-up (compile), then the consumers
    reporter = Reporter(metrics, accounting, intake.highwater, cfg.logging.progress_every_s)
    try:
        while not stop.is_set():
            health.beat()
            # 3. Next batch (decoded and collated while the previous one trained).
            t0 = time.perf_counter()
            batch = intake.next(timeout=0.2)
            metrics.batch_wait_seconds.observe(time.perf_counter() - t0)
            if batch is not None and batch.size:
                token = intake.begin_step(batch)  # a crash from here until its stats are read names this batch
                try:
                    # 4. The teacher labels the batch.
                    t1 = time.perf_counter()
                    labelled = label(parts, batch)
                    t2 = time.perf_counter()
                    # 5. Student: score first (prequential), then learn (with replay, EMA). Device stats.
                    stats = parts.trainer.step(labelled)
                    # The teacher labels about a batch per step whatever the budget: read that many records.
                    intake.batch_size = parts.labeller.budget.records_per_step(cfg.train.batch_size)
                except Exception:
                    intake.step_failed(token)
                    raise
                # Timings are launch times on CUDA (asynchronous); exact on CPU.
                metrics.teacher_seconds.observe(t2 - t1)
                metrics.step_seconds.observe(time.perf_counter() - t2)
                # 6. Totals and windows (on CUDA from the previous step: the GPU queue stays full).
                accounting.add(stats, token, held_out=parts.trainer.held_out)
                if prog.consecutive_skips >= cfg.train.max_consecutive_skips:
                    accounting.drain()
                    persistence.rollback(prog, f"{prog.consecutive_skips} consecutive non-finite updates")
            if batch is not None:
                prog.mid_record = batch.partial  # inside a big record: no checkpoint until its last image
                prog.offsets.update(batch.offsets)  # these records are now in the model (or dead-lettered)
                prog.records_done += batch.records
            prog.rejected = intake.rejected
            # 7. Metrics and progress, then the periodic checkpoint / snapshot.
            now = time.monotonic()
            reporter.tick(prog, now)
            if on_progress is not None:
                on_progress(prog)
            if persistence.due(prog, now):
                accounting.drain()
                persistence.save_due(prog, now)
            if stop_when is not None and stop_when(prog):
                accounting.drain()
                stop.set()
    finally:
        _stop(parts, prog)  # 8. stop reading, keep what was trained (checkpoint, snapshot, commit), exit
    return prog


def label(parts: Parts, batch: Batch) -> Labelled:
    """The labelling stage: the batch on the device, and the teacher's logits for it (within the budget)."""
    if batch.ready is not None:  # decoded on the GPU on a side stream: order after it
        torch.cuda.current_stream(parts.device).wait_event(batch.ready)
        batch.images.record_stream(torch.cuda.current_stream(parts.device))
    x = batch.images.to(parts.device, non_blocking=True)
    y = batch.labels.to(parts.device, non_blocking=True)
    return parts.labeller(x, y, batch)


def _start(parts: Parts, prog: Progress) -> None:
    """Serve HTTP (alive, not ready), compile and warm up, then start reading at the resume offsets."""
    parts.server.start()
    log.info("HTTP on http://%s:%d (/metrics /healthz /readyz /v1/snapshots/latest)", parts.cfg.metrics.host,
             parts.server.port)
    try:
        warm_up(parts)
    except BaseException:  # a model that cannot compile: nothing was read yet, close the edges and say why
        parts.intake.close()
        parts.server.stop()
        raise
    finally:
        parts.health.warmed_up()
    parts.intake.batch_size = parts.labeller.budget.records_per_step(parts.cfg.train.batch_size)
    parts.intake.start(prog.offsets)


def _stop(parts: Parts, prog: Progress) -> None:
    parts.intake.stop()
    try:
        parts.accounting.drain()
        parts.metrics.progress(prog.kd_loss, prog.agreement, prog.label_accuracy)
        parts.persistence.close(prog)
    finally:
        parts.intake.close()
        parts.server.stop()
        parts.health.stopped()
        log.info("stopped at step %d: %d samples in the lineage, offsets %s", prog.step, prog.samples_seen,
                 prog.offsets)


def manifest(cfg: Config, num_classes: int, teacher_info: dict, prog: Progress) -> dict:
    """The body of a snapshot manifest for the lineage at ``prog`` (the store adds version, time and files)."""
    c, h, w = cfg.student_channels, *cfg.student_input_size
    return {
        "step": prog.step,
        "samples_seen": prog.samples_seen,
        "student": {"model": cfg.student.model, "num_classes": num_classes, "input_shape": [1, c, h, w],
                    "channels": c, "input_size": [h, w], "mean": list(cfg.student_mean),
                    "std": list(cfg.student_std), "input_dtype": "float32",
                    "preprocess": "x = (uint8 / 255 - mean) / std, NCHW"},
        "teacher": dict(teacher_info),
        "offsets": {cfg.kafka.topic: {str(p): o for p, o in sorted(prog.offsets.items())}},
        "metrics": {"agreement": prog.agreement, "kd_loss": prog.kd_loss if prog.kd_loss == prog.kd_loss else None,
                    "label_accuracy": prog.label_accuracy},
        "config_sha256": cfg.sha256(),
    }
