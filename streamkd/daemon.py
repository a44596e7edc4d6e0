"""The daemon: Kafka -> decode -> teacher -> prequential score -> student step -> checkpoints and snapshots.

:func:`run` is the whole loop and reads top to bottom. Its pieces are built
by :func:`build` (models, stores, metrics) and passed in.

Delivery semantics (README "Delivery semantics"): records are *delivered*
at least once (after a crash, everything after the newest checkpoint is read
again) but *trained into the surviving model lineage* exactly once, because a
checkpoint holds the model together with the offsets it covers, offsets are
committed only after that checkpoint is durable, and a restart seeks to the
checkpoint's offsets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from prometheus_client import CollectorRegistry

from .batcher import Batch, Batcher
from .checkpoint import CheckpointStore, TrainState, is_finite_state
from .config import Config
from .decode import Limits, Rejected
from .learner import S, InputSpec, Learner, Teacher, precision_name, resolve_device, resolve_precision
from .metrics import Metrics
from .quarantine import DecodeJournal
from .models import TEACHER_SPEC, build_model, file_sha256, num_classes_of, shipped_teacher_weights
from .server import HttpServer
from .export import snapshot_extras
from .snapshot import NonFiniteWeights, SnapshotStore
from .dlq import DeadLetters
from .source import KafkaSource, RawRecord, RecordQueue

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Host-side running totals of the lineage (what checkpoints and manifests report)."""

    step: int = 0  # optimizer steps taken (skipped updates do not count)
    samples_seen: int = 0  # samples trained into this lineage
    records_done: int = 0  # records consumed this run, rejected ones included
    rejected: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset (lineage)
    kd_loss: float = float("nan")
    agreement: float | None = None
    label_accuracy: float | None = None
    consecutive_skips: int = 0
    skipped_updates: int = 0
    started: float = field(default_factory=time.monotonic)


class Window:
    """Sums over the most recent ``size`` samples (prequential agreement / accuracy)."""

    def __init__(self, size: int):
        self.size = size
        self.items: deque[tuple[float, float]] = deque()
        self.hits = self.total = 0.0

    def add(self, hits: float, total: float) -> None:
        if total <= 0:
            return
        self.items.append((hits, total))
        self.hits += hits
        self.total += total
        while self.items and self.total - self.items[0][1] >= self.size:
            h, t = self.items.popleft()
            self.hits -= h
            self.total -= t

    @property
    def ratio(self) -> float | None:
        return self.hits / self.total if self.total else None


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


def build(cfg: Config, registry: CollectorRegistry | None = None) -> Parts:
    """Load the teacher and student, open the stores. Raises on anything that should stop the start."""
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
    return Parts(cfg, device, teacher, learner, teacher_info, num_classes, checkpoints, snapshots, metrics, registry)


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
    cfg, metrics, learner, teacher = parts.cfg, parts.metrics, parts.learner, parts.teacher
    topic = cfg.kafka.topic
    prog = Progress()

    # 1. Resume: the newest valid checkpoint gives the model, the optimizer and where to read from.
    state = parts.checkpoints.load_latest()
    if state is not None:
        learner.load_state(state.student, state.optimizer)
        prog.step, prog.samples_seen = state.step, state.samples_seen
        prog.offsets = dict(state.offsets.get(topic, {}))
        log.info("resumed from checkpoint step %d (%d samples); offsets %s", prog.step, prog.samples_seen,
                 prog.offsets)
    initial = None if state is not None else learner.state()  # rollback target before any checkpoint

    # 2. The edges: consumer threads -> record queue -> decode pool -> batch queue; DLQ; HTTP.
    records = RecordQueue(cfg.kafka.queue_records, max_bytes=max(256 << 20, 4 * cfg.input.max_bytes))
    batches: queue.Queue[Batch] = queue.Queue(maxsize=cfg.train.prefetch_batches)
    intake_stop = threading.Event()  # stops consuming; the loop itself stops on `stop`
    source = KafkaSource(cfg.kafka, records, prog.offsets, intake_stop, on_consumed=metrics.consumed,
                         on_error=lambda op: metrics.kafka_errors.labels(op).inc())
    # Values are cut to stay under the producer's (and Kafka's default broker) 1 MiB request limit,
    # with room left for key, headers and batch overhead.
    dlq = DeadLetters(cfg.kafka, max_value_bytes=min(cfg.input.max_bytes, 1_000_000))
    rejected_count = [0]

    def on_reject(rec: RawRecord, why: Rejected) -> None:
        rejected_count[0] += 1
        metrics.rejected(why.reason)
        (log.error if why.reason == "decoder_crash" else log.debug)(
            "rejected %s/%d/%d: %s (%s)", rec.topic, rec.partition, rec.offset, why.reason, why.detail)
        try:
            dlq.send(rec, why.reason)  # kept until acknowledged; the next checkpoint waits for it
        except Exception as e:  # noqa: BLE001 - the DLQ being down must not stop training
            metrics.kafka_errors.labels("dlq").inc()
            log.warning("dead-letter send failed for %s/%d/%d: %s", rec.topic, rec.partition, rec.offset, e)

    limits = Limits(cfg.input.max_bytes, cfg.input.max_pixels, cfg.input.max_images)
    # A record whose decoding kills the process is found and dead-lettered after a few
    # restarts, instead of crash-looping (quarantine.py). It lives beside the checkpoints.
    journal = DecodeJournal(cfg.checkpoint.dir, prog.offsets)
    batcher = Batcher(records, batches, batch_size=cfg.train.batch_size, max_wait_s=cfg.input.max_wait_ms / 1000,
                      limits=limits, size=cfg.teacher.input_size, channels=cfg.teacher.channels,
                      workers=cfg.input.decode_workers, stop=intake_stop, on_reject=on_reject,
                      pin_memory=parts.device.type == "cuda", gpu=_gpu_decoder(cfg, parts.device), journal=journal)
    heartbeat = [time.monotonic()]
    warming = threading.Event()  # alive while compiling, however long that takes; not ready until it is done
    warming.set()
    server = HttpServer(cfg.metrics.host, cfg.metrics.port, parts.registry,
                        healthy=lambda: warming.is_set() or time.monotonic() - heartbeat[0] < 120,
                        ready=lambda: source.ready and not warming.is_set(), snapshots=parts.snapshots,
                        token=cfg.metrics.snapshot_token)
    server.start()
    log.info("HTTP on http://%s:%d (/metrics /healthz /readyz /v1/snapshots/latest)", cfg.metrics.host, server.port)
    try:
        warm_up(parts)
    except BaseException:  # a model that cannot compile: nothing was read yet, close the edges and say why
        dlq.close()
        server.stop()
        raise
    finally:
        heartbeat[0] = time.monotonic()
        warming.clear()
    source.start()
    batcher.start()

    # Writes happen on one background thread, so the loop never waits for the disk.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    pending_ckpt: Future | None = None
    pending_snap: Future | None = None
    agree_w, label_w = Window(cfg.train.agreement_window), Window(cfg.train.agreement_window)
    loss_sum = loss_n = 0.0
    lagged: tuple[torch.Tensor, torch.cuda.Event] | None = None  # CUDA: last step's stats, in flight to the host
    last_ckpt_step, last_ckpt_t = prog.step, time.monotonic()
    last_snap_step, last_snap_t = prog.step, time.monotonic()
    last_log_t, last_log_samples = time.monotonic(), prog.samples_seen
    gauges_t = time.monotonic()
    latest = parts.snapshots.latest()
    if latest:  # restore the gauges (not the counter: nothing was published by this process yet)
        metrics.last_snapshot_version.set(latest["version"])
        metrics.last_snapshot_ts.set(_rfc3339_to_unix(latest.get("created_at")))

    def absorb(stats: torch.Tensor) -> None:
        """Fold one finished step's stats (host) into the lineage totals."""
        nonlocal loss_sum, loss_n
        v = stats.tolist()
        skipped = v[S["skipped"]] > 0
        metrics.skipped_samples("nonfinite_teacher", int(v[S["n"]] - v[S["n_finite"]]))
        agree_w.add(v[S["agree"]], v[S["n_finite"]])
        label_w.add(v[S["correct"]], v[S["labelled"]])
        if skipped:
            prog.consecutive_skips += 1
            prog.skipped_updates += 1
            reason = "nonfinite_loss" if v[S["loss"]] != v[S["loss"]] or abs(v[S["loss"]]) == float("inf") \
                else "nonfinite_grad"
            metrics.skipped_update(reason)
        else:
            prog.consecutive_skips = 0
            prog.step += 1
            prog.samples_seen += int(v[S["n_finite"]])
            metrics.trained(int(v[S["n_finite"]]))
            loss_sum += v[S["kd"]]
            loss_n += 1

    def drain_lagged() -> None:
        nonlocal lagged
        if lagged is not None:
            stats, event = lagged
            event.synchronize()
            absorb(stats)
            lagged = None

    def lineage_state() -> TrainState:
        weights, opt = learner.state()
        return TrainState(step=prog.step, samples_seen=prog.samples_seen, offsets={topic: dict(prog.offsets)},
                          student=weights, optimizer=opt,
                          extra={"config_sha256": cfg.sha256(), "teacher_sha256": parts.teacher_info["sha256"]})

    def write_checkpoint(st: TrainState) -> None:
        # Dead letters first: the offsets we are about to commit cover the records they replace.
        dlq.flush()
        parts.checkpoints.save(st)
        metrics.checkpoint_written()
        source.commit(st.offsets.get(topic, {}))  # never ahead of the durable checkpoint

    def checkpoint(sync: bool) -> None:
        nonlocal pending_ckpt, last_ckpt_step, last_ckpt_t
        if pending_ckpt is not None:
            _result(pending_ckpt, "checkpoint")
        st = lineage_state()
        last_ckpt_step, last_ckpt_t = prog.step, time.monotonic()
        if not is_finite_state(st.student):
            # The step guard checks grads and loss, not what the update did to the weights
            # (or to buffers such as BatchNorm statistics, updated in forward). A non-finite
            # checkpoint would be the rollback target: never write one; roll back instead.
            rollback(f"student weights are not finite at step {prog.step}")
            return
        pending_ckpt = writer.submit(write_checkpoint, st)
        if sync:
            _result(pending_ckpt, "checkpoint")
            pending_ckpt = None

    def publish(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        try:
            extras = snapshot_extras(manifest["student"], cfg.snapshot)  # exports run in a child process
            m = parts.snapshots.publish(weights, manifest, write_extras=extras)
        except NonFiniteWeights as e:
            log.error("snapshot refused: %s (the previous snapshot stays the newest)", e)
            return
        metrics.snapshot_published(m["version"])
        log.info("published snapshot %d (step %d, %d samples)", m["version"], manifest["step"],
                 manifest["samples_seen"])

    def snapshot(sync: bool) -> None:
        nonlocal pending_snap, last_snap_step, last_snap_t
        if pending_snap is not None:
            _result(pending_snap, "snapshot")
        weights = learner.weights()  # the optimizer state stays on the device: a snapshot does not keep it
        manifest = _manifest(cfg, parts, prog)
        last_snap_step, last_snap_t = prog.step, time.monotonic()
        pending_snap = writer.submit(publish, weights, manifest)
        if sync:
            _result(pending_snap, "snapshot")
            pending_snap = None

    def rollback(why: str) -> None:
        """The weights went bad (K consecutive skipped updates, or non-finite). Return to the last good checkpoint."""
        nonlocal lagged, pending_ckpt, last_ckpt_step, last_snap_step
        lagged = None
        if pending_ckpt is not None:  # roll back to the newest checkpoint, not the one before it
            _result(pending_ckpt, "checkpoint")
            pending_ckpt = None
        st = parts.checkpoints.load_latest()
        dropped_from = st.offsets.get(topic, {}) if st else {}
        if st is not None:
            learner.load_state(st.student, st.optimizer)
            prog.step, prog.samples_seen = st.step, st.samples_seen
        elif initial is not None:
            learner.load_state(*initial)
            prog.step = prog.samples_seen = 0
        metrics.rollbacks.inc()
        log.error("%s: rolled back to checkpoint step %d; records in offsets %s .. %s are not in the model",
                  why, prog.step, dropped_from, prog.offsets)
        prog.consecutive_skips = 0
        # Count the next intervals from the restored step, or they would wait for the old one.
        last_ckpt_step, last_snap_step = min(last_ckpt_step, prog.step), min(last_snap_step, prog.step)

    metrics.ready.set(0)
    was_ready = False
    try:
        while not stop.is_set():
            heartbeat[0] = time.monotonic()
            if not was_ready and source.ready:
                was_ready = True
                metrics.ready.set(1)
            elif was_ready and not source.ready:
                was_ready = False
                metrics.ready.set(0)
            if batcher.error is not None:
                raise RuntimeError("decode stage failed") from batcher.error

            # 3. Next batch (decoded and collated while the previous one trained).
            t0 = time.perf_counter()
            try:
                batch = batches.get(timeout=0.2)
            except queue.Empty:
                batch = None
            metrics.batch_wait_seconds.observe(time.perf_counter() - t0)
            metrics.queue_depth.set(batches.qsize())

            if batch is not None and batch.size:
                if batch.ready is not None:  # decoded on the GPU on a side stream: order after it
                    torch.cuda.current_stream(parts.device).wait_event(batch.ready)
                    batch.images.record_stream(torch.cuda.current_stream(parts.device))
                x = batch.images.to(parts.device, non_blocking=True)
                y = batch.labels.to(parts.device, non_blocking=True)
                # 4. Teacher labels the batch.
                t1 = time.perf_counter()
                t_logits = teacher(x)
                t2 = time.perf_counter()
                # 5. Student: score first (prequential), then learn. Returns device stats, no sync.
                stats = learner.step(x, t_logits, y)
                t3 = time.perf_counter()
                # Timings are launch times on CUDA (asynchronous); exact on CPU.
                metrics.teacher_seconds.observe(t2 - t1)
                metrics.step_seconds.observe(t3 - t2)
                # 6. Read the previous step's stats (one step behind keeps the GPU queue full).
                drain_lagged()
                if parts.device.type == "cuda":
                    host = stats.to("cpu", non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                    lagged = (host, ev)
                else:
                    absorb(stats)
                if prog.consecutive_skips >= cfg.train.max_consecutive_skips:
                    drain_lagged()
                    rollback(f"{prog.consecutive_skips} consecutive non-finite updates")
            if batch is not None:
                prog.offsets.update(batch.offsets)  # these records are now in the model (or dead-lettered)
                prog.records_done += batch.records
            prog.rejected = rejected_count[0]

            # 7. Progress, metrics, and the periodic checkpoint / snapshot.
            now = time.monotonic()
            prog.agreement, prog.label_accuracy = agree_w.ratio, label_w.ratio
            if loss_n:
                prog.kd_loss = loss_sum / loss_n  # mean since the last progress line
            if now - gauges_t >= 1.0:  # gauges every second, so a 5 s scrape never reads stale values
                gauges_t = now
                _update_lag(prog, source, metrics)
                metrics.progress(prog.kd_loss, prog.agreement, prog.label_accuracy)
            if now - last_log_t >= cfg.logging.progress_every_s:
                _log_progress(prog, source, metrics, (prog.samples_seen - last_log_samples) / (now - last_log_t))
                loss_sum = loss_n = 0.0
                last_log_t, last_log_samples = now, prog.samples_seen
            if on_progress is not None:
                on_progress(prog)
            if (prog.step - last_ckpt_step >= cfg.checkpoint.every_steps
                    or (now - last_ckpt_t >= cfg.checkpoint.every_seconds and prog.offsets)):
                drain_lagged()
                checkpoint(sync=False)
            if prog.step - last_snap_step >= cfg.snapshot.every_steps or (
                    now - last_snap_t >= cfg.snapshot.every_seconds and prog.step > last_snap_step):
                drain_lagged()
                snapshot(sync=False)
            if stop_when is not None and stop_when(prog):
                drain_lagged()
                stop.set()
    finally:
        # 8. Shutdown: stop reading, keep what was trained (checkpoint, snapshot, commit), then exit.
        intake_stop.set()
        stop.set()
        try:
            drain_lagged()
            metrics.progress(prog.kd_loss, prog.agreement, prog.label_accuracy)
            if prog.offsets:
                checkpoint(sync=True)
            if prog.step > last_snap_step or not parts.snapshots.versions():
                if prog.step > 0:
                    snapshot(sync=True)
            if pending_snap is not None:
                _result(pending_snap, "snapshot")
        finally:
            writer.shutdown(wait=True)
            parts.snapshots.close()
            source.join(timeout=2.0)
            source.close()
            dlq.close()
            server.stop()
            metrics.ready.set(0)
        log.info("stopped at step %d: %d samples in the lineage, offsets %s", prog.step, prog.samples_seen,
                 prog.offsets)
    return prog


def _rfc3339_to_unix(value: str | None) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _gpu_decoder(cfg: Config, device: torch.device):
    """nvJPEG batch decoder on CUDA hosts (``input.gpu_decode``), else None (CPU decode pool only)."""
    if device.type != "cuda" or not cfg.input.gpu_decode:
        return None
    from .gpu_decode import GpuJpegDecoder

    return GpuJpegDecoder(device, cfg.teacher.input_size, cfg.teacher.channels)


def _result(fut: Future, what: str) -> None:
    """Wait for a background write; a failed write is logged (the previous state stays intact)."""
    try:
        fut.result()
    except Exception:  # noqa: BLE001 - disk full, permissions: keep training, retry at the next interval
        log.exception("%s write failed; the previous one stays the newest", what)


def _update_lag(prog: Progress, source: KafkaSource, metrics: Metrics) -> dict[int, int]:
    """Records behind the fetch high watermark, per partition, counted from what is *trained*."""
    hw = source.highwater()
    lag = {p: max(0, hw[p] - prog.offsets.get(p, hw[p])) for p in hw}
    for p, v in lag.items():
        metrics.lag(p, v)
    return lag


def _log_progress(prog: Progress, source: KafkaSource, metrics: Metrics, rate: float) -> None:
    lag = _update_lag(prog, source, metrics)
    agree = f"{prog.agreement:.3f}" if prog.agreement is not None else "-"
    log.info("step %d  samples %d  %.0f img/s  agreement %s  kd_loss %.4f  lag %d  rejected %d",
             prog.step, prog.samples_seen, rate, agree, prog.kd_loss, sum(lag.values()), prog.rejected,
             extra={"fields": {"step": prog.step, "samples": prog.samples_seen, "images_per_s": round(rate, 1),
                               "agreement": prog.agreement, "kd_loss": prog.kd_loss, "lag": lag,
                               "rejected": prog.rejected}})


def _manifest(cfg: Config, parts: Parts, prog: Progress) -> dict:
    c, h, w = cfg.student_channels, *cfg.student_input_size
    return {
        "step": prog.step,
        "samples_seen": prog.samples_seen,
        "student": {"model": cfg.student.model, "num_classes": parts.num_classes, "input_shape": [1, c, h, w],
                    "channels": c, "input_size": [h, w], "mean": list(cfg.student_mean),
                    "std": list(cfg.student_std), "input_dtype": "float32",
                    "preprocess": "x = (uint8 / 255 - mean) / std, NCHW"},
        "teacher": dict(parts.teacher_info),
        "offsets": {cfg.kafka.topic: {str(p): o for p, o in sorted(prog.offsets.items())}},
        "metrics": {"agreement": prog.agreement, "kd_loss": prog.kd_loss if prog.kd_loss == prog.kd_loss else None,
                    "label_accuracy": prog.label_accuracy},
        "config_sha256": cfg.sha256(),
    }

