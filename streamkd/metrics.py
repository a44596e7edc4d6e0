"""Every Prometheus metric of the daemon, in one typed holder built on an injected registry.

Domain code calls plain methods (``metrics.rejected("corrupt")``) and never
touches prometheus_client; tests build a fresh ``CollectorRegistry`` and read
``registry.get_sample_value(...)``. Names follow the contract: ``streamkd_``
prefix, base units, ``_total`` only on counters.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily

from streamkd import __version__

# Teacher forward / train step latencies span ~1 ms (tiny CPU models) to seconds (big GPU batches).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's metrics. One instance per daemon, bound to ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, device: str = "cpu"):
        self.registry = registry
        r = dict(registry=registry)
        self.messages_consumed = Counter("streamkd_messages_consumed", "Kafka records consumed.", **r)
        self.messages_rejected = Counter(
            "streamkd_messages_rejected", "Records rejected (dead-lettered) by reason.", ["reason"], **r)
        self.samples_trained = Counter("streamkd_samples_trained", "Images trained into the student.", **r)
        self.samples_skipped = Counter(
            "streamkd_samples_skipped", "Images dropped from a batch by reason (e.g. non-finite teacher logits).",
            ["reason"], **r)
        self.train_steps = Counter("streamkd_train_steps", "Optimizer steps taken.", **r)
        self.updates_skipped = Counter(
            "streamkd_updates_skipped", "Updates skipped by the non-finite guard, by reason.", ["reason"], **r)
        self.rollbacks = Counter("streamkd_rollbacks", "Rollbacks to the last good checkpoint.", **r)
        self.checkpoints_written = Counter("streamkd_checkpoints_written", "Durable checkpoints written.", **r)
        self.checkpoint_fallbacks = Counter(
            "streamkd_checkpoint_fallbacks", "Corrupt checkpoints or snapshots skipped on load.", **r)
        self.snapshots_published = Counter("streamkd_snapshots_published", "Snapshots published.", **r)
        self.kafka_errors = Counter("streamkd_kafka_errors", "Kafka client errors (retried).", ["op"], **r)
        self.checkpoint_write_failures = Counter(
            "streamkd_checkpoint_write_failures",
            "Background checkpoints (dead letters, write, offset commit) that failed.", **r)
        self.snapshot_write_failures = Counter(
            "streamkd_snapshot_write_failures",
            "Background snapshot publications that failed (the previous one stays).", **r)
        self.dlq_pending = Gauge(
            "streamkd_dlq_pending", "Dead letters not yet acknowledged (offsets covering them stay uncommitted).",
            **r)
        self.kd_loss = Gauge("streamkd_kd_loss", "KD loss (T^2-scaled), mean over the last log interval.", **r)
        self.agreement = Gauge(
            "streamkd_teacher_agreement_ratio",
            "Prequential student/teacher top-1 agreement over the recent window (student predicts before it learns).",
            **r)
        self.label_accuracy = Gauge(
            "streamkd_label_accuracy_ratio", "Prequential student accuracy on records that carry a label.", **r)
        self.consumer_lag = Gauge(
            "streamkd_consumer_lag_messages", "Records behind the fetch high watermark.", ["partition"], **r)
        self.last_snapshot_version = Gauge("streamkd_last_snapshot_version", "Newest published snapshot.", **r)
        self.last_snapshot_ts = Gauge(
            "streamkd_last_snapshot_timestamp_seconds", "Unix time of the newest snapshot.", **r)
        self.last_checkpoint_ts = Gauge(
            "streamkd_last_checkpoint_timestamp_seconds", "Unix time of the newest durable checkpoint.", **r)
        self.ready = Gauge("streamkd_ready", "1 once the teacher is loaded and the consumer is assigned.", **r)
        self.warmup_seconds = Gauge(
            "streamkd_warmup_seconds", "Start-up compilation and kernel selection, before the first record.", **r)
        self.queue_depth = Gauge("streamkd_prefetch_queue_batches", "Decoded batches waiting for the GPU.", **r)
        self.teacher_seconds = Histogram(
            "streamkd_teacher_inference_seconds", "Teacher forward time per batch.", buckets=_LATENCY_BUCKETS, **r)
        self.step_seconds = Histogram(
            "streamkd_train_step_seconds", "Student step time per batch (forward, backward, update).",
            buckets=_LATENCY_BUCKETS, **r)
        self.batch_wait_seconds = Histogram(
            "streamkd_batch_wait_seconds", "Time the loop waited for the next decoded batch.",
            buckets=_LATENCY_BUCKETS, **r)
        import torch

        Info("streamkd_build", "Build information.", **r).info(
            {"version": __version__, "torch": torch.__version__.split("+")[0], "device": device})
        # Pre-create the usual label values so dashboards show zeros rather than "no data".
        for reason in ("corrupt", "too_large", "too_many_pixels", "unknown_format", "bad_label"):
            self.messages_rejected.labels(reason)
        for reason in ("nonfinite_loss", "nonfinite_grad"):
            self.updates_skipped.labels(reason)
        self.samples_skipped.labels("nonfinite_teacher")
        for op in ("connect", "consumer", "metadata", "poll", "probe", "offset_reset", "commit", "dlq"):
            self.kafka_errors.labels(op)
        self._learning(r)

        # What a fresh registry lacks but the default one has: process RSS/CPU/file descriptors
        # (process_*), the interpreter (python_info) and garbage collections (python_gc_*). The default
        # registry has them already (registering them twice raises).
        if registry is not REGISTRY:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        if device.startswith("cuda"):
            registry.register(CudaMemoryCollector(device))

    def _learning(self, r: dict) -> None:
        """The teacher budget, replay, the publishing gate, drift."""
        self.teacher_calls = Counter("streamkd_teacher_calls", "Samples the teacher labelled.", **r)
        self.teacher_budget = Gauge(
            "streamkd_teacher_budget_ratio", "Share of samples sent to the teacher (teacher.budget, or the "
            "adaptive controller's current value).", **r)
        self.random_agreement_ratio = Gauge(
            "streamkd_random_agreement_ratio",
            "Student/teacher top-1 agreement on the last batch's random share (an unbiased estimate at any "
            "budget).", **r)
        self.replayed_samples = Counter("streamkd_replayed_samples", "Replayed samples trained on.", **r)
        self.replay_samples = Gauge("streamkd_replay_buffer_samples", "Samples in the replay buffer.", **r)
        self.replay_bytes = Gauge("streamkd_replay_buffer_bytes", "Bytes held by the replay buffer.", **r)
        self.gate_rejections = Counter(
            "streamkd_snapshot_gate_rejections",
            "Candidate snapshots not published because they scored worse than the published one on the "
            "holdout.", **r)
        self.drift_detected = Counter("streamkd_drift_detected", "Drifts detected in the stream.", **r)

    # -- plain verbs for the domain code ---------------------------------------------------
    def consumed(self, n: int = 1) -> None:
        self.messages_consumed.inc(n)

    def rejected(self, reason: str) -> None:
        self.messages_rejected.labels(reason).inc()

    def trained(self, samples: int, steps: int = 1) -> None:
        self.samples_trained.inc(samples)
        self.train_steps.inc(steps)

    def skipped_update(self, reason: str) -> None:
        self.updates_skipped.labels(reason).inc()

    def skipped_samples(self, reason: str, n: int) -> None:
        if n:
            self.samples_skipped.labels(reason).inc(n)

    def teacher_called(self, samples: int, budget: float) -> None:
        self.teacher_calls.inc(samples)
        self.teacher_budget.set(budget)

    def random_agreement(self, ratio: float) -> None:
        self.random_agreement_ratio.set(ratio)

    def replayed(self, samples: int) -> None:
        self.replayed_samples.inc(samples)

    def replay_buffer(self, samples: int, nbytes: int) -> None:
        self.replay_samples.set(samples)
        self.replay_bytes.set(nbytes)

    def dead_letters_pending(self, n: int) -> None:
        self.dlq_pending.set(n)

    def lag(self, partition: int, messages: int) -> None:
        self.consumer_lag.labels(str(partition)).set(max(0, messages))

    def snapshot_published(self, version: int, when: float | None = None) -> None:
        self.snapshots_published.inc()
        self.last_snapshot_version.set(version)
        self.last_snapshot_ts.set(time.time() if when is None else when)

    def watch_write(self, future: Future, what: str) -> Future:
        """Count ``future`` (a background ``"checkpoint"`` or ``"snapshot"`` write) as failed if it raises."""
        counter = {"checkpoint": self.checkpoint_write_failures, "snapshot": self.snapshot_write_failures}[what]

        def done(f: Future) -> None:
            if not f.cancelled() and f.exception() is not None:
                counter.inc()

        future.add_done_callback(done)
        return future

    def checkpoint_restored(self, when: float) -> None:
        """At start, from the checkpoint resumed from: its age is shown from the first scrape (not the epoch)."""
        self.last_checkpoint_ts.set(when)

    def checkpoint_written(self, when: float | None = None) -> None:
        self.checkpoints_written.inc()
        self.last_checkpoint_ts.set(time.time() if when is None else when)

    def progress(self, kd_loss: float, agreement: float | None, label_accuracy: float | None) -> None:
        self.kd_loss.set(kd_loss)
        if agreement is not None:
            self.agreement.set(agreement)
        if label_accuracy is not None:
            self.label_accuracy.set(label_accuracy)


class CudaMemoryCollector:
    """``streamkd_gpu_memory_{allocated,reserved}_bytes``: the CUDA caching allocator of the daemon's device,
    read at scrape time (no host/device sync)."""

    def __init__(self, device: str):
        self.device = device

    def collect(self):
        import torch

        allocated = GaugeMetricFamily(
            "streamkd_gpu_memory_allocated_bytes", "GPU memory held by live tensors.", labels=["device"])
        reserved = GaugeMetricFamily(
            "streamkd_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.", labels=["device"])
        allocated.add_metric([self.device], torch.cuda.memory_allocated(self.device))
        reserved.add_metric([self.device], torch.cuda.memory_reserved(self.device))
        return [allocated, reserved]

    def describe(self):
        return []
