"""Step accounting: turn each step's device stats into lineage totals, windows and metrics.

The learner returns a small stats tensor per step (layout ``learner.STATS``)
and never syncs. On CUDA the loop reads it one step later (the copy to the
host overlaps the next step), so the GPU queue stays full; on the CPU it is
read at once. :class:`StepAccounting` hides that difference: the loop calls
:meth:`~StepAccounting.add` after every step and :meth:`~StepAccounting.drain`
before anything that needs exact totals (a checkpoint, a snapshot, a rollback).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streamkd.learn.learner import S
from streamkd.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Host-side running totals of the lineage (what checkpoints and manifests report)."""

    step: int = 0  # optimizer steps taken (skipped updates do not count)
    samples_seen: int = 0  # samples of this lineage: trained into the student, or held out to score snapshots
    records_done: int = 0  # records consumed this run, rejected ones included
    rejected: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset (lineage)
    kd_loss: float = float("nan")
    agreement: float | None = None
    label_accuracy: float | None = None
    mid_record: bool = False  # the last batch ended inside a record: its offsets do not cover the images trained
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


class StepAccounting:
    """Folds finished steps into :class:`Progress` and the metrics; owns the agreement windows and the loss mean.

    ``on_done`` is called with each step's token once its stats are on the host (the training-crash
    journal clears the step's offsets then: an asynchronous CUDA error surfaces at that read at the latest).
    """

    def __init__(self, prog: Progress, metrics: Metrics, window: int, device: torch.device,
                 on_done: Callable[[object], None] | None = None):
        self.prog, self.metrics, self.device = prog, metrics, device
        self.agree = Window(window)
        self.labelled = Window(window)
        self.loss_sum = self.loss_n = 0.0
        self.on_done = on_done
        self._lagged: tuple[torch.Tensor, torch.cuda.Event, object] | None = None

    def add(self, stats: torch.Tensor | None, token: object = None, held_out: int = 0) -> None:
        """Account one step; on CUDA the previous step's stats are read now and this one's later.
        ``stats`` None: nothing was trained (every sample went to the holdout or past the teacher budget).
        ``held_out``: samples of the batch that went to the holdout (in the lineage, never trained on)."""
        self.prog.samples_seen += held_out
        if stats is None:
            if self.on_done is not None:
                self.on_done(token)
            return
        if self.device.type != "cuda":
            self._absorb(stats, token)
            return
        host = stats.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.drain()
        self._lagged = (host, event, token)

    def drain(self) -> None:
        """Read the step still in flight, if any (a host sync on CUDA)."""
        if self._lagged is not None:
            host, event, token = self._lagged
            self._lagged = None
            event.synchronize()
            self._absorb(host, token)

    def _absorb(self, stats: torch.Tensor, token: object) -> None:
        v = stats.tolist()
        prog, metrics = self.prog, self.metrics
        metrics.skipped_samples("nonfinite_teacher", int(v[S["n"]] - v[S["n_finite"]]))
        self.agree.add(v[S["agree"]], v[S["n_finite"]])
        self.labelled.add(v[S["correct"]], v[S["labelled"]])
        if v[S["skipped"]] > 0:
            prog.consecutive_skips += 1
            prog.skipped_updates += 1
            loss = v[S["loss"]]
            metrics.skipped_update("nonfinite_loss" if loss != loss or abs(loss) == float("inf") else "nonfinite_grad")
        else:
            prog.consecutive_skips = 0
            prog.step += 1
            prog.samples_seen += int(v[S["n_finite"]])
            metrics.trained(int(v[S["n_finite"]]))
            self.loss_sum += v[S["kd"]]
            self.loss_n += 1
        prog.agreement, prog.label_accuracy = self.agree.ratio, self.labelled.ratio
        if self.loss_n:
            prog.kd_loss = self.loss_sum / self.loss_n  # mean since the last progress line
        if self.on_done is not None:
            self.on_done(token)

    def reset_loss_mean(self) -> None:
        """Start a new interval for the loss mean (after each progress line)."""
        self.loss_sum = self.loss_n = 0.0


class Reporter:
    """Gauges every second (so a 5 s scrape never reads stale values) and a progress line every N seconds."""

    def __init__(self, metrics: Metrics, accounting: StepAccounting, highwater: Callable[[], dict[int, int]],
                 every_s: float):
        self.metrics, self.accounting, self.highwater, self.every_s = metrics, accounting, highwater, every_s
        self.gauges_t = self.log_t = time.monotonic()
        self.log_samples = accounting.prog.samples_seen

    def tick(self, prog: Progress, now: float) -> None:
        if now - self.gauges_t >= 1.0:
            self.gauges_t = now
            self.update_lag(prog)
            self.metrics.progress(prog.kd_loss, prog.agreement, prog.label_accuracy)
        if now - self.log_t >= self.every_s:
            self.log(prog, (prog.samples_seen - self.log_samples) / (now - self.log_t))
            self.accounting.reset_loss_mean()
            self.log_t, self.log_samples = now, prog.samples_seen

    def update_lag(self, prog: Progress) -> dict[int, int]:
        """Records behind the fetch high watermark, per partition, counted from what is *trained*."""
        hw = self.highwater()
        lag = {p: max(0, hw[p] - prog.offsets.get(p, hw[p])) for p in hw}
        for p, v in lag.items():
            self.metrics.lag(p, v)
        return lag

    def log(self, prog: Progress, rate: float) -> None:
        lag = self.update_lag(prog)
        agree = f"{prog.agreement:.3f}" if prog.agreement is not None else "-"
        log.info("step %d  samples %d  %.0f img/s  agreement %s  kd_loss %.4f  lag %d  rejected %d",
                 prog.step, prog.samples_seen, rate, agree, prog.kd_loss, sum(lag.values()), prog.rejected,
                 extra={"fields": {"step": prog.step, "samples": prog.samples_seen, "images_per_s": round(rate, 1),
                                   "agreement": prog.agreement, "kd_loss": prog.kd_loss, "lag": lag,
                                   "rejected": prog.rejected}})
