"""Graceful shutdown on SIGTERM/SIGINT for the long-running commands (the daemon, the demo)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

__all__ = ["install_stop_handlers"]

log = logging.getLogger("streamkd")


def install_stop_handlers(stop: threading.Event, grace_s: float) -> Callable[[], None]:
    """SIGTERM/SIGINT: finish the batch in flight, checkpoint, exit. A second signal or the grace period
    running out exits at once (the newest durable checkpoint is intact either way).

    Returns a function that disarms the grace-period watchdog once the loop has stopped cleanly.
    """
    timers: list[threading.Timer] = []

    def disarm() -> None:
        for t in timers:
            t.cancel()

    def handler(signum, _frame):
        if stop.is_set():
            log.error("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing the batch in flight, then checkpoint and exit (grace %.0f s)",
                 signal.Signals(signum).name, grace_s)
        stop.set()

        def watchdog():
            log.error("shutdown exceeded the %.0f s grace period; exiting now (the newest durable checkpoint is "
                      "where the next start resumes)", grace_s)
            logging.shutdown()
            os._exit(1)

        t = threading.Timer(grace_s, watchdog)
        t.daemon = True
        t.start()
        timers.append(t)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return disarm
