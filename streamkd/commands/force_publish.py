"""``streamkd force-publish URL``: ask a running daemon to publish a snapshot now, past the publishing gate.

For when the gate holds back snapshots an operator knows are right (for example after the stream changed
for good and the holdout still remembers the old content). Needs the daemon's ``metrics.snapshot_token``.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

TOKEN_ENV = "STREAMKD_SNAPSHOT_TOKEN"


def force_publish(url: str, token: str, timeout_s: float = 10.0) -> str:
    """POST /v1/snapshots/publish; returns the daemon's answer, raises urllib.error.HTTPError on refusal."""
    req = urllib.request.Request(url.rstrip("/") + "/v1/snapshots/publish", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read().decode(errors="replace").strip()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("force-publish", help="publish a snapshot now on a running daemon, past the gate")
    p.add_argument("url", help="the daemon's HTTP address, e.g. http://127.0.0.1:9400")
    p.add_argument("--token", help=f"the daemon's metrics.snapshot_token (default: ${TOKEN_ENV})")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"streamkd force-publish: a token is needed (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    try:
        print(force_publish(args.url, token))
    except urllib.error.HTTPError as e:
        print(f"streamkd force-publish: the daemon answered {e.code}: {e.read().decode(errors='replace').strip()}",
              file=sys.stderr)
        return 2 if e.code in (401, 403) else 1
    except OSError as e:
        print(f"streamkd force-publish: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    return 0
