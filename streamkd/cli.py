"""``streamkd`` command line. Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading

from streamkd import __version__
from streamkd.config import ConfigError, load_config
from streamkd.logs import setup_logging
from streamkd.shutdown import install_stop_handlers
from streamkd.state.fsutil import DirLockedError

log = logging.getLogger("streamkd")

# Subcommand -> the module that adds it with `register(subparsers)`. Only the module of the subcommand being
# run is imported (torch is slow to import, and the serving side's `pull` runs without it); `--help` and an
# unknown subcommand import them all.
COMMANDS = {
    "broker": "streamkd.commands.broker",
    "produce": "streamkd.commands.produce",
    "demo": "streamkd.commands.demo",
    "eval": "streamkd.commands.evaluate",
    "export": "streamkd.serve.export",
    "pull": "streamkd.serve.pull",
    "status": "streamkd.commands.status",
    "force-publish": "streamkd.commands.force_publish",
    "train-teacher": "streamkd.commands.train_teacher",
}


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 by itself; keep its message format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; with `argv`, only the subcommand it names is loaded (all when it names none)."""
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
    names = _wanted(argv)
    for name in names:
        try:
            module = importlib.import_module(COMMANDS[name])
        except ImportError as e:
            if len(names) == 1:
                raise  # the command being run cannot load: say why
            log.debug("command module %s unavailable: %s", COMMANDS[name], e)  # left out of --help
            continue
        module.register(sub)
    return parser


def _wanted(argv: list[str] | None) -> list[str]:
    """The subcommands to load for `argv`: the one it names, none for `run`, else (help, a typo) all."""
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    if command == "run":
        return []
    return [command] if command in COMMANDS else list(COMMANDS)


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
