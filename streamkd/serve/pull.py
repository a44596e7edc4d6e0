"""`streamkd pull`: mirror the daemon's newest snapshot into a local folder, for serving.

The local folder has the daemon's snapshot layout (``DIR/LATEST``,
``DIR/<version>/{model.safetensors, manifest.json, ...}``), so a Triton-style
server can read it directly. A version is downloaded into ``DIR/.tmp-<v>``,
every file is checked against the manifest's sha256, and only then is the
folder fsynced, renamed to ``DIR/<v>`` and ``LATEST`` replaced: a reader never
sees a partial or unverified snapshot, and a refused one leaves DIR as it was.

Unchanged files are not downloaded again: the ETag each file came with is kept
in ``DIR/.etags.json`` and sent as ``If-None-Match``; on 304 the local copy is
hard-linked (or copied) into the new version, and checked like a download.

The folder contract and the manifest checks come from :mod:`streamkd.state.layout`. This module imports
neither torch nor numpy (an import-linter contract holds that), so a serving host needs neither.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from streamkd.backoff import Backoff
from streamkd.state.fsutil import (
    atomic_publish_dir,
    atomic_write_bytes,
    prune_dirs,
    remove_leftovers,
    remove_tree,
    sha256_file,
)
from streamkd.state.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    MAX_FILES,
    MODEL_LEVEL_FILES,
    SnapshotError,
    check_manifest,
    list_versions,
    parse_manifest,
    read_latest,
)

__all__ = ["MAX_FILE_BYTES", "TOKEN_ENV", "AuthError", "PullError", "TransientError", "pull_once", "register", "watch"]

TOKEN_ENV = "STREAMKD_SNAPSHOT_TOKEN"
MAX_FILE_BYTES = 2 << 30  # refuse anything bigger: a student snapshot is megabytes, not gigabytes
MAX_MANIFEST_BYTES = 16 << 20
DEADLINE_S = 900.0  # one whole pull (manifest and every file); a slow or dripping server cannot hold it longer
ETAGS_FILE = ".etags.json"
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """The snapshot was refused (bad checksum, too large, malformed manifest); DIR is unchanged."""


class AuthError(PullError):
    """401/403: the token is missing or wrong."""


class TransientError(PullError):
    """Worth retrying: connection trouble, 5xx, a version pruned while we downloaded it."""


class _NotFound(TransientError):
    """404: nothing published yet (for /latest) or pruned meanwhile (for a file)."""


class Opener(Protocol):
    """What `pull_once` needs from an HTTP client: ``urllib.request.OpenerDirector.open``."""

    def open(self, fullurl: urllib.request.Request, data: bytes | None = None, timeout: float = ...) -> Any: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The daemon never redirects; following one could only lead somewhere unverified.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"unexpected redirect to {newurl}", headers, fp)


def make_opener(base_url: str | None = None) -> urllib.request.OpenerDirector:
    """A urllib opener that refuses redirects. Proxies from the environment apply,
    except for a loopback `base_url` (a daemon on this host is never behind one)."""
    host = urllib.parse.urlsplit(base_url or "").hostname or ""
    if host == "localhost" or _is_loopback(host):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    return urllib.request.build_opener(_NoRedirect())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- HTTP --------------------------------------------------------------------------


class _Client:
    """GETs below one base URL with the bearer token; maps HTTP failures onto our errors."""

    def __init__(self, base_url: str, token: str | None, opener: Opener | None, timeout: float,
                 deadline_s: float = float("inf")) -> None:
        if not re.match(r"https?://", base_url):
            raise ValueError(f"URL must start with http:// or https://, got {base_url!r}")
        self.base = base_url.rstrip("/")
        self.token = token
        self.opener = opener or make_opener(base_url)
        self.timeout = timeout
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s  # for everything this client fetches

    def check_deadline(self, what: str) -> float:
        """Seconds left before the deadline; TransientError once it has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransientError(f"{what}: the pull took longer than its deadline of {self.deadline_s:.0f} s")
        return left

    @contextlib.contextmanager
    def get(self, path: str, etag: str | None = None) -> Iterator[Any | None]:
        """Yields the open 200 response, or None for a 304 (when `etag` was sent)."""
        # Each socket read waits at most this long, so a silent server cannot outlast the deadline either.
        timeout = min(self.timeout, self.check_deadline(self.base + path))
        req = urllib.request.Request(self.base + path, method="GET")
        if self.token:
            # Unredirected: never forwarded to another host (redirects are refused anyway).
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")
        if etag:
            req.add_header("If-None-Match", etag)
        try:
            resp = self.opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 304 and etag:
                yield None
                return
            if e.code in (401, 403):
                raise AuthError(f"{self.base}{path}: HTTP {e.code}: the daemon wants a valid token "
                                f"(--token or ${TOKEN_ENV})") from None
            if e.code == 404:
                raise _NotFound(f"{self.base}{path}: HTTP 404 {e.reason}") from None
            if e.code >= 500:
                raise TransientError(f"{self.base}{path}: HTTP {e.code} {e.reason}") from None
            raise PullError(f"{self.base}{path}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TransientError(f"{self.base}{path}: {type(e).__name__}: {reason}") from None
        with resp:
            yield resp


def _read_limited(resp: Any, limit: int, what: str, sink: Callable[[bytes], None],
                  check_deadline: Callable[[str], float] | None = None) -> int:
    """Stream `resp` into `sink`, refusing more than `limit` bytes or a short body; returns the size.

    `check_deadline(what)` runs before every read (it raises once time is up).
    """
    length = resp.headers.get("Content-Length")
    declared = None
    if length is not None:
        if not (isinstance(length, str) and length.isdigit() and len(length) <= 19):
            raise PullError(f"{what}: bad Content-Length {length[:40]!r}")
        declared = int(length)
        if declared > limit:
            raise PullError(f"{what}: {declared:,} bytes exceeds the limit of {limit:,}")
    # read1 returns whatever one socket read brings, so a server dripping bytes meets the deadline check.
    read = getattr(resp, "read1", None) or resp.read
    got = 0
    try:
        while True:
            if check_deadline is not None:
                check_deadline(what)
            chunk = read(_CHUNK)
            if not chunk:
                break
            got += len(chunk)
            if got > limit:
                raise PullError(f"{what}: more than the limit of {limit:,} bytes")
            sink(chunk)
    except (http.client.HTTPException, OSError) as e:  # connection dropped mid-body
        raise TransientError(f"{what}: download interrupted: {type(e).__name__}: {e}") from None
    if declared is not None and got != declared:
        raise TransientError(f"{what}: got {got:,} of {declared:,} bytes")
    return got


# ---- the local folder ---------------------------------------------------------------


def _local_manifest(dest: Path, version: int) -> dict | None:
    try:
        m = json.loads((dest / str(version) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _newest(dest: Path) -> int | None:
    """The version LATEST names if it is there, else the highest version folder."""
    latest = read_latest(dest)
    if latest is not None and (dest / str(latest)).is_dir():
        return latest
    vs = list_versions(dest)
    return vs[-1] if vs else None


def _load_etags(dest: Path) -> dict:
    try:
        data = json.loads((dest / ETAGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"latest": None, "files": {}}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {"latest": None, "files": {}}
    return data


@contextlib.contextmanager
def _dir_lock(dest: Path) -> Iterator[None]:
    """Exclusive lock on DIR itself (no lock file to leave behind): one puller per folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(dest, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"{dest}: another `streamkd pull` is writing to it") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _validate(raw: bytes, url: str) -> tuple[dict, dict[str, str]]:
    """(manifest, files) of a remote manifest; PullError for anything we would not dare write
    (the snapshot layout's checks, with its student section and at most MAX_FILES files)."""
    try:
        manifest = parse_manifest(raw, url)
        files = check_manifest(manifest, url, student=True, max_files=MAX_FILES)
    except SnapshotError as e:
        raise PullError(str(e)) from None
    return manifest, files


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # versions are immutable, so sharing the inode is safe and free
    except OSError:
        shutil.copyfile(src, dst)


# ---- one pull -------------------------------------------------------------------------


def pull_once(
    base_url: str,
    dest: str | Path,
    token: str | None = None,
    opener: Opener | None = None,
    *,
    keep: int | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    timeout: float = 30.0,
    deadline_s: float = DEADLINE_S,
) -> int | None:
    """Bring `dest` up to the daemon's newest snapshot; returns the newest version in `dest`
    (None when the daemon has published none yet and `dest` holds none).

    Raises AuthError (401/403), TransientError (worth a retry) or PullError
    (refused: checksum, size, malformed manifest); `dest` is unchanged then.
    `keep`: prune to the newest `keep` versions after publishing (None: keep all).
    `timeout` bounds each socket read, `deadline_s` the whole pull (then TransientError).
    """
    client = _Client(base_url, token, opener, timeout, deadline_s)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _dir_lock(dest):
        remove_leftovers(dest)  # of an interrupted pull (we hold the lock)
        etags = _load_etags(dest)
        latest = etags.get("latest") if isinstance(etags.get("latest"), dict) else None
        if latest and not (dest / str(latest.get("version")) / MANIFEST_FILE).is_file():
            latest = None  # the version it stood for is gone locally: ask unconditionally

        try:
            with client.get("/v1/snapshots/latest", etag=latest and latest.get("etag")) as resp:
                if resp is None:  # 304: the daemon's newest is the one we already have
                    return _finish(dest, int(latest["version"]), keep)
                raw = bytearray()
                _read_limited(resp, MAX_MANIFEST_BYTES, f"{client.base}/v1/snapshots/latest", raw.extend,
                              client.check_deadline)
                manifest_etag = _etag(resp)
        except _NotFound as e:  # nothing published yet (or this daemon serves no snapshots)
            log.debug("%s", e)
            return _newest(dest)
        manifest, files = _validate(bytes(raw), f"{client.base}/v1/snapshots/latest")
        version = manifest["version"]

        newest = _newest(dest)
        local = _local_manifest(dest, version)
        if local is not None:
            if local.get("files") != files:
                raise PullError(
                    f"the daemon's version {version} differs from {dest / str(version)} (its snapshot "
                    f"numbering restarted?); refusing to mix them: point pull at an empty folder")
            # Already here (a pull that died between the rename and LATEST may not have moved LATEST).
            etags["latest"] = {"etag": manifest_etag, "version": version} if manifest_etag else None
            _save_etags(dest, etags)
            return _finish(dest, max(version, newest or 0), keep)
        if (dest / str(version)).exists():
            raise PullError(f"{dest / str(version)} exists but has no readable {MANIFEST_FILE}; remove it")
        if newest is not None and version < newest:
            raise PullError(
                f"the daemon's newest snapshot is version {version}, older than version {newest} in {dest}; "
                f"not going backwards (if the daemon's snapshot directory was reset, clear {dest})")

        file_etags = _download(client, dest, version, files, manifest, etags["files"], max_bytes)
        etags = {"latest": {"etag": manifest_etag, "version": version} if manifest_etag else None,
                 "files": file_etags}
        _save_etags(dest, etags)
        log.info("pulled snapshot %d into %s", version, dest / str(version))
        return _finish(dest, version, keep)


def _download(client: _Client, dest: Path, version: int, files: dict[str, str], manifest: dict,
              known: dict, max_bytes: int) -> dict:
    """Fetch (or reuse) every file into .tmp-<v>, verify, publish as <v>; returns the new ETag map."""
    tmp = dest / f".tmp-{version}"
    remove_tree(tmp)
    tmp.mkdir()
    new_etags: dict[str, dict] = {}
    try:
        for name, sha in sorted(files.items()):
            path = tmp / name
            prev = known.get(name) if isinstance(known.get(name), dict) else None
            local = dest / str(prev.get("version")) / name if prev else None
            etag = prev.get("etag") if prev and local is not None and local.is_file() else None
            url_path = f"/v1/snapshots/{version}/{name}"
            got_etag, reused = _fetch(client, url_path, path, etag, local, max_bytes)
            digest = sha256_file(path)
            if digest != sha and reused:
                # 304, yet our copy does not match the new manifest (local damage?): fetch it for real.
                path.unlink()
                got_etag, _ = _fetch(client, url_path, path, None, None, max_bytes)
                digest = sha256_file(path)
            if digest != sha:
                raise PullError(f"{client.base}{url_path}: sha256 {digest[:12]}… does not match the manifest's "
                                f"{sha[:12]}…; refusing snapshot {version}")
            new_etags[name] = {"etag": got_etag, "version": version}
        body = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        (tmp / MANIFEST_FILE).write_text(body, encoding="utf-8")
        for name in MODEL_LEVEL_FILES:  # Triton reads config.pbtxt beside the version folders: DIR is the model
            if name in files:
                atomic_write_bytes(dest / name, (tmp / name).read_bytes())
    except BaseException:
        remove_tree(tmp)  # includes Ctrl-C: nothing half-written stays behind
        raise
    atomic_publish_dir(tmp, dest / str(version))  # fsyncs every file, renames, fsyncs DIR
    return new_etags


def _fetch(client: _Client, url_path: str, path: Path, etag: str | None, local: Path | None,
           max_bytes: int) -> tuple[str | None, bool]:
    """Write one file to `path`: download it, or link `local` on a 304 to `etag`.

    Returns (the ETag the file now has, whether the local copy was reused).
    """
    with client.get(url_path, etag=etag) as resp:
        if resp is None:
            _link_or_copy(local, path)  # type: ignore[arg-type]
            log.debug("%s not modified; reusing %s", url_path, local)
            return etag, True
        with open(path, "wb") as f:
            _read_limited(resp, max_bytes, client.base + url_path, f.write, client.check_deadline)
        return _etag(resp), False


def _etag(resp: Any) -> str | None:
    """The response's ETag when it is one we can store and send back (short, printable ASCII)."""
    tag = resp.headers.get("ETag")
    if isinstance(tag, str) and 0 < len(tag) <= 256 and tag.isascii() and tag.isprintable():
        return tag
    return None


def _save_etags(dest: Path, etags: dict) -> None:
    atomic_write_bytes(dest / ETAGS_FILE, (json.dumps(etags, indent=2) + "\n").encode())


def _finish(dest: Path, version: int, keep: int | None) -> int:
    """Point LATEST at `version` (atomically) when it does not already, then prune; returns it."""
    if read_latest(dest) != version:
        atomic_write_bytes(dest / LATEST_FILE, f"{version}\n".encode())
    if keep is not None:
        vs = list_versions(dest)
        prune_dirs(dest / str(v) for v in vs[: max(0, len(vs) - keep)] if v != version)
    return version


# ---- watching ------------------------------------------------------------------------


def watch(
    base_url: str,
    dest: str | Path,
    *,
    interval: float,
    keep: int,
    token: str | None = None,
    stop: threading.Event | None = None,
    opener: Opener | None = None,
    min_backoff: float = 1.0,
    max_backoff: float = 60.0,
    on_version: Callable[[int], None] | None = None,
    deadline_s: float = DEADLINE_S,
) -> None:
    """pull_once every `interval` seconds until `stop` is set.

    Connection trouble, 5xx and pulls past `deadline_s` are retried with
    exponential backoff (`min_backoff` doubling up to `max_backoff` seconds, less jitter); a
    refused snapshot is logged and tried again next interval (the daemon may
    publish a good one); AuthError raises. Nothing else a server answers stops
    the watch: an unexpected failure is logged with its traceback and retried
    with backoff. `on_version(v)` is called when the newest local version changes.
    """
    stop = stop or threading.Event()
    backoff = Backoff(min_backoff, max_backoff, stop=stop)
    last_error, last_version = "", None
    while not stop.is_set():
        unexpected: Exception | None = None
        try:
            v = pull_once(base_url, dest, token, opener, keep=keep, deadline_s=deadline_s)
        except AuthError:
            raise
        except TransientError as e:
            problem = str(e)
        except PullError as e:
            if str(e) != last_error:  # once per distinct problem, not every interval
                log.error("%s", e)
            last_error = str(e)
            stop.wait(interval)
            continue
        except Exception as e:  # noqa: BLE001 - a watcher outlives any one bad answer
            problem, unexpected = f"pull failed: {type(e).__name__}: {e}", e
        else:
            backoff.reset()
            last_error = ""
            if v is not None and v != last_version:
                last_version = v
                if on_version is not None:
                    on_version(v)
            stop.wait(interval)
            continue
        delay = backoff.next_delay()
        if problem != last_error:
            log.warning("%s; retrying in %.1f s", problem, delay, exc_info=unexpected)
        last_error = problem
        backoff.wait(delay)


# ---- command line ------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pull", help="mirror the daemon's newest snapshot into a folder (serving side)",
                              description="Download the newest snapshot from a streamkd daemon into DIR, "
                                          "verified and published atomically (DIR/LATEST, DIR/<version>/).")
    p.add_argument("url", metavar="URL", help="the daemon's base URL, e.g. http://127.0.0.1:9400")
    p.add_argument("dir", metavar="DIR", type=Path, help="local snapshot folder (created if missing)")
    p.add_argument("--watch", action="store_true", help="keep polling for new versions until Ctrl-C")
    p.add_argument("--interval", type=float, default=10.0, metavar="S",
                   help="seconds between polls (default: %(default)s)")
    p.add_argument("--keep", type=int, default=5, metavar="K", help="versions kept in DIR (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, metavar="S",
                   help="seconds one pull (manifest and every file) may take (default: %(default)s)")
    p.add_argument("--token", default=None, metavar="T",
                   help=f"bearer token for the snapshot routes (default: ${TOKEN_ENV})")
    p.set_defaults(func=_main)


def _pull_retrying(url: str, dest: Path, token: str | None, keep: int, deadline_s: float = DEADLINE_S,
                   attempts: int = 3) -> int | None:
    """One-shot pull; a transient failure (connection, 5xx, a version pruned meanwhile) is retried twice."""
    backoff = Backoff(1.0, 4.0)
    for attempt in range(attempts):
        try:
            return pull_once(url, dest, token, keep=keep, deadline_s=deadline_s)
        except TransientError as e:
            if attempt == attempts - 1:
                raise
            delay = backoff.next_delay()
            log.warning("%s; retrying in %.1f s", e, delay)
            backoff.wait(delay)
    return None


def _main(args: argparse.Namespace) -> int:
    from streamkd.logs import setup_logging

    if args.keep < 1:
        print(f"streamkd pull: --keep must be >= 1, got {args.keep}", file=sys.stderr)
        return 2
    if not args.interval > 0:
        print(f"streamkd pull: --interval must be > 0, got {args.interval}", file=sys.stderr)
        return 2
    if not args.deadline > 0:
        print(f"streamkd pull: --deadline must be > 0, got {args.deadline}", file=sys.stderr)
        return 2
    if not re.match(r"https?://", args.url):
        print(f"streamkd pull: URL must start with http:// or https://, got {args.url!r}", file=sys.stderr)
        return 2
    if args.dir.exists() and not args.dir.is_dir():
        print(f"streamkd pull: {args.dir} exists and is not a directory", file=sys.stderr)
        return 2
    setup_logging("text", "INFO")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        if args.watch:
            watch(args.url, args.dir, interval=args.interval, keep=args.keep, token=token,
                  on_version=lambda v: print(f"{args.dir / str(v)}", flush=True), deadline_s=args.deadline)
            return 0
        v = _pull_retrying(args.url, args.dir, token, args.keep, args.deadline)
    except KeyboardInterrupt:
        return 0
    except AuthError as e:
        print(f"streamkd pull: {e}", file=sys.stderr)
        return 2
    except PullError as e:
        print(f"streamkd pull: {e}", file=sys.stderr)
        return 1
    if v is None:
        print(f"streamkd pull: {args.url} has no snapshot yet", file=sys.stderr)
        return 0
    print(f"{args.dir / str(v)}", flush=True)
    return 0
