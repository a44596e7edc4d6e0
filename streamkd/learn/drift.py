"""Drift detection on the stream, and the learning-rate boost that follows a detection.

:class:`DriftMonitor` runs two detectors from ``river.drift``: one on the per-sample student/teacher
agreement of the random share (0/1, an unbiased sample of the stream), one on the student's confidence
(max-softmax) on every sample. Agreement catches a change the student does not notice (it stays confident
and is wrong); confidence needs no teacher call and reacts within a few batches when the inputs change.
By default only drops count as drift (``direction="down"``): a rising agreement or confidence is the
student learning. After a detection both detectors restart on the new regime, and no further event is
raised for ``grace`` samples, so one shift gives one event; after new classes, for ``MIX_HORIZON`` samples
(while the student learns them its confidence on them moves, and the moving averages below take them in).

Each event also says what kind of change it is (:func:`drift_kind`), from the teacher's top-1 classes and
the student's confidence on the batch that fired, against their moving averages over about ``MIX_HORIZON``
samples: ``new_classes`` when most samples belong to classes the stream has hardly shown; else
``input_shift`` when the student's confidence fell (the same classes look different: a camera that moved,
new lighting); else ``label_shift`` (the inputs look as usual to the student, but the teacher's labels for
them moved: a teacher that changed or went wrong). The trainer reacts to them differently.

The detectors' windows are not saved: after a restart they start empty (they need a few hundred samples
to be armed again). :meth:`DriftMonitor.state_dict` keeps the counters and the moving averages. :class:`LrBoost`
and the budget controller (``budget.BudgetController``) survive restarts too.

Configuration keys (section ``drift``):

- ``drift.enabled``: run the monitor. Default true.
- ``drift.detector``: ``adwin`` (``river.drift.ADWIN``) or ``page_hinkley`` (``river.drift.PageHinkley``).
  Default ``adwin``.
- ``drift.lr_boost``: learning-rate multiplier right after a detection (:class:`LrBoost`). Default 3.0.
- ``drift.boost_steps``: training steps over which the multiplier decays back to 1. Default 400.
- ``drift.boost_updates``: updates per labelled batch while the boost lasts (the trainer's). Default 8.
- ``drift.boost_recent_share``: after an input shift, the share of the replay draws of those extra updates
  taken from the replay buffer's latest samples. Default 1.0.
- ``drift.boost_on``: ``input_shift`` (default) or ``all``: the kinds the trainer boosts after.

On a detection the loop is expected to raise the budget to its ceiling, start the boost after an input shift
(after any drift with ``drift.boost_on: all``), protect the replay buffer's older content, log
:meth:`DriftEvent.as_dict` as one structured event, count it, and record it in the next snapshot's manifest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from river import drift as river_drift

DETECTORS = ("adwin", "page_hinkley")
DIRECTIONS = ("down", "both")
SIGNALS = ("agreement", "confidence")
KINDS = ("input_shift", "new_classes", "label_shift")
MIX_HORIZON = 5000  # samples: the class mix a batch is compared with is a moving average over about this many
RARE_SHARE = 0.25  # a class is rare when its share of the mix is below this fraction of an even share
NOVEL_MAJORITY = 0.5  # a drift brings new classes when more than this share of the firing batch is of rare ones
# The smallest change of a signal's mean that ADWIN may report. Confidence arrives on every sample, so over a
# long window ADWIN finds even the slow wobble of a learning student's confidence significant; a drift that
# matters moves it by more. Agreement arrives on the random share only and needs a large change anyway.
MIN_CHANGE = {"confidence": 0.05}
CONFIDENCE_FALL = 0.05  # an input shift: the student's mean confidence on the firing batch fell this much below usual

# Per-signal detector settings. Agreement arrives only from the random share (about one sample in ten), so
# its detector must decide from few observations: ADWIN checks for a cut every 8 observations instead of
# river's 32, with a looser confidence (with direction "down" only drops count, half of the two-sided
# test's false alarms), and Page-Hinkley tolerates drops below 0.1 with a low threshold. Confidence
# arrives on every sample and keeps river's defaults. Tuned on synthetic streams (tests/test_drift.py): at
# most one false alarm over a 60,000-sample stationary stream, a 0.88 -> 0.5 agreement drop seen within
# 640 samples.
_DEFAULTS = {
    "adwin": {"agreement": {"delta": 0.01, "clock": 8}, "confidence": {"delta": 0.002, "clock": 32}},
    "page_hinkley": {
        "agreement": {"delta": 0.1, "threshold": 12.0, "min_instances": 30},
        "confidence": {"delta": 0.005, "threshold": 50.0, "min_instances": 30},
    },
}


@dataclass(frozen=True)
class DriftEvent:
    """One detection. ``samples_seen``: stream samples the monitor had counted at the end of the batch that
    fired; ``observations``: values the firing detector had taken; means are of the firing signal before and
    after the cut (None where the detector does not tell)."""

    signal: str
    detector: str
    samples_seen: int
    observations: int
    mean_before: float | None
    mean_after: float | None
    kind: str = "input_shift"  # KINDS: see drift_kind
    novel_share: float | None = None  # share of the firing batch's samples of classes rare so far
    confidence: float | None = None  # the student's mean confidence on the firing batch...
    usual_confidence: float | None = None  # ...and its moving average before it

    def as_dict(self) -> dict:
        return asdict(self)


def student_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max-softmax of the student's logits (float N x K) -> float32 N in [1/K, 1]."""
    return torch.softmax(logits.detach().float(), dim=1).amax(dim=1)


def drift_kind(classes: np.ndarray, mix: np.ndarray | None, confidence: float | None = None,
               usual_confidence: float | None = None, signal: str = "agreement") -> tuple[str, float | None]:
    """What a drift is: ``(kind, novel_share)``.

    ``classes``: the teacher's top-1 (int) on the batch that fired; ``mix``: the stream's class shares so far
    (summing to 1, or None before any); ``confidence``: the student's mean max-softmax on that batch;
    ``usual_confidence``: its moving average so far. ``novel_share`` is the share of the batch's samples of
    rare classes (None without classes or mix); a class is rare when its share is below ``RARE_SHARE`` of the
    share it would have if the classes the stream has shown were equally frequent (1 / the mix's
    perplexity), so the rule reads the same for 10 classes or 1,000.

    ``new_classes`` when ``novel_share`` > ``NOVEL_MAJORITY``; else ``label_shift`` when the agreement
    detector fired (``signal``) and the confidence is known and did not fall by ``CONFIDENCE_FALL``; else
    ``input_shift`` (a confidence detection is a fall of the student's confidence by itself).
    """
    novel = None
    if mix is not None and len(classes):
        classes = np.clip(classes, 0, None)
        mix = np.pad(mix, (0, max(0, int(classes.max()) + 1 - len(mix))))  # classes never seen have share 0
        shown = mix[mix > 0]
        effective = float(np.exp(-(shown * np.log(shown)).sum()))  # perplexity: classes the stream has shown
        novel = float((mix[classes] < RARE_SHARE / effective).mean())
    if novel is not None and novel > NOVEL_MAJORITY:
        return "new_classes", novel
    held = confidence is not None and usual_confidence is not None and confidence > usual_confidence - CONFIDENCE_FALL
    if signal == "agreement" and held:
        return "label_shift", novel
    return "input_shift", novel


def _values(xs: Iterable[float] | torch.Tensor | np.ndarray) -> list[float]:
    if isinstance(xs, torch.Tensor):
        xs = xs.detach().float().cpu().numpy()
    return np.asarray(xs, dtype=np.float64).reshape(-1).tolist()


class _Signal:
    """One detector on one signal, plus what an event needs (direction, means, counts)."""

    def __init__(self, name: str, detector: str, params: dict, direction: str):
        self.name, self.detector, self.params, self.direction = name, detector, params, direction
        self.reset()

    def reset(self) -> None:
        if self.detector == "adwin":
            self.model = river_drift.ADWIN(**self.params)
        else:
            mode = "down" if self.direction == "down" else "both"
            self.model = river_drift.PageHinkley(mode=mode, **self.params)
        self.n = 0  # observations since the last reset (of ours or of the detector's own after a detection)
        self.total = 0.0

    def update(self, x: float) -> DriftEvent | None:
        """Feed one value; an event (with ``samples_seen`` left 0) when the detector fires in our direction."""
        self.model.update(x)
        self.n += 1
        self.total += x
        if not self.model.drift_detected:
            return None
        n, total = self.n, self.total
        # river starts either detector over at its next value (ADWIN drops the window it kept after the cut), so
        # the counts start over too. The means are read now: ADWIN still holds the window after the cut.
        self.n, self.total = 0, 0.0
        adwin = self.detector == "adwin"
        if adwin:
            # ADWIN drops values only at a cut, so before this one its window held exactly the values counted
            # since the last start: reading its width and mean there for every value would cost more than the
            # update itself.
            width, mean = n - 1, (total - x) / (n - 1) if n > 1 else 0.0
            after_n, after = self.model.width, self.model.estimation
            cut = width + 1 - after_n
            before = (width * mean + x - after_n * after) / cut if cut > 0 else None
        else:
            before, after = total / n, None
        if self.direction == "down" and adwin and before is not None and after >= before:
            return None  # a rise: the student is learning, not drift
        if adwin and before is not None and abs(before - after) < MIN_CHANGE.get(self.name, 0.0):
            return None  # significant, but too small to act on
        return DriftEvent(self.name, self.detector, 0, n, before, after)


class DriftMonitor:
    """Drift on the random-share agreement and the student's confidence; see the module docstring.

    ``detector``: ``adwin`` or ``page_hinkley``. ``delta`` / ``threshold`` / ``clock`` override the tuned
    per-signal defaults for both signals (``delta``: ADWIN's confidence or Page-Hinkley's tolerated change;
    ``threshold``: Page-Hinkley only; ``clock``: ADWIN only). ``grace``: stream samples after an event
    during which no new event is raised (after a ``new_classes`` event at least ``MIX_HORIZON``). ``warmup``:
    stream samples at the start during which none is raised either (a fresh student's scores move fast).
    ``direction``: ``down`` (drops only) or ``both``.
    """

    def __init__(self, detector: str = "adwin", *, delta: float | None = None, threshold: float | None = None,
                 clock: int | None = None, grace: int = 2000, warmup: int = 0, direction: str = "down"):
        if detector not in DETECTORS:
            raise ValueError(f"Invalid drift detector {detector!r}. Only {', '.join(DETECTORS)} are supported.")
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction {direction!r}. Only {', '.join(DIRECTIONS)} are supported.")
        if grace < 0 or warmup < 0:
            raise ValueError(f"grace and warmup must be >= 0, got grace={grace} warmup={warmup}")
        if delta is not None and not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if threshold is not None and detector != "page_hinkley":
            raise ValueError("threshold applies to the page_hinkley detector only")
        if clock is not None and detector != "adwin":
            raise ValueError("clock applies to the adwin detector only")
        self.detector, self.grace, self.direction = detector, int(grace), direction
        self.signals: dict[str, _Signal] = {}
        for name in SIGNALS:
            params = dict(_DEFAULTS[detector][name])
            for key, value in (("delta", delta), ("threshold", threshold), ("clock", clock)):
                if value is not None:
                    params[key] = value
            self.signals[name] = _Signal(name, detector, params, direction)
        self.samples_seen = 0
        self.detections = 0
        self.quiet_until = int(warmup)
        self.mix: np.ndarray | None = None  # moving average of the teacher's top-1 class shares
        self._mixed = 0  # samples averaged into it
        self.usual_confidence: float | None = None  # moving average of the student's confidence
        self._confided = 0  # samples averaged into it

    def update(self, agreement_per_sample, confidence_per_sample, classes=None) -> DriftEvent | None:
        """Feed one batch: 0/1 agreement of the random share (any length), the student's max-softmax on every
        sample of the batch (its length is the number of stream samples counted), and optionally the
        teacher's top-1 class of the batch's labelled samples (for the event's kind). Non-finite values are
        skipped. Returns an event when drift is detected outside the grace period, else None."""
        fired: DriftEvent | None = None
        confidence = _values(confidence_per_sample)
        for name, values in (("agreement", _values(agreement_per_sample)), ("confidence", confidence)):
            signal = self.signals[name]
            for x in values:
                if not math.isfinite(x):
                    continue
                event = signal.update(x)
                if fired is None and event is not None:
                    fired = event
        self.samples_seen += len(confidence)
        labels = np.asarray([] if classes is None else classes, dtype=np.int64).reshape(-1)
        finite = [x for x in confidence if math.isfinite(x)]
        batch_confidence = sum(finite) / len(finite) if finite else None
        if fired is None or self.samples_seen < self.quiet_until:
            self._average(labels, finite)
            return None
        usual = self.usual_confidence
        kind, novel = drift_kind(labels, self.mix, batch_confidence, usual, fired.signal)
        self._average(labels, finite)
        # Both detectors start over on the new regime, so the one that has not fired yet does not raise a
        # second event for the same shift once the grace period is over.
        for signal in self.signals.values():
            signal.reset()
        self.detections += 1
        # New classes: while the student learns them its confidence on them moves (a hard one turns out to look
        # like older ones, and the confidence falls) and the moving averages have yet to take them in; nothing
        # is compared with them for a horizon.
        self.quiet_until = self.samples_seen + (max(self.grace, MIX_HORIZON) if kind == "new_classes" else self.grace)
        return DriftEvent(fired.signal, fired.detector, self.samples_seen, fired.observations,
                          fired.mean_before, fired.mean_after, kind, novel, batch_confidence, usual)

    def _average(self, classes: np.ndarray, confidence: list[float]) -> None:
        """Average a batch into the class mix and the usual confidence (plain means until MIX_HORIZON samples,
        then exponential)."""
        if confidence:
            self.usual_confidence, self._confided = _fold(self.usual_confidence, self._confided,
                                                          sum(confidence) / len(confidence), len(confidence))
        if not len(classes) or classes.min() < 0:
            return
        k = max(int(classes.max()) + 1, 0 if self.mix is None else len(self.mix))
        shares = np.bincount(classes, minlength=k) / len(classes)
        mix = self.mix
        if mix is not None and len(mix) < k:
            mix = np.pad(mix, (0, k - len(mix)))
        self.mix, self._mixed = _fold(mix, self._mixed, shares, len(classes))

    def state_dict(self) -> dict:
        """The counters and the moving averages; the detectors' windows are not kept (see the module docstring)."""
        return {"samples_seen": self.samples_seen, "detections": self.detections, "quiet_until": self.quiet_until,
                "mix": None if self.mix is None else self.mix.tolist(), "mixed": self._mixed,
                "usual_confidence": self.usual_confidence, "confided": self._confided}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = max(0, int(state["samples_seen"]))
        self.detections = max(0, int(state["detections"]))
        self.quiet_until = max(0, int(state["quiet_until"]))
        mix = state.get("mix")
        self.mix = None if mix is None else np.asarray(mix, dtype=np.float64)
        self._mixed = max(0, int(state.get("mixed", 0)))
        usual = state.get("usual_confidence")
        self.usual_confidence = None if usual is None else float(usual)
        self._confided = max(0, int(state.get("confided", 0)))


def _fold(average, count: int, mean, n: int):
    """``(average, count)`` after folding in ``n`` samples of mean ``mean`` (a float or an array): a plain mean
    until ``MIX_HORIZON`` samples, then an exponential one over about that many."""
    count += n
    w = n / min(count, MIX_HORIZON)
    return (mean if average is None else (1.0 - w) * average + w * mean), count


class LrBoost:
    """Learning-rate multiplier after a drift: ``factor`` at the first step after :meth:`trigger`, then
    linearly back to 1 over ``steps`` training steps.

    Use: multiply the scheduled learning rate by :attr:`multiplier` for each step, then call :meth:`step`.
    """

    def __init__(self, factor: float = 3.0, steps: int = 400):
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"lr boost factor must be >= 1, got {factor}")
        if steps < 0:
            raise ValueError(f"lr boost steps must be >= 0, got {steps}")
        self.factor, self.steps = float(factor), int(steps)
        self.remaining = 0

    def trigger(self) -> None:
        """Start (or restart) the boost."""
        self.remaining = self.steps

    @property
    def multiplier(self) -> float:
        """The factor for the current step: 1 + (factor - 1) * remaining / steps."""
        if self.remaining <= 0:
            return 1.0
        return 1.0 + (self.factor - 1.0) * self.remaining / self.steps

    def step(self) -> float:
        """Advance one training step; returns the multiplier that step used."""
        m = self.multiplier
        self.remaining = max(0, self.remaining - 1)
        return m

    def state_dict(self) -> dict:
        return {"remaining": self.remaining}

    def load_state_dict(self, state: dict) -> None:
        self.remaining = min(self.steps, max(0, int(state["remaining"])))
