"""Capped exponential backoff with jitter, for the loops that retry infrastructure (Kafka, HTTP, object storage).

One :class:`Backoff` per retry loop::

    backoff = Backoff(0.5, 30.0, stop=stop_event)
    while not stop_event.is_set():
        try:
            return connect()
        except OSError as e:
            delay = backoff.next_delay()
            log.warning("cannot connect (%s); retrying in %.1f s", e, delay)
            if backoff.wait(delay):
                return None  # stopped while waiting

The delays are ``initial_s``, doubling each time, never above ``max_s``, and
each one is shortened by a random fraction of up to ``jitter`` so that many
clients that failed together do not retry together. :meth:`wait` sleeps on the
stop event, so a shutdown never waits out a long delay. Standard library only:
the serving side (``streamkd pull``) uses it without torch.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays ``initial_s, 2·initial_s, 4·initial_s, …`` capped at ``max_s``, each scaled by a random
    factor in ``[1 - jitter, 1]``; :meth:`reset` after a success starts again from ``initial_s``."""

    def __init__(self, initial_s: float, max_s: float, *, jitter: float = 0.5,
                 stop: threading.Event | None = None, rng: Callable[[], float] = random.random) -> None:
        """`stop`: the event :meth:`wait` returns early on (default: one that is never set);
        `rng`: a function returning floats in [0, 1) (for tests)."""
        if not initial_s > 0:
            raise ValueError(f"initial_s must be > 0, got {initial_s}")
        if not max_s > 0:
            raise ValueError(f"max_s must be > 0, got {max_s}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial_s, self.max_s, self.jitter = float(initial_s), float(max_s), float(jitter)
        self.stop = stop if stop is not None else threading.Event()
        self._rng = rng
        self._base = self.initial_s

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (and move on to the following, longer one)."""
        base = min(self._base, self.max_s)
        self._base = min(self._base * 2, self.max_s)
        return base * (1.0 - self.jitter * self._rng())

    def reset(self) -> None:
        """The operation succeeded: the next failure waits ``initial_s`` (less jitter) again."""
        self._base = self.initial_s

    def wait(self, delay: float | None = None) -> bool:
        """Sleep `delay` seconds (default: :meth:`next_delay`) or until the stop event is set.

        Returns True when the stop event is set: the caller should give up rather than retry.
        """
        return self.stop.wait(self.next_delay() if delay is None else delay)
