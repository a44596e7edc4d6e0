"""Logging setup: human text by default, JSON lines with ``logging.format: json``."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, logger, msg, and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO", stream=None) -> None:
    """Configure the root logger once (idempotent: replaces our previous handler)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler._streamkd = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_streamkd", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own lines say it once, clearly.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if level != "DEBUG" else logging.DEBUG)
