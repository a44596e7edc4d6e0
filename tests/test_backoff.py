"""The one retry-delay helper: capped exponential growth, jitter, reset, and a wait that a stop event ends."""

from __future__ import annotations

import threading
import time

import pytest

from streamkd.backoff import Backoff


def test_delays_double_up_to_the_cap_without_jitter() -> None:
    b = Backoff(0.5, 3.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_an_initial_delay_above_the_cap_is_capped() -> None:
    b = Backoff(0.5, 0.3, jitter=0.0)
    assert [b.next_delay() for _ in range(3)] == [0.3, 0.3, 0.3]


def test_jitter_shortens_each_delay_by_at_most_its_fraction() -> None:
    draws = iter([0.0, 0.999999, 0.5])
    b = Backoff(1.0, 60.0, jitter=0.5, rng=lambda: next(draws))
    assert b.next_delay() == 1.0  # rng 0: the full delay
    assert b.next_delay() == pytest.approx(1.0, abs=1e-5)  # rng ~1: half of 2 s
    assert b.next_delay() == pytest.approx(3.0)  # rng 0.5: three quarters of 4 s


def test_real_jitter_stays_within_bounds_and_varies() -> None:
    b = Backoff(8.0, 8.0, jitter=0.5)
    got = [b.next_delay() for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in got)
    assert len(set(got)) > 100


def test_reset_starts_over() -> None:
    b = Backoff(0.1, 10.0, jitter=0.0)
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == 0.1


def test_wait_returns_early_when_stopped() -> None:
    stop = threading.Event()
    b = Backoff(30.0, 30.0, jitter=0.0, stop=stop)
    threading.Timer(0.05, stop.set).start()
    t0 = time.monotonic()
    assert b.wait() is True
    assert time.monotonic() - t0 < 5.0


def test_wait_sleeps_the_given_delay_when_not_stopped() -> None:
    b = Backoff(30.0, 30.0)
    t0 = time.monotonic()
    assert b.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04


@pytest.mark.parametrize("kwargs", [{"initial_s": 0, "max_s": 1}, {"initial_s": 1, "max_s": -1},
                                    {"initial_s": 1, "max_s": 1, "jitter": 1.0}])
def test_invalid_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
