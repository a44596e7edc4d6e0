"""`streamkd status URL`: one screen on a running daemon, from its ``/metrics`` and ``/v1/snapshots/latest``.

Throughput is the change of ``streamkd_samples_trained_total`` between two scrapes ``--interval`` seconds
apart. A figure the daemon does not export (yet, or in this version) is shown as ``-``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

__all__ = ["collect", "parse_metrics", "register", "render"]

TOKEN_ENV = "STREAMKD_SNAPSHOT_TOKEN"
_MAX_BYTES = 16 << 20
Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> [(labels, value)]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {sample name: [(labels, value), ...]} (counters keep their ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _one(samples: Samples, name: str) -> float | None:
    values = [v for _, v in samples.get(name, []) if not math.isnan(v)]
    return sum(values) if values else None


def _get(url: str, timeout: float, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) checked by the caller
            return resp.status, resp.read(_MAX_BYTES)
    except urllib.error.HTTPError as e:
        return e.code, b""


def collect(base_url: str, *, interval: float = 2.0, timeout: float = 5.0, token: str | None = None,
            now: float | None = None) -> dict[str, Any]:
    """The status figures of the daemon at `base_url` (e.g. ``http://127.0.0.1:9400``); None = not exported.

    Raises OSError when the daemon cannot be reached.
    """
    base = base_url.rstrip("/")
    code, body = _get(f"{base}/metrics", timeout, None)
    if code != 200:
        raise OSError(f"{base}/metrics answered HTTP {code}")
    first, t0 = parse_metrics(body.decode("utf-8", "replace")), time.monotonic()
    manifest: dict | None = None
    code, body = _get(f"{base}/v1/snapshots/latest", timeout, token)
    snapshot_note = None
    if code == 200:
        try:
            manifest = json.loads(body)
        except ValueError:
            snapshot_note = "manifest does not parse"
    elif code in (401, 403):
        snapshot_note = f"manifest refused (HTTP {code}; set ${TOKEN_ENV} or --token)"
    elif code == 404:
        snapshot_note = "no snapshot published yet"
    else:
        snapshot_note = f"manifest: HTTP {code}"
    rate = None
    samples = first
    if interval > 0:
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
        code, body = _get(f"{base}/metrics", timeout, None)
        if code == 200:
            samples = parse_metrics(body.decode("utf-8", "replace"))
            a, b = _one(first, "streamkd_samples_trained_total"), _one(samples, "streamkd_samples_trained_total")
            if a is not None and b is not None:
                rate = max(0.0, b - a) / max(1e-9, time.monotonic() - t0)
    now = time.time() if now is None else now
    created = _unix((manifest or {}).get("created_at"))
    if created is None:
        ts = _one(samples, "streamkd_last_snapshot_timestamp_seconds")
        created = ts if ts else None
    lag = samples.get("streamkd_consumer_lag_messages")
    metrics = (manifest or {}).get("metrics") or {}
    version = (manifest or {}).get("version")
    if version is None:
        v = _one(samples, "streamkd_last_snapshot_version")
        version = int(v) if v else None
    return {
        "url": base,
        "ready": _one(samples, "streamkd_ready"),
        "version": version,
        "snapshot_age_s": (now - created) if created is not None else None,
        "snapshot_note": snapshot_note,
        "step": (manifest or {}).get("step") if manifest else _int(_one(samples, "streamkd_train_steps_total")),
        "samples_trained": _int(_one(samples, "streamkd_samples_trained_total")),
        "images_per_s": rate,
        "lag": _int(sum(v for _, v in lag)) if lag else None,
        "lag_partitions": len(lag) if lag else None,
        "agreement": _one(samples, "streamkd_teacher_agreement_ratio"),
        "snapshot_agreement": metrics.get("agreement"),
        "kd_loss": _one(samples, "streamkd_kd_loss"),
        "gate_rejections": _int(_one(samples, "streamkd_snapshot_gate_rejections_total")),
        "gate": (manifest or {}).get("gate"),
        "drift_detections": _int(_one(samples, "streamkd_drift_detected_total")),
        "drift": (manifest or {}).get("drift"),
        "rejected": _int(_one(samples, "streamkd_messages_rejected_total")),
        "rollbacks": _int(_one(samples, "streamkd_rollbacks_total")),
        "kafka_errors": _int(_one(samples, "streamkd_kafka_errors_total")),
    }


def _int(v: float | None) -> int | None:
    return int(v) if v is not None else None


def _unix(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _state(count: int | None, detail: Any, word: str) -> str:
    if count is None and not detail:
        return "-"
    parts = [f"{count} {word}"] if count is not None else []
    if isinstance(detail, Mapping) and detail:
        parts.append(", ".join(f"{k} {v}" for k, v in list(detail.items())[:4]))
    elif detail:
        parts.append(str(detail))
    return "; ".join(parts)


def render(s: Mapping[str, Any]) -> str:
    """The status as aligned ``name  value`` lines; ``-`` where a figure is absent."""
    def f(v: Any, fmt: str = "{}") -> str:
        return "-" if v is None else fmt.format(v)

    ready = "-" if s["ready"] is None else ("ready" if s["ready"] >= 1 else "not ready")
    snap = f(s["version"])
    if s["snapshot_note"] and s["version"] is None:
        snap = f"- ({s['snapshot_note']})"
    lag = "-" if s["lag"] is None else f"{s['lag']:,} records over {s['lag_partitions']} partition(s)"
    agreement = f(s["agreement"], "{:.3f}")
    if s["snapshot_agreement"] is not None:
        agreement += f"  (snapshot: {s['snapshot_agreement']:.3f})"
    rows = [
        ("daemon", f"{s['url']}  {ready}"),
        ("snapshot", snap),
        ("snapshot age", "-" if s["snapshot_age_s"] is None else _age(s["snapshot_age_s"])),
        ("step", f(s["step"], "{:,}")),
        ("samples", f(s["samples_trained"], "{:,}")),
        ("throughput", f(s["images_per_s"], "{:,.1f} img/s")),
        ("lag", lag),
        ("agreement", agreement),
        ("kd loss", f(s["kd_loss"], "{:.4f}")),
        ("gate", _state(s["gate_rejections"], s["gate"], "rejections")),
        ("drift", _state(s["drift_detections"], s["drift"], "detections")),
        ("rejected", f(s["rejected"], "{:,} records")),
        ("rollbacks", f(s["rollbacks"])),
        ("kafka errors", f(s["kafka_errors"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---- command line -------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="one screen on a running daemon (version, age, throughput, lag, ...)",
                              description="Read a daemon's /metrics and newest manifest and show one screen.")
    p.add_argument("url", metavar="URL", help="the daemon's HTTP address, e.g. http://127.0.0.1:9400")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between the two scrapes that give the throughput; 0: one scrape "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per request (default: %(default)s)")
    p.add_argument("--token", default=None, help=f"bearer token for /v1/snapshots (default: ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    parsed = urllib.parse.urlsplit(args.url if "://" in args.url else f"http://{args.url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        print(f"streamkd status: URL must be http(s)://host:port, got {args.url!r}", file=sys.stderr)
        return 2
    if args.interval < 0 or args.timeout <= 0:
        print("streamkd status: --interval must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    try:
        s = collect(parsed.geturl(), interval=args.interval, timeout=args.timeout,
                    token=args.token or os.environ.get(TOKEN_ENV))
    except (OSError, ValueError) as e:
        print(f"streamkd status: cannot read {parsed.geturl()}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s) if args.json else render(s))
    return 0
