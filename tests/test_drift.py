"""Drift monitor on synthetic streams (false alarms, delay, direction, grace), and the learning-rate boost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from river import drift as river_drift

from streamkd.learn.drift import _DEFAULTS, DriftEvent, DriftMonitor, LrBoost, drift_kind, student_confidence

BATCH, SHARE = 64, 0.1


def level(start: float, end: float, change: int | None, ramp: int, idx: np.ndarray) -> np.ndarray:
    """Per-sample value of a signal that moves from ``start`` to ``end`` linearly over ``ramp`` samples."""
    if change is None:
        return np.full(len(idx), start)
    t = np.clip((idx - change + 1) / max(ramp, 1), 0.0, 1.0)
    return start + (end - start) * t


def feed(monitor: DriftMonitor, seed: int, n: int, change: int | None = None, *, agree=(0.88, 0.5),
         conf=(0.9, 0.6), ramp: int = 1, classes: tuple[range, range] | None = None) -> list[DriftEvent]:
    """Stream n samples in batches of 64: agreement Bernoulli on a ~10 % random share, confidence Beta on all
    samples (spread of a real student's max-softmax, about 0.15 at mean 0.9), both changing at ``change``.
    ``classes``: the teacher's top-1 classes are drawn from the first range before ``change``, from the second
    after it."""
    rng = np.random.default_rng(seed)
    events = []
    for start in range(0, n, BATCH):
        idx = np.arange(start, min(n, start + BATCH))
        mean = level(*conf, change, ramp, idx)
        confidence = rng.beta(mean * 3.0, (1 - mean) * 3.0)
        share = rng.random(len(idx)) < SHARE
        agreement = (rng.random(len(idx)) < level(*agree, change, ramp, idx))[share]
        top1 = None
        if classes is not None:
            before, after = (np.asarray(c) for c in classes)
            top1 = np.where(idx < (change if change is not None else n), rng.choice(before, len(idx)),
                            rng.choice(after, len(idx)))
        event = monitor.update(agreement.astype(float), confidence, top1)
        if event is not None:
            events.append(event)
    return events


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_stationary_stream_raises_at_most_one_false_alarm(detector):
    assert len(feed(DriftMonitor(detector), seed=0, n=60_000)) <= 1


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
@pytest.mark.parametrize("seed", [1, 2])
def test_shift_is_detected_within_640_samples(detector, seed):
    change = 20_000 + 17  # mid-batch
    events = feed(DriftMonitor(detector), seed=seed, n=25_000, change=change)
    assert events, "shift not detected"
    first = events[0]
    assert 0 <= first.samples_seen - change <= 640, first
    assert first.detector == detector and first.signal in ("agreement", "confidence")
    if detector == "adwin":
        assert first.mean_before > first.mean_after


def test_agreement_alone_catches_a_shift_the_confidence_does_not_show():
    # The student stays confident but the teacher disagrees: only the random share can tell.
    change = 10_000 + 5
    events = feed(DriftMonitor("adwin"), seed=3, n=15_000, change=change, conf=(0.9, 0.9))
    assert events and events[0].signal == "agreement"
    # ~10x fewer observations than the confidence signal: allow more delay than the joint drop.
    assert 0 <= events[0].samples_seen - change <= 1000
    assert events[0].mean_before == pytest.approx(0.88, abs=0.05)


def test_adwin_event_means_are_those_of_the_window_around_the_cut():
    # The mean before the cut is worked out from the monitor's own counts, not read from ADWIN at every value:
    # it must be the one ADWIN's window gives, read before the value that fired.
    rng = np.random.default_rng(5)
    stream = np.concatenate([rng.random(4000) < 0.9, rng.random(4000) < 0.4]).astype(float).tolist()
    monitor, shadow = DriftMonitor("adwin"), river_drift.ADWIN(**_DEFAULTS["adwin"]["agreement"])
    for i in range(0, len(stream), 3):
        values = stream[i:i + 3]
        event = monitor.update(values, [0.9] * 30)
        for x in values:
            width, mean = shadow.width, shadow.estimation
            shadow.update(x)
            if shadow.drift_detected:
                break
        if shadow.drift_detected:
            break
    else:
        pytest.fail("no cut")
    after_n, after = shadow.width, shadow.estimation
    assert event is not None and event.signal == "agreement"
    assert event.mean_after == after
    assert event.mean_before == pytest.approx((width * mean + x - after_n * after) / (width + 1 - after_n), rel=1e-12)
    assert event.mean_before > 0.85 > event.mean_after


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_a_rise_is_learning_not_drift(detector):
    rise = dict(agree=(0.5, 0.88), conf=(0.6, 0.9))
    assert feed(DriftMonitor(detector), seed=4, n=20_000, change=10_000, **rise) == []
    assert feed(DriftMonitor(detector, direction="both"), seed=4, n=20_000, change=10_000, **rise)


def test_grace_period_gives_one_event_per_shift():
    # A gradual shift keeps moving after the first detection: without a grace period it fires again.
    gradual = dict(change=10_000, ramp=6_000, conf=(0.9, 0.3))
    assert len(feed(DriftMonitor("adwin", grace=0), seed=5, n=20_000, **gradual)) > 1
    events = feed(DriftMonitor("adwin", grace=8_000), seed=5, n=20_000, **gradual)
    assert len(events) == 1


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_both_detectors_restart_after_an_event(detector):
    # Confidence fires first; the agreement detector, still holding the old level, must not fire later for
    # the same abrupt shift (here after a grace period too short to hide it).
    events = feed(DriftMonitor(detector, grace=64), seed=9, n=16_000, change=8_000)
    assert len(events) == 1, events


def test_after_a_suppressed_detection_the_count_follows_adwin_starting_over():
    # In the warm-up a detection raises no event and restarts nothing of ours, but river's ADWIN empties its
    # window at the next value: the signal's count of observations (an event's ``observations``) must too.
    m = DriftMonitor("adwin", warmup=100_000)
    assert feed(m, seed=6, n=12_000, change=1_000) == []
    confidence = m.signals["confidence"]
    assert 0 < confidence.n == confidence.model.width < 11_000


def test_warmup_suppresses_early_events():
    early = dict(n=12_000, change=1_000)
    assert feed(DriftMonitor("adwin"), seed=6, **early)
    assert feed(DriftMonitor("adwin", warmup=5_000), seed=6, **early) == []


def test_counts_samples_skips_non_finite_values_and_keeps_counters_across_restarts():
    m = DriftMonitor("adwin")
    assert m.update(torch.tensor([1.0, float("nan")]), torch.tensor([0.9, float("nan"), 0.8])) is None
    assert m.samples_seen == 3 and m.signals["confidence"].n == 2 and m.signals["agreement"].n == 1
    events = feed(m, seed=7, n=15_000, change=8_000, classes=(range(10), range(10)))
    assert m.detections == len(events) >= 1
    restored = DriftMonitor("adwin")
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()
    assert restored.mix is not None and np.allclose(restored.mix, m.mix)  # the class mix is kept
    assert restored.signals["confidence"].n == 0  # detector windows start empty after a restart


def test_event_is_a_plain_record():
    m = DriftMonitor("page_hinkley")
    event = feed(m, seed=8, n=12_000, change=6_000)[0]
    d = event.as_dict()
    assert set(d) == {"signal", "detector", "samples_seen", "observations", "mean_before", "mean_after", "kind",
                      "novel_share", "confidence", "usual_confidence"}
    assert d["detector"] == "page_hinkley" and d["samples_seen"] == event.samples_seen > 6_000


def test_bad_settings_name_the_valid_choices():
    with pytest.raises(ValueError, match="adwin, page_hinkley"):
        DriftMonitor("kswin")
    with pytest.raises(ValueError, match="down, both"):
        DriftMonitor(direction="up")
    with pytest.raises(ValueError, match="page_hinkley"):
        DriftMonitor("adwin", threshold=5.0)
    with pytest.raises(ValueError, match="adwin"):
        DriftMonitor("page_hinkley", clock=4)


def test_student_confidence_is_max_softmax():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    c = student_confidence(logits)
    assert c[0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    assert c[1].item() == pytest.approx(1 / 3)


# -- the learning-rate boost ------------------------------------------------------------------------


def test_lr_boost_decays_linearly_back_to_one():
    boost = LrBoost(factor=3.0, steps=4)
    assert boost.multiplier == 1.0
    boost.trigger()
    assert [boost.step() for _ in range(6)] == [3.0, 2.5, 2.0, 1.5, 1.0, 1.0]


def test_lr_boost_restarts_and_survives_a_restart():
    boost = LrBoost(factor=2.0, steps=10)
    boost.trigger()
    for _ in range(7):
        boost.step()
    boost.trigger()
    assert boost.multiplier == 2.0
    boost.step()
    restored = LrBoost(factor=2.0, steps=10)
    restored.load_state_dict(boost.state_dict())
    assert restored.multiplier == boost.multiplier == pytest.approx(1.9)


def test_lr_boost_without_steps_is_a_no_op_and_rejects_a_cut():
    boost = LrBoost(factor=3.0, steps=0)
    boost.trigger()
    assert boost.step() == 1.0
    with pytest.raises(ValueError, match=">= 1"):
        LrBoost(factor=0.5)


def test_drift_kind_compares_the_batch_with_the_class_mix_so_far():
    two_classes = np.array([0.5, 0.5, 0.0, 0.0])
    assert drift_kind(np.array([2, 3, 2, 3]), two_classes) == ("new_classes", 1.0)
    assert drift_kind(np.array([0, 1, 0, 2]), two_classes) == ("input_shift", 0.25)
    assert drift_kind(np.array([0, 1, 2, 3]), np.full(4, 0.25)) == ("input_shift", 0.0)
    assert drift_kind(np.arange(64), np.full(1000, 0.001)) == ("input_shift", 0.0)  # many classes, none rare
    assert drift_kind(np.array([0, 1]), None) == ("input_shift", None)  # nothing to compare with yet
    assert drift_kind(np.array([], dtype=np.int64), two_classes) == ("input_shift", None)
    # The same classes: the student's confidence tells an input shift from a label shift.
    assert drift_kind(np.array([0, 1]), two_classes, 0.70, 0.90) == ("input_shift", 0.0)
    assert drift_kind(np.array([0, 1]), two_classes, 0.88, 0.90) == ("label_shift", 0.0)
    # A confidence detection is a fall of the student's confidence by itself, whatever the firing batch says.
    assert drift_kind(np.array([0, 1]), two_classes, 0.88, 0.90, "confidence") == ("input_shift", 0.0)
    assert drift_kind(np.array([2, 3]), two_classes, 0.88, 0.90) == ("new_classes", 1.0)


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_a_drift_to_classes_the_stream_has_not_shown_is_new_classes(detector):
    events = feed(DriftMonitor(detector), seed=11, n=16_000, change=8_000, classes=(range(0, 2), range(2, 4)))
    assert events and events[0].kind == "new_classes" and events[0].novel_share > 0.9


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_a_drift_on_the_same_classes_is_an_input_shift(detector):
    events = feed(DriftMonitor(detector), seed=11, n=16_000, change=8_000, classes=(range(10), range(10)))
    assert events and events[0].kind == "input_shift" and events[0].novel_share < 0.1
    without = feed(DriftMonitor(detector), seed=11, n=16_000, change=8_000)
    assert without[0].kind == "input_shift" and without[0].novel_share is None  # no classes given


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_agreement_falling_while_the_confidence_holds_is_a_label_shift(detector):
    events = feed(DriftMonitor(detector), seed=5, n=16_000, change=8_000, agree=(0.88, 0.3), conf=(0.9, 0.9),
                  classes=(range(10), range(10)))
    assert events and events[0].signal == "agreement" and events[0].kind == "label_shift"
    assert abs(events[0].usual_confidence - 0.9) < 0.02



def test_after_new_classes_no_event_is_raised_while_the_averages_take_them_in():
    """After a new_classes event the monitor stays quiet for MIX_HORIZON samples (the student's confidence on
    classes it is learning moves: nothing is compared with them yet); after the other kinds, for the grace."""
    from streamkd.learn.drift import MIX_HORIZON

    new = DriftMonitor("adwin")
    events = feed(new, seed=11, n=11_000, change=8_000, conf=(0.9, 0.9), classes=(range(0, 2), range(2, 4)))
    assert [e.kind for e in events] == ["new_classes"]
    assert new.quiet_until == events[0].samples_seen + MIX_HORIZON and new.grace < MIX_HORIZON
    same = DriftMonitor("adwin")
    events = feed(same, seed=11, n=11_000, change=8_000, conf=(0.9, 0.9), classes=(range(10), range(10)))
    assert [e.kind for e in events] == ["label_shift"]  # the agreement fell, the confidence held
    assert same.quiet_until == events[0].samples_seen + same.grace
