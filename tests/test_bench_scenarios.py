"""bench/scenarios.py's recovery measure: records until a run comes within a point of the level both runs reach."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("scenarios", Path(__file__).parent.parent / "bench" / "scenarios.py")
scenarios = importlib.util.module_from_spec(_spec)
sys.modules["scenarios"] = scenarios  # dataclasses look their module up
_spec.loader.exec_module(scenarios)


def curve(levels: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(levels.items())


def test_recovery_is_measured_against_the_level_both_runs_reach():
    at, end = 1000, 9000  # the plateau is the mean over records 7000..9000
    fast = curve({1500: 0.80, 2000: 0.845, 3000: 0.85, 7000: 0.87, 8000: 0.87, 9000: 0.87})
    slow = curve({1500: 0.30, 3000: 0.70, 5000: 0.84, 6000: 0.85, 7000: 0.85, 8000: 0.85, 9000: 0.85})
    out = scenarios.recoveries(fast, slow, at, end)
    assert out["post_shift_plateau"] == pytest.approx(0.85)  # the lower plateau
    assert out["recovery_samples"] == 1000 and out["recovery_samples_without_detector"] == 4000
    assert out["recovery_speedup"] == 4.0
    # Against its own, higher plateau the run that kept improving reads as recovering later.
    assert out["recovery_samples_own_plateau"] == 6000 and out["recovery_samples_own_plateau_without_detector"] == 4000


def test_recovery_is_none_when_a_run_has_no_snapshot_in_the_phase():
    out = scenarios.recoveries([(500, 0.9)], [(2000, 0.8)], 1000, 9000)
    assert out["post_shift_plateau"] is None and out["recovery_samples"] is None
    assert out["recovery_speedup"] is None
