"""``streamkd`` command line. Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from streamkd import __version__
from streamkd.config import ConfigError, load_config
from streamkd.state.fsutil import DirLockedError
from streamkd.logs import setup_logging

log = logging.getLogger("streamkd")

# Modules that add a subcommand with `register(subparsers)` (imported lazily: torch is slow to import).
COMMANDS = ("commands.broker", "commands.produce", "commands.demo", "commands.evaluate", "serve.export", "serve.pull",
            "commands.status", "commands.train_teacher")


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 by itself; keep its message format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamkd", description="Online knowledge distillation from a Kafka image stream.")
    parser.add_argument("--version", action="version", version=f"streamkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("run", help="the daemon: distil the teacher into the student from a Kafka topic")
    p.add_argument("-c", "--config", help="YAML config file (see config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, value parsed as YAML (repeatable): --set train.lr=1e-3")
    p.add_argument("--print-config", action="store_true", help="print the merged config (secrets redacted) and exit")
    p.set_defaults(func=cmd_run)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"streamkd.{name}")
        except ImportError as e:  # a command whose optional dependency is missing still shows up in --help
            log.debug("command module %s unavailable: %s", name, e)
            continue
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    setup_logging(cfg.logging.format, cfg.logging.level)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from streamkd import daemon

    stop = threading.Event()
    install_stop_handlers(stop, cfg.train.shutdown_grace_s)
    log.info("streamkd %s starting; config sha256 %s", __version__, cfg.sha256()[:12])
    try:
        parts = daemon.build(cfg)
    except (ValueError, FileNotFoundError, DirLockedError) as e:  # bad model, weights, or state dir in use
        raise UsageError(f"cannot start: {e}") from e
    daemon.run(parts, stop)
    return 0


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
            log.error("shutdown exceeded the %.0f s grace period; exiting without a final checkpoint", grace_s)
            logging.shutdown()
            os._exit(1)

        t = threading.Timer(grace_s, watchdog)
        t.daemon = True
        t.start()
        timers.append(t)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return disarm


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"streamkd: config error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"streamkd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns a crash into exit code 1
        logging.getLogger("streamkd").exception("fatal: %s", e)
        print(f"streamkd: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
