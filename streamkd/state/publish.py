"""Copy published snapshots to object storage (``snapshot.publish_to``: an fsspec URL such as
``s3://bucket/models/student``, ``gs://…`` or ``file:///srv/models/student``).

Each version is uploaded in the order a reader can rely on, as on disk: the
version's files, its ``manifest.json`` last among them, then ``config.pbtxt``
(Triton's model config, beside the version folders), then ``LATEST``. A reader
that follows ``LATEST`` therefore finds a complete version. Versions beyond
``keep`` are then removed from the bucket.

Uploads run on one background thread and never block training. The queue
holds one version: a newer snapshot replaces one still waiting (newest wins;
LATEST only ever moves forward). A failed upload is retried with exponential
backoff (with jitter, capped) until it succeeds, a newer version replaces it,
or the uploader is closed. The remote side needs the ``s3`` extra
(``pip install 'streamkd[s3]'``: fsspec and s3fs) or fsspec's backend for the
URL's scheme (gcsfs for ``gs://``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from streamkd.backoff import Backoff
from streamkd.state.layout import LATEST_FILE, MANIFEST_FILE, MODEL_LEVEL_FILES, is_version, safe_name

__all__ = ["Uploader", "open_target"]

log = logging.getLogger(__name__)


def open_target(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, root path) for `url`; `options` go to the filesystem (e.g. s3fs's
    ``client_kwargs: {endpoint_url: ...}``). Raises ValueError for a URL fsspec cannot open."""
    try:
        import fsspec
    except ImportError:
        raise ValueError("snapshot.publish_to needs fsspec: pip install 'streamkd[s3]'") from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(options or {}))
    except (ImportError, ValueError) as e:  # unknown scheme, or its backend (s3fs, gcsfs) not installed
        raise ValueError(f"snapshot.publish_to={url!r}: {e}") from None
    return fs, root.rstrip("/")


class Uploader:
    """Uploads snapshot versions to `url` on a background thread (see the module docstring)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *, keep: int = 5,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
                 on_uploaded: Callable[[int], None] | None = None) -> None:
        self.fs, self.root = open_target(url, options)
        self.url, self.keep = url, keep
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self._stop = threading.Event()  # set by close(): ends a wait between retries at once
        self.on_uploaded = on_uploaded
        self.uploaded: int | None = None  # newest version whose LATEST write succeeded
        self.failures = 0  # failed attempts so far (each is retried)
        self._local = "file" in _protocols(self.fs) or "local" in _protocols(self.fs)
        self._cv = threading.Condition()
        self._pending: tuple[int, Path] | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="snapshot-upload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, version: int, version_dir: str | Path) -> None:
        """Queue `version` (its local folder) for upload; replaces a version still waiting. Never blocks."""
        with self._cv:
            if self._pending is not None:
                log.info("snapshot %d replaces %d in the upload queue", version, self._pending[0])
            self._pending = (version, Path(version_dir))
            self._cv.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is queued or uploading; False when `timeout` seconds ran out first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued upload (up to `timeout` seconds), then stop the thread."""
        if self._thread.is_alive() and not self.flush(timeout):
            log.warning("snapshot upload to %s unfinished after %.0f s; stopping", self.url, timeout)
        with self._cv:
            self._closed = True
            self._stop.set()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    # ---- the thread ----------------------------------------------------------

    def _loop(self) -> None:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s, stop=self._stop)
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                version, vdir = self._pending
                self._pending, self._busy = None, True
            try:
                self.upload(version, vdir)
                backoff.reset()
            except FileNotFoundError as e:  # pruned locally meanwhile: a newer version exists
                log.warning("snapshot %d left the local store before its upload finished (%s); skipped", version, e)
            except Exception as e:  # noqa: BLE001 - network, credentials, throttling: retry with backoff
                self.failures += 1
                wait = backoff.next_delay()
                log.warning("upload of snapshot %d to %s failed (%s: %s); retrying in %.1f s", version, self.url,
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", wait)
                with self._cv:
                    if self._pending is None:
                        self._pending = (version, vdir)  # retry it unless something newer arrived
                    self._busy = False
                    self._cv.notify_all()
                backoff.wait(wait)
                continue
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def upload(self, version: int, version_dir: Path) -> None:
        """One attempt: the version's files, manifest.json, model-level files, LATEST; then prune old versions."""
        manifest_bytes = (version_dir / MANIFEST_FILE).read_bytes()
        manifest = json.loads(manifest_bytes)
        names = sorted(n for n in manifest.get("files", {}) if safe_name(n))
        remote = f"{self.root}/{version}"
        if self._local:
            self.fs.makedirs(remote, exist_ok=True)
        for name in names:
            self.fs.put_file(str(version_dir / name), f"{remote}/{name}")
        self.fs.pipe_file(f"{remote}/{MANIFEST_FILE}", manifest_bytes)
        for name in MODEL_LEVEL_FILES:
            if name in names:
                self._write_atomic(f"{self.root}/{name}", (version_dir / name).read_bytes())
        self._write_atomic(f"{self.root}/{LATEST_FILE}", f"{version}\n".encode())
        self.uploaded = version
        log.info("uploaded snapshot %d to %s", version, self.url)
        if self.on_uploaded is not None:
            self.on_uploaded(version)
        self._prune(version)

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self._local:  # a local rename is atomic; an object store PUT already is
            tmp = f"{path}.tmp-upload"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _prune(self, head: int) -> None:
        try:
            self.fs.invalidate_cache(self.root)
            entries = self.fs.ls(self.root, detail=False)
        except Exception as e:  # noqa: BLE001 - pruning is best effort
            log.warning("could not list %s to prune old snapshots: %s", self.url, e)
            return
        versions = sorted(int(n) for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in entries) if is_version(n))
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v == head:
                continue
            try:
                self.fs.rm(f"{self.root}/{v}", recursive=True)
            except Exception as e:  # noqa: BLE001
                log.warning("could not remove old snapshot %d from %s: %s", v, self.url, e)


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
