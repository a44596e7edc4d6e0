"""Scenario benchmark: the real daemon on streams whose content changes, against the plain loop.

Streams built from Fashion-MNIST (unlabelled PNG records, one partition so the order is exact) go
through an embedded broker into the real daemon (``daemon.build`` + ``daemon.run``, in-process). The
*served* student is scored: each published snapshot is loaded from the snapshot directory and evaluated
on the Fashion-MNIST test split, beside the teacher on the same split.

Scenarios (``--scenario``):

* ``stationary``: the 60k training images, one pass, shuffled with the seed. The plain loop runs in the
  same invocation; with ``--budget`` the same configuration at budget 1.0 runs as well. ``--budget``
  takes a comma-separated list (``--budget=0.5,0.25,adaptive``): the plain and the full-budget runs, then
  one run and one JSON line per budget. The plain and the full-budget configuration run twice each, in the
  order plain, configured, configured, plain; ``plain_img_s`` and the full budget's ``img_s`` are the means
  of their two runs (``plain_img_s_runs``, ``img_s_runs``), so a drift of the machine's speed that is
  linear over the four runs cancels from ``throughput_ratio``. Accuracies are the first runs'.
* ``class-incremental``: 5 phases of 2 classes (0-1, 2-3, ...), each phase shuffled. A snapshot is taken at
  every phase end. ``mean_forgetting``: over phases 1..4, the best accuracy on that phase's classes at its
  own or any later phase end (before the last), minus the accuracy on them at the end. The same images in
  one shuffled order (an i.i.d. stream of the same length) run as the reference, for the keys below.
  ``forgetting_floor_iid``: ``mean_forgetting`` of a learner that forgets nothing, the i.i.d. run's final
  snapshot, scored at each phase end on the label space seen by then (its logits of the classes not yet
  streamed are masked): the part of the metric that comes from a 10-way task being harder than a 2-, 4-,
  6- or 8-way one. ``forgetting_floor_teacher``: the same for the teacher (the metric's value for a model
  that never forgets and is as accurate as the teacher). ``forgetting_vs_iid``: over phases 1..4, the
  i.i.d. run's final accuracy on that phase's classes minus the class-incremental run's: the part that
  comes from the order.
* ``shift``: 30k clean, 30k corrupted, 10k clean. The corruption is a camera that moved: every image
  translated by SHIFT_PX pixels right and down, the uncovered border black. It is a real change for the
  student and not for the teacher: a student trained on clean images scores near chance on the translated
  test set, while the shipped teacher (trained with small translations) stays within about a point of its
  clean accuracy; training on the corrupted phase brings the student back. (Lower contrast plus mild noise
  was used before; a clean-trained student already scored on it what the teacher's labels could teach, so
  there was nothing to recover and the detector could not make a difference.) Accuracy on the clean and the
  corrupted (translated) test sets after each phase. ``detection_delay``: records after the change until
  ``streamkd_drift_detected_total`` moves. The same run without the detector runs as the reference.
  A run's plateau is the mean corrupted-test accuracy of its published snapshots over the last quarter of
  the corrupted phase; ``post_shift_plateau`` is the lower of the two runs' plateaus, the level both runs
  reach. ``recovery_samples`` / ``recovery_samples_without_detector``: records after the change until a
  published snapshot's corrupted-test accuracy is within 1 point of ``post_shift_plateau``, with and
  without the detector; ``recovery_speedup``: their ratio. ``recovery_samples_own_plateau`` (and
  ``..._without_detector``): the same against each run's own plateau. That measure moves with how much
  a run has learnt by the end of the phase: a run that keeps improving has a higher plateau to come
  within a point of, and reads as recovering later.
* ``stationary-drift-check``: drift detections over the stationary stream (all of them false alarms).
* ``poisoned-teacher``: for 2k records mid-stream the teacher's logits are replaced by random ones that look
  as confident as real ones (each row's own logits with its classes randomly permuted). A snapshot every 512
  records. ``regressed_published``: published snapshots whose clean-test accuracy is more than 1 point below
  the previous published one's (``regressed_at``: their stream positions); run with the gate and without it.
  ``gate_throughput_cost``: the share of the gated run's loop time spent in the gate's own work (holdout
  offers, scoring the candidate and the published weights on the holdout), timed inside the run;
  ``gate_wall_cost``: 1 - gated / ungated images/s of the two runs (noisier: separate runs differ by a few
  percent on a shared CPU). Every line also has ``gate_time_share``: the same share as
  ``gate_throughput_cost`` for the line's own run at its own snapshot cadence (the daemon's default outside
  shift and poisoned-teacher); null with the gate off.

"plain" is the same daemon with replay, EMA, gate, drift handling off and the full teacher budget.
``--set key=value`` overrides apply to every run (the plain one gets its own settings on top).
Daemon metrics that are not exported yield ``null``, never zero. ``--smoke`` shrinks every size (a check
of the script itself; its numbers mean little). ``--intake memory`` feeds the same streams to the same loop
from memory, without the broker and the decoders: the learning figures are the same kind, the throughput
is not end to end (a quick way to try learning settings). The last line of output is one JSON object.

Usage: python bench/scenarios.py --scenario=NAME [--budget=F|adaptive[,...]] [--seed S] [--smoke]
       [--intake kafka|memory] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SCENARIOS = ("stationary", "class-incremental", "shift", "stationary-drift-check", "poisoned-teacher")
PLAIN = ("replay.enabled=false", "ema.enabled=false", "gate.enabled=false", "drift.enabled=false",
         "teacher.budget=1.0")
# Sizes in records. snapshot_every: records between snapshots where a scenario follows the served student
# over time (shift, poisoned-teacher; elsewhere the daemon's own cadence); test: test images scored (None: all).
FULL = dict(stationary=60_000, phase=12_000, shift=(30_000, 30_000, 10_000), poisoned=20_000, poison=2_000,
            snapshot_every=512, test=None)
SMOKE = dict(stationary=3_000, phase=600, shift=(1_200, 1_200, 600), poisoned=3_000, poison=320,
             snapshot_every=160, test=1_000)
SHIFT_PX = 4  # the corruption: images translated this many pixels right and down (black fill)
PHASE_CLASSES = tuple((2 * k, 2 * k + 1) for k in range(5))  # class-incremental: the classes of each phase
CI_BUFFER = 2_000  # class-incremental: the replay buffer is held to this many samples (unless --set says otherwise)
END_METRICS = ("streamkd_drift_detected_total", "streamkd_teacher_calls_total", "streamkd_teacher_budget_ratio",
               "streamkd_snapshot_gate_rejections_total", "streamkd_replay_buffer_samples")
REGRESSION = 0.01  # a published snapshot this much below the previous one on the clean test set regressed
RECOVERED = 0.01  # within this of the post-shift plateau


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- streams -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stream:
    """Images in stream order and where each phase ends (record counts, the last one is the length)."""

    images: torch.Tensor  # uint8 N×1×28×28
    phase_ends: list[int]


def corrupt(images: torch.Tensor) -> torch.Tensor:
    """Translated SHIFT_PX pixels right and down, the uncovered border black: uint8 N×C×H×W -> same shape."""
    h, w = images.shape[-2:]
    return torch.nn.functional.pad(images, (SHIFT_PX, 0, SHIFT_PX, 0))[..., :h, :w].contiguous()


def stationary_stream(train_x: torch.Tensor, n: int, rng: np.random.Generator) -> Stream:
    order = rng.permutation(len(train_x))[:n]
    return Stream(train_x[torch.from_numpy(order)], [n])


def class_incremental_stream(train_x: torch.Tensor, train_y: torch.Tensor, per_phase: int,
                             rng: np.random.Generator) -> Stream:
    """Phase k holds classes 2k and 2k+1 only (``per_phase`` records of them, shuffled)."""
    parts = []
    for classes in PHASE_CLASSES:
        idx = torch.nonzero(torch.isin(train_y, torch.tensor(classes))).flatten().numpy()
        parts.append(train_x[torch.from_numpy(rng.permutation(idx)[:per_phase])])
    ends = list(np.cumsum([len(p) for p in parts]))
    return Stream(torch.cat(parts), [int(e) for e in ends])


def shift_stream(train_x: torch.Tensor, sizes: tuple[int, int, int], rng: np.random.Generator) -> Stream:
    """Clean, then corrupted (other images), then clean again (a fresh draw)."""
    clean, corrupted, back = sizes
    order = rng.permutation(len(train_x))
    first = train_x[torch.from_numpy(order[:clean])]
    second = corrupt(train_x[torch.from_numpy(order[clean:clean + corrupted])])
    third = train_x[torch.from_numpy(rng.permutation(len(train_x))[:back])]
    return Stream(torch.cat([first, second, third]), [clean, clean + corrupted, clean + corrupted + back])


def produce_stream(bootstrap: str | None, topic: str, stream: Stream) -> None:
    """Write ``stream`` into ``topic`` as PNG records (nothing to do with ``--intake memory``: no broker)."""
    if bootstrap is None:
        return
    from streamkd.commands.broker import ensure_topics
    from streamkd.commands.produce import dataset_records, produce

    ensure_topics(bootstrap, {topic: 1})
    n = len(stream.images)
    t = time.monotonic()
    produce(dataset_records(stream.images, None, "png", np.arange(n)), bootstrap, topic, progress=False, total=n)
    log(f"produced {n} PNG records into {topic} in {time.monotonic() - t:.1f} s")


class MemoryIntake:
    """The stream in batches of ``batch_size`` records, straight to the loop: KafkaIntake's methods, no broker."""

    def __init__(self, stream: Stream, batch_size: int):
        self.images, self.batch_size = stream.images, batch_size
        self.done, self.rejected, self.ready = 0, 0, True

    def start(self, offsets: dict) -> None:
        pass

    def next(self, timeout: float):
        from streamkd.ingest.batcher import Batch

        i, n = self.done, len(self.images)
        if i >= n:
            return None
        self.done = j = min(n, i + self.batch_size)
        return Batch(images=self.images[i:j], labels=torch.full((j - i,), -1, dtype=torch.int64), offsets={0: j},
                     records=j - i, first_offsets={0: i})

    def begin_step(self, batch) -> None:
        return None

    def end_step(self, token) -> None:
        pass

    def step_failed(self, token) -> None:
        pass

    def flush_dead_letters(self) -> None:
        pass

    def commit(self, offsets: dict) -> None:
        pass

    def highwater(self) -> dict:
        return {}

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---- reading the daemon --------------------------------------------------------------------------------


def metric(registry, name: str) -> float | None:
    """Sum of the samples called ``name`` (over labels); None when the daemon exports no such series."""
    values = [s.value for family in registry.restricted_registry([name]).collect()
              for s in family.samples if s.name == name]
    return sum(values) if values else None


class PoisonedTeacher:
    """The teacher, except that while the stream position is in ``window`` its logits are random.

    Random but as confident as real ones: each row keeps the teacher's own logit values with its classes
    randomly permuted (a fresh permutation per row), so the target keeps the teacher's peak and spread but
    names a random class (the true one only by chance, 1 in K). A teacher emitting garbage with full
    confidence is what harms a student; noise with a flat spread mostly softens the targets.
    """

    def __init__(self, teacher, window: tuple[int, int], position: Callable[[], int], seed: int):
        self.teacher, self.window, self.position = teacher, window, position
        self.gen = torch.Generator().manual_seed(seed)
        self.poisoned = 0  # rows whose logits were replaced

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Row i of a call is record ``position() + i`` (exact when the teacher sees every record: budget 1)."""
        logits = self.teacher(images)
        start, n = self.position(), int(logits.shape[0])
        rows = torch.arange(start, start + n)
        hit = ((rows >= self.window[0]) & (rows < self.window[1])).to(logits.device)
        if not bool(hit.any()):
            return logits
        perm = torch.rand(logits.shape, generator=self.gen).argsort(dim=1).to(logits.device)
        self.poisoned += int(hit.sum())
        return torch.where(hit[:, None], logits.gather(1, perm), logits)


@dataclasses.dataclass
class Run:
    """What one daemon run left behind."""

    name: str
    records: int
    img_s: float
    snap_dir: Path
    topic: str
    budget: float | str
    published: list[int]  # snapshot versions in the order they became LATEST
    phase_versions: list[int | None]  # the served version at each phase end
    detections: list[int] | None  # stream positions where the drift counter moved; None: no such metric
    totals: dict[str, float | None]  # END_METRICS at the end of the run (None: not exported)
    poisoned_rows: int = 0  # teacher rows replaced by random logits (poisoned-teacher)
    gate_share: float | None = None  # share of the loop's time spent in the gate's own work (None: gate off)


class Watch:
    """The run's callbacks: stream position, throughput clock, published versions, drift, phase-end snapshots.

    Time spent here (and in forced snapshots) is kept out of the throughput figure.
    """

    def __init__(self, parts, stream: Stream):
        self.parts, self.ends = parts, stream.phase_ends
        self.position = 0
        self.t0: float | None = None
        self.r0 = 0
        self.t1 = 0.0
        self.paused = 0.0
        self.published: list[int] = []
        self.phase_versions: list[int | None] = []
        self.drift_seen = 0.0
        self.detections: list[int] = []
        self.in_callback = False

    @property
    def counting(self) -> bool:
        """True while the throughput clock runs (after the first batch, before the stop, outside callbacks)."""
        return self.t0 is not None and not self.t1 and not self.in_callback

    def loop_seconds(self) -> float:
        return max(self.t1 - self.t0 - self.paused, 1e-9) if self.t0 is not None else 0.0

    def on_progress(self, prog) -> None:
        t = time.perf_counter()
        self.in_callback = True
        self.position = prog.records_done
        if self.t0 is None and prog.records_done > 0:
            self.t0, self.r0 = t, prog.records_done
        self.note_published()
        self._note_drift()
        self._phase_end_snapshot(prog)
        self.in_callback = False
        self.paused += time.perf_counter() - t

    def stop_when(self, prog) -> bool:
        if prog.records_done < self.ends[-1]:
            return False
        self.t1 = time.perf_counter()
        return True

    def _phase_end_snapshot(self, prog) -> None:
        """At each phase end but the last (the loop's final snapshot is that one), snapshot now."""
        k = len(self.phase_versions)
        if k < len(self.ends) - 1 and prog.records_done >= self.ends[k]:
            self.parts.accounting.drain()
            self.parts.persistence.snapshot(prog, sync=True)  # the gate, where enabled, may keep the previous one
            self.note_published()
            self.phase_versions.append(self.published[-1] if self.published else None)

    def note_published(self) -> None:
        """Append the LATEST version when it changed (a gate-rejected candidate never shows here)."""
        v = metric(self.parts.registry, "streamkd_last_snapshot_version")
        if v and (not self.published or int(v) != self.published[-1]):
            self.published.append(int(v))

    def _note_drift(self) -> None:
        d = metric(self.parts.registry, "streamkd_drift_detected_total")
        if d is not None and d > self.drift_seen:
            self.detections += [self.position] * int(d - self.drift_seen)
            self.drift_seen = d

    def img_s(self) -> float:
        return (self.ends[-1] - self.r0) / self.loop_seconds()


# ---- the bench -----------------------------------------------------------------------------------------


class GateClock:
    """Seconds the publishing gate's own work takes inside the loop: holdout offers and ``Trainer.judge``
    (the candidate and the published weights scored on the holdout). Not the copy of the weights a
    snapshot makes with the gate or without it.

    Two runs that differ only in the gate differ by a few percent from run to run on a shared CPU, more than
    the gate costs; timing the gate's calls inside one run measures its cost directly."""

    def __init__(self, trainer, watch: Watch):
        self.watch, self.seconds = watch, 0.0
        trainer.judge = self._timed(trainer.judge)
        trainer.holdout.offer = self._timed(trainer.holdout.offer)

    def _timed(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.watch.counting:
                    self.seconds += time.perf_counter() - t
        return call


class Bench:
    """One broker, one stream topic, the test sets, and the daemon runs of one invocation."""

    def __init__(self, args: argparse.Namespace, sizes: dict, bootstrap: str | None, workdir: Path):
        from streamkd.commands.datasets import load_fashion_mnist

        self.args, self.sizes, self.bootstrap, self.workdir = args, sizes, bootstrap, workdir
        self.train_x, self.train_y = load_fashion_mnist("train")
        self.test_x, self.test_y = load_fashion_mnist("test")
        if sizes["test"]:
            self.test_x, self.test_y = self.test_x[: sizes["test"]], self.test_y[: sizes["test"]]
        self.tests = {"clean": self.test_x}  # the test images each snapshot can be scored on (same labels)
        if args.scenario == "shift":
            self.tests["corrupted"] = corrupt(self.test_x)
        self.rng = np.random.default_rng(args.seed)
        self.teacher_acc: dict[str, float] = {}
        self.teacher: tuple = (None, None)  # the teacher model and its input spec, kept by the first run
        self.device = "cpu"
        self._evals: dict[tuple, float] = {}

    def overrides(self, *extra: str) -> list[str]:
        """The configured daemon: the user's --set (and --budget), then ``extra``."""
        budget = [f"teacher.budget={self.args.budget[0]}"] if self.args.budget else []
        return [f"train.seed={self.args.seed}", *self.args.set, *budget, *extra]

    def run(self, name: str, topic: str, stream: Stream, overrides: list[str], *, follow: bool = False,
            poison: tuple[int, int] | None = None) -> Run:
        """One daemon run over ``stream``. ``follow``: a snapshot every ``sizes['snapshot_every']`` records
        (else the daemon's own cadence); ``poison``: the teacher's logits are random in that record window."""
        from streamkd import daemon

        cfg = self.config(name, topic, overrides, follow)
        intake = MemoryIntake(stream, cfg.train.batch_size) if self.bootstrap is None else None
        parts = daemon.build(cfg, intake=intake)
        self.device = parts.device
        self._teacher_accuracy(parts)
        watch = Watch(parts, stream)
        poisoned = None
        if poison is not None:  # the labeller calls the teacher (parts.teacher only serves warm-up and scoring)
            poisoned = PoisonedTeacher(parts.labeller.teacher, poison, lambda: watch.position, self.args.seed)
            parts.labeller.teacher = poisoned
        clock = GateClock(parts.trainer, watch) if parts.trainer.holdout is not None else None
        log(f"run {name}: {stream.phase_ends[-1]} records, overrides {overrides}")
        daemon.run(parts, threading.Event(), on_progress=watch.on_progress, stop_when=watch.stop_when)
        watch.note_published()  # the final snapshot, written as the loop stopped
        totals = {m: metric(parts.registry, m) for m in END_METRICS}
        run = Run(name, stream.phase_ends[-1], watch.img_s(), Path(cfg.snapshot.dir), topic, cfg.teacher.budget,
                  watch.published, watch.phase_versions,
                  None if totals["streamkd_drift_detected_total"] is None else watch.detections, totals,
                  poisoned.poisoned if poisoned is not None else 0,
                  clock.seconds / watch.loop_seconds() if clock is not None else None)
        log(f"run {name}: {run.img_s:.0f} img/s, {len(run.published)} snapshots published")
        return run

    def config(self, name: str, topic: str, overrides: list[str], follow: bool):
        """The run's config: its own consumer group and state directory, ``overrides`` last."""
        from streamkd.config import load_config

        state = self.workdir / name
        bootstrap = self.bootstrap or "127.0.0.1:9"  # memory intake: never contacted
        base = [f"kafka.bootstrap_servers={bootstrap}", f"kafka.topic={topic}", f"kafka.group_id={name}",
                f"checkpoint.dir={state}/ckpt", f"snapshot.dir={state}/snap", "snapshot.keep=100000",
                "metrics.port=0", "logging.progress_every_s=30"]
        cfg = load_config(None, [*base, *overrides], env={})
        if not follow:
            return cfg
        steps = max(1, self.sizes["snapshot_every"] // cfg.train.batch_size)
        return load_config(None, [*base, f"snapshot.every_steps={steps}", "snapshot.every_seconds=86400",
                                  *overrides], env={})

    def _teacher_accuracy(self, parts) -> None:
        from streamkd.learn.evaluation import evaluate

        if self.teacher_acc:
            return
        self.teacher = (parts.teacher.model, parts.teacher.spec)
        for test, x in self.tests.items():
            self.teacher_acc[test] = evaluate(parts.teacher.model, x, self.test_y, parts.teacher.spec,
                                              device=parts.device)["acc"]
        log(f"teacher on the test split: {self.teacher_acc}")

    def served_acc(self, run: Run, version: int | None, test: str = "clean",
                   classes: tuple[int, ...] | None = None) -> float | None:
        """Accuracy of snapshot ``version`` of ``run`` on the clean or corrupted test images (of ``classes``)."""
        if version is None:
            return None
        from streamkd.learn.evaluation import evaluate

        key = (run.name, version, test, classes)
        if key not in self._evals:
            model, spec = self._load(run, version)
            x, y = self.tests[test], self.test_y
            if classes is not None:
                keep = torch.isin(y, torch.tensor(classes))
                x, y = x[keep], y[keep]
            self._evals[key] = evaluate(model, x, y, spec, device=self.device)["acc"]
        return self._evals[key]

    def position(self, run: Run, version: int) -> int:
        """Records the stream had delivered into snapshot ``version`` (its manifest's offsets)."""
        from streamkd.serve.export import read_manifest

        offsets = read_manifest(run.snap_dir / str(version), verify=False)["offsets"].get(run.topic, {})
        return int(sum(offsets.values()))

    @staticmethod
    def _load(run: Run, version: int):
        from streamkd.commands.evaluate import spec_from_manifest
        from streamkd.serve.export import load_student

        model, manifest = load_student(run.snap_dir / str(version))
        return model, spec_from_manifest(manifest["student"])


def latest(run: Run) -> int | None:
    return run.published[-1] if run.published else None


def common(bench: Bench, run: Run) -> dict:
    """The keys every scenario reports, for ``run`` (the configured daemon)."""
    student = bench.served_acc(run, latest(run))
    teacher = bench.teacher_acc["clean"]
    return {"teacher_acc": round(teacher, 4), "student_acc": _r(student),
            "student_over_teacher": _r(student / teacher if student is not None else None),
            "img_s": round(run.img_s, 1), "teacher_calls_fraction": _r(calls_fraction(run)),
            "teacher_budget_at_end": _r(run.totals["streamkd_teacher_budget_ratio"]), "records": run.records,
            "gate_time_share": _r(run.gate_share)}


def calls_fraction(run: Run) -> float | None:
    calls = run.totals["streamkd_teacher_calls_total"]
    if calls is not None:
        return calls / run.records
    return 1.0 if run.budget in (1, 1.0) else None


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


# ---- scenarios -----------------------------------------------------------------------------------------


def stationary(bench: Bench) -> dict:
    stream = stationary_stream(bench.train_x, bench.sizes["stationary"], bench.rng)
    produce_stream(bench.bootstrap, "stationary", stream)
    budgets = bench.args.budget or [None]
    with_budgets = budgets != [None]
    full_extra = ("teacher.budget=1.0",) if with_budgets else ()
    full_name = "full" if with_budgets else "configured"
    # plain, configured, configured, plain: a linear drift of the machine's speed cancels (module docstring)
    plain = bench.run("plain", "stationary", stream, bench.overrides(*PLAIN))
    full = bench.run(full_name, "stationary", stream, bench.overrides(*full_extra))
    full_again = bench.run(f"{full_name}-again", "stationary", stream, bench.overrides(*full_extra))
    plain_again = bench.run("plain-again", "stationary", stream, bench.overrides(*PLAIN))
    plain_img_s = [plain.img_s, plain_again.img_s]
    full_img_s = [full.img_s, full_again.img_s]
    plain = dataclasses.replace(plain, img_s=statistics.fmean(plain_img_s))
    full = dataclasses.replace(full, img_s=statistics.fmean(full_img_s))
    outs = []
    for budget in budgets:
        extra = () if budget is None else (f"teacher.budget={budget}",)
        at_full = budget in (None, "1.0")
        configured = full if at_full else bench.run(f"budget-{budget}", "stationary", stream, bench.overrides(*extra))
        out = common(bench, configured)
        out.update(budget=budget, plain_student_acc=_r(bench.served_acc(plain, latest(plain))),
                   plain_img_s=round(plain.img_s, 1), throughput_ratio=round(configured.img_s / plain.img_s, 3),
                   plain_img_s_runs=[round(v, 1) for v in plain_img_s])
        if at_full:
            out["img_s_runs"] = [round(v, 1) for v in full_img_s]
        if with_budgets:
            out.update(full_budget_acc=_r(bench.served_acc(full, latest(full))),
                       full_budget_img_s=round(full.img_s, 1), speedup_vs_full=round(configured.img_s / full.img_s, 3))
        outs.append(out)
    return outs if len(outs) > 1 else outs[0]


def forgetting_of(table: list[list[float | None]]) -> float | None:
    """Mean over phases 1..4 of (best accuracy at a phase end before the last) - (accuracy at the last)."""
    drops = []
    for i in range(len(PHASE_CLASSES) - 1):
        seen = [table[j][i] for j in range(i, len(table) - 1) if table[j][i] is not None]
        if seen and table[-1][i] is not None:
            drops.append(max(seen) - table[-1][i])
    return sum(drops) / len(drops) if drops else None


def forgetting(bench: Bench, run: Run) -> tuple[float | None, float | None, list[list[float | None]]]:
    """(final accuracy on all classes, mean forgetting, accuracy[phase end][phase classes])."""
    ends = [*run.phase_versions, latest(run)]
    table = [[bench.served_acc(run, v, classes=c) for c in PHASE_CLASSES] for v in ends]
    return bench.served_acc(run, latest(run)), forgetting_of(table), table


def forgetting_floor(bench: Bench, model: torch.nn.Module | None, spec) -> tuple[float | None, list]:
    """``forgetting_of`` a fixed ``model`` where, at phase end j, only the classes of phases 0..j can be
    predicted: what the metric reads for a learner that never forgets and is as good as ``model``."""
    from streamkd.learn.evaluation import evaluate

    if model is None:
        return None, []
    table = []
    for j in range(len(PHASE_CLASSES)):
        allowed = torch.tensor([c for cs in PHASE_CLASSES[:j + 1] for c in cs])
        mask = torch.full((sum(map(len, PHASE_CLASSES)),), float("-inf"))
        mask[allowed] = 0.0
        masked = torch.nn.Sequential(model, Offset(mask))
        row = []
        for i, classes in enumerate(PHASE_CLASSES):
            if i > j:
                row.append(None)
                continue
            keep = torch.isin(bench.test_y, torch.tensor(classes))
            row.append(evaluate(masked, bench.test_x[keep], bench.test_y[keep], spec, device=bench.device)["acc"])
        table.append(row)
    return forgetting_of(table), table


class Offset(torch.nn.Module):
    """Adds a fixed vector to the logits (-inf masks a class out)."""

    def __init__(self, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("offset", offset)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.offset


def class_incremental(bench: Bench) -> dict:
    stream = class_incremental_stream(bench.train_x, bench.train_y, bench.sizes["phase"], bench.rng)
    iid = Stream(stream.images[torch.from_numpy(bench.rng.permutation(len(stream.images)))], stream.phase_ends)
    produce_stream(bench.bootstrap, "class-incremental", stream)
    produce_stream(bench.bootstrap, "class-incremental-iid", iid)
    held = any(s.startswith("replay.capacity=") for s in bench.args.set)
    buffer = () if held else (f"replay.capacity={CI_BUFFER}",)
    configured = bench.run("configured", "class-incremental", stream, bench.overrides(*buffer))
    plain = bench.run("plain", "class-incremental", stream, bench.overrides(*PLAIN))
    reference = bench.run("iid", "class-incremental-iid", iid, bench.overrides(*buffer))
    final, mean, table = forgetting(bench, configured)
    plain_final, plain_mean, _ = forgetting(bench, plain)
    iid_final, _, iid_table = forgetting(bench, reference)
    version = latest(reference)
    floor, floor_table = forgetting_floor(bench, *bench._load(reference, version)) if version else (None, [])
    teacher_floor, _ = forgetting_floor(bench, *bench.teacher)
    gaps = [a - b for a, b in zip(iid_table[-1][:-1], table[-1][:-1], strict=True) if a is not None and b is not None]
    out = common(bench, configured)
    out.update(final_acc=_r(final), mean_forgetting=_r(mean),
               buffer_samples=configured.totals["streamkd_replay_buffer_samples"], plain_final_acc=_r(plain_final),
               plain_mean_forgetting=_r(plain_mean), plain_img_s=round(plain.img_s, 1),
               phase_acc=[[_r(a) for a in row] for row in table],
               forgetting_floor_iid=_r(floor), forgetting_floor_teacher=_r(teacher_floor),
               forgetting_vs_iid=_r(sum(gaps) / len(gaps) if gaps else None),
               iid_final_acc=_r(iid_final), iid_phase_acc=[_r(a) for a in iid_table[-1]],
               floor_phase_acc=[[_r(a) for a in row] for row in floor_table])
    return out


def curve(bench: Bench, run: Run, test: str) -> list[tuple[int, float]]:
    """(stream position, accuracy on ``test``) of every snapshot ``run`` published, in order."""
    return [(bench.position(run, v), bench.served_acc(run, v, test)) for v in run.published]


def plateau(points: list[tuple[int, float]], shift_at: int, shift_end: int) -> float | None:
    """Mean accuracy over the last quarter of the phase after ``shift_at``."""
    tail = [a for p, a in points if shift_at < p <= shift_end and p >= shift_end - (shift_end - shift_at) // 4]
    return sum(tail) / len(tail) if tail else None


def recovery(points: list[tuple[int, float]], shift_at: int, shift_end: int, level: float | None = None) -> int | None:
    """Records after ``shift_at`` until accuracy is within RECOVERED of ``level`` (default: the run's own
    plateau, ``plateau``)."""
    level = plateau(points, shift_at, shift_end) if level is None else level
    if level is None:
        return None
    return next((p - shift_at for p, a in points if shift_at < p <= shift_end and a >= level - RECOVERED), None)


def recoveries(with_detector: list[tuple[int, float]], without_detector: list[tuple[int, float]], at: int,
               end: int) -> dict:
    """The recovery keys of ``shift``: against the level both runs reach, and against each run's own plateau."""
    own, ref = plateau(with_detector, at, end), plateau(without_detector, at, end)
    level = None if own is None or ref is None else min(own, ref)
    fast, slow = recovery(with_detector, at, end, level), recovery(without_detector, at, end, level)
    return dict(post_shift_plateau=_r(level), recovery_samples=fast, recovery_samples_without_detector=slow,
                recovery_speedup=round(slow / fast, 3) if fast and slow else None,
                recovery_samples_own_plateau=recovery(with_detector, at, end),
                recovery_samples_own_plateau_without_detector=recovery(without_detector, at, end))


def shift(bench: Bench) -> dict:
    stream = shift_stream(bench.train_x, bench.sizes["shift"], bench.rng)
    produce_stream(bench.bootstrap, "shift", stream)
    at, end = stream.phase_ends[0], stream.phase_ends[1]
    configured = bench.run("configured", "shift", stream, bench.overrides(), follow=True)
    ref = bench.run("no-detector", "shift", stream, bench.overrides("drift.enabled=false"), follow=True)
    ends = [*configured.phase_versions, latest(configured)]
    phases = [{test: _r(bench.served_acc(configured, v, test)) for test in ("clean", "corrupted")} for v in ends]
    with_detector, without_detector = curve(bench, configured, "corrupted"), curve(bench, ref, "corrupted")
    out = common(bench, configured)
    out.update(teacher_corrupted_acc=round(bench.teacher_acc["corrupted"], 4),
               detection_delay=first_after(configured.detections, at),
               false_alarms=None if configured.detections is None else sum(p < at for p in configured.detections),
               **recoveries(with_detector, without_detector, at, end),
               corrupted_acc=phases[1]["corrupted"], clean_acc_before_shift=phases[0]["clean"],
               clean_acc_after=phases[2]["clean"], phases=phases, detections=configured.detections,
               no_detector_img_s=round(ref.img_s, 1),
               gate_rejections=configured.totals["streamkd_snapshot_gate_rejections_total"],
               gate_rejections_without_detector=ref.totals["streamkd_snapshot_gate_rejections_total"],
               corrupted_curve=[[p, _r(a, 3)] for p, a in with_detector if at - 2048 <= p <= end],
               corrupted_curve_without_detector=[[p, _r(a, 3)] for p, a in without_detector if at - 2048 <= p <= end])
    return out


def first_after(detections: list[int] | None, at: int) -> int | None:
    later = [p - at for p in detections or [] if p >= at]
    return later[0] if later else None


def drift_check(bench: Bench) -> dict:
    stream = stationary_stream(bench.train_x, bench.sizes["stationary"], bench.rng)
    produce_stream(bench.bootstrap, "stationary", stream)
    configured = bench.run("configured", "stationary", stream, bench.overrides())
    out = common(bench, configured)
    detections = configured.detections
    out.update(false_alarms=None if detections is None else len(detections), detections=detections)
    return out


def regressions(bench: Bench, run: Run) -> tuple[list[int], list[float]]:
    """Stream positions of the published snapshots more than REGRESSION below the previous published one
    (clean test set), and every published snapshot's clean accuracy."""
    accs = [bench.served_acc(run, v) for v in run.published]
    return [bench.position(run, v) for v, a, b in zip(run.published[1:], accs, accs[1:], strict=False)
            if b < a - REGRESSION], accs


def poisoned_teacher(bench: Bench) -> dict:
    n, k = bench.sizes["poisoned"], bench.sizes["poison"]
    stream = stationary_stream(bench.train_x, n, bench.rng)
    produce_stream(bench.bootstrap, "poisoned", stream)
    window = (n // 2, n // 2 + k)
    gated = bench.run("gate", "poisoned", stream, bench.overrides("gate.enabled=true"), follow=True, poison=window)
    ungated = bench.run("no-gate", "poisoned", stream, bench.overrides("gate.enabled=false"), follow=True,
                        poison=window)
    regressed, accs = regressions(bench, gated)
    regressed_ungated, accs_ungated = regressions(bench, ungated)
    # The same pair with every drift boosted (drift.boost_on=all): the reaction then follows the wrong labels.
    boosted = {}
    for name, gate in (("gate", "true"), ("no-gate", "false")):
        run = bench.run(f"{name}-boost-all", "poisoned", stream,
                        bench.overrides(f"gate.enabled={gate}", "drift.boost_on=all"), follow=True, poison=window)
        at, _ = regressions(bench, run)
        boosted[name] = {"regressed_published": len(at), "regressed_at": at,
                         "gate_rejections": run.totals["streamkd_snapshot_gate_rejections_total"]}
    out = common(bench, gated)
    out.update(regressed_published=len(regressed), regressed_published_without_gate=len(regressed_ungated),
               gate_throughput_cost=_r(gated.gate_share), gate_wall_cost=round(1 - gated.img_s / ungated.img_s, 4),
               poison_window=list(window),
               poisoned_rows=gated.poisoned_rows, poisoned_rows_without_gate=ungated.poisoned_rows,
               regressed_at=regressed, regressed_at_without_gate=regressed_ungated,
               gate_rejections=gated.totals["streamkd_snapshot_gate_rejections_total"],
               published_acc=[_r(a) for a in accs],
               published_acc_without_gate=[_r(a) for a in accs_ungated], no_gate_img_s=round(ungated.img_s, 1),
               boost_on_all=boosted)
    return out


RUNNERS = {"stationary": stationary, "class-incremental": class_incremental, "shift": shift,
           "stationary-drift-check": drift_check, "poisoned-teacher": poisoned_teacher}


# ---- command line --------------------------------------------------------------------------------------


def budget_arg(values: str) -> list[str]:
    """A comma-separated list of budgets (stationary runs each against one plain and one full-budget run)."""
    return [_budget(v.strip()) for v in values.split(",")]


def _budget(value: str) -> str:
    if value == "adaptive":
        return value
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--budget must be a fraction in (0, 1] or 'adaptive', got {value!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"--budget must be a fraction in (0, 1] or 'adaptive', got {value!r}")
    return str(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=SCENARIOS, required=True)
    ap.add_argument("--budget", type=budget_arg, default=None,
                    help="teacher.budget: a fraction or 'adaptive'; stationary takes a comma-separated list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script (numbers meaningless)")
    ap.add_argument("--intake", choices=("kafka", "memory"), default="kafka",
                    help="memory: the streams from memory, no broker (learning figures only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="daemon config override")
    args = ap.parse_args()

    from streamkd.commands.broker import EmbeddedBroker
    from streamkd.logs import setup_logging

    setup_logging("text", "WARNING")
    sizes = SMOKE if args.smoke else FULL
    workdir = Path(tempfile.mkdtemp(prefix="streamkd-scen-"))
    t = time.monotonic()
    try:
        if args.intake == "memory":
            bench = Bench(args, sizes, None, workdir)
            result = RUNNERS[args.scenario](bench)
        else:
            with EmbeddedBroker() as broker:
                bench = Bench(args, sizes, broker.bootstrap, workdir)
                result = RUNNERS[args.scenario](bench)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    device = str(bench.device)
    for one in result if isinstance(result, list) else [result]:
        budget = one.pop("budget", None) or (args.budget[0] if args.budget else None)
        line = {"scenario": args.scenario, "seed": args.seed,
                "config": {"set": args.set, "budget": budget, "smoke": args.smoke, "intake": args.intake}, **one,
                "device": device if device != "cpu" else f"cpu ({os.cpu_count()} cores)",
                "seconds": round(time.monotonic() - t, 1)}
        print(json.dumps(line))


if __name__ == "__main__":
    main()
