"""Liveness and readiness, as the HTTP probes report them.

Alive (``/healthz``) while the loop keeps beating, and during start-up
compilation however long it takes; ready (``/readyz``) once warm-up is over
and the intake says it can read (consumer assigned, no persistent errors).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamkd.metrics import Metrics


class Health:
    def __init__(self, metrics: Metrics, intake_ready: Callable[[], bool], stale_after_s: float = 120.0):
        self.metrics, self.intake_ready = metrics, intake_ready
        self.stale_after_s = stale_after_s
        self.warming = True  # compiling before the first record: alive, not ready
        self.last_beat = time.monotonic()
        self._ready = False
        metrics.ready.set(0)

    def beat(self) -> None:
        """Called by the loop on every turn; also moves the ``streamkd_ready`` gauge."""
        self.last_beat = time.monotonic()
        ready = self.ready()
        if ready != self._ready:
            self._ready = ready
            self.metrics.ready.set(1 if ready else 0)

    def warmed_up(self) -> None:
        self.warming = False
        self.last_beat = time.monotonic()

    def alive(self) -> bool:
        return self.warming or time.monotonic() - self.last_beat < self.stale_after_s

    def ready(self) -> bool:
        return not self.warming and self.intake_ready()

    def stopped(self) -> None:
        self._ready = False
        self.metrics.ready.set(0)
