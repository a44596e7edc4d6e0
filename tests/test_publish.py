"""Snapshots uploaded to object storage: moto's S3 server with the real s3fs client, outages included."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from streamkd.config import ConfigError, SnapshotConfig, load_config
from streamkd.state.publish import Uploader
from streamkd.state.snapshot import SnapshotStore

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """moto's standalone S3 server on a fixed loopback port, stoppable and restartable (state survives)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def options(self) -> dict:
        return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}}}

    def fs(self):
        return s3fs.S3FileSystem(**self.options())


@pytest.fixture
def s3():
    server = S3()
    server.start()
    # moto keeps its state in the process: start every test from an empty S3.
    urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST"), timeout=10)
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(16, 8), "b": torch.randn(16)}


def config_writer(path: Path) -> None:
    path.write_text('platform: "onnxruntime_onnx"\n')


def store_for(tmp_path: Path, s3: S3, keep: int = 5, prefix: str = "student") -> SnapshotStore:
    cfg = SnapshotConfig(dir=str(tmp_path / "snap"), keep=keep, publish_to=f"s3://{BUCKET}/{prefix}",
                         publish_options=s3.options(), publish_backoff_max_s=0.5)
    return SnapshotStore.from_config(cfg)


def remote_text(s3: S3, key: str) -> str:
    return s3.fs().cat_file(f"{BUCKET}/{key}").decode()


def remote_versions(s3: S3, prefix: str = "student") -> list[int]:
    fs = s3.fs()
    return sorted(int(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{BUCKET}/{prefix}", detail=False)
                  if p.rsplit("/", 1)[-1].isdigit())


def check_complete(s3: S3, version: int, prefix: str = "student") -> dict:
    """The remote version's manifest, after checking every file it lists against its sha256."""
    fs = s3.fs()
    manifest = json.loads(fs.cat_file(f"{BUCKET}/{prefix}/{version}/manifest.json"))
    assert manifest["version"] == version
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(fs.cat_file(f"{BUCKET}/{prefix}/{version}/{name}")).hexdigest() == digest
    return manifest


def test_files_first_then_latest(tmp_path, s3) -> None:
    store = store_for(tmp_path, s3)
    calls: list[str] = []
    fs = store.uploader.fs
    real_put, real_pipe = fs.put_file, fs.pipe_file
    fs.put_file = lambda lpath, rpath, **kw: (calls.append(rpath.rsplit("/", 1)[-1]), real_put(lpath, rpath, **kw))
    fs.pipe_file = lambda path, data, **kw: (calls.append(path.rsplit("/", 1)[-1]), real_pipe(path, data, **kw))
    m = store.publish(weights(1), {"step": 1}, extra_files={"config.pbtxt": config_writer})
    assert store.uploader.flush(30)
    store.close()
    # The version's files, its manifest, the model-level config, and LATEST last (as on disk).
    assert calls == ["config.pbtxt", "model.safetensors", "manifest.json", "config.pbtxt", "LATEST"]
    assert remote_text(s3, "student/LATEST").strip() == "1"
    assert check_complete(s3, 1)["files"] == m["files"]
    assert remote_text(s3, "student/config.pbtxt") == 'platform: "onnxruntime_onnx"\n'


def test_outage_while_publishing(tmp_path, s3) -> None:
    store = store_for(tmp_path, s3)
    store.publish(weights(1), {"step": 1})
    assert store.uploader.flush(30)
    s3.stop()
    t = time.monotonic()
    store.publish(weights(2), {"step": 2})
    assert time.monotonic() - t < 2.0  # the upload does not hold up the publisher (nor training)
    deadline = time.monotonic() + 30
    while store.uploader.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.uploader.failures >= 2  # retried while the server is down
    assert not store.uploader.flush(0.5)
    s3.start()
    assert store.uploader.flush(60), "the upload did not arrive after the server came back"
    store.close()
    assert remote_text(s3, "student/LATEST").strip() == "2"
    check_complete(s3, 2)
    assert remote_versions(s3) == [1, 2]


def test_newest_wins_during_an_outage(tmp_path, s3) -> None:
    store = store_for(tmp_path, s3)
    s3.stop()
    for i in range(1, 6):
        store.publish(weights(i), {"step": i})
    s3.start()
    assert store.uploader.flush(60)
    store.close()
    assert remote_text(s3, "student/LATEST").strip() == "5"
    check_complete(s3, 5)
    # Versions replaced in the queue are never sent: at most the one in flight when the server came back
    # arrives besides the newest.
    assert 5 in remote_versions(s3) and len(remote_versions(s3)) <= 2


def test_remote_keeps_the_newest_versions(tmp_path, s3) -> None:
    store = store_for(tmp_path, s3, keep=2)
    for i in (1, 2, 3):
        store.publish(weights(i), {"step": i})
        assert store.uploader.flush(30)
    store.close()
    assert remote_versions(s3) == [2, 3]


def test_file_url(tmp_path) -> None:
    target = tmp_path / "bucket" / "student"
    up = Uploader(f"file://{target}", keep=5)
    up.start()
    store = SnapshotStore(tmp_path / "snap", on_published=up.submit)
    m = store.publish(weights(1), {"step": 1}, extra_files={"config.pbtxt": config_writer})
    assert up.flush(30)
    up.close()
    assert (target / "LATEST").read_text() == "1\n"
    assert (target / "config.pbtxt").is_file()
    assert json.loads((target / "1" / "manifest.json").read_text())["files"] == m["files"]
    # The uploaded folder is itself a snapshot directory that the store can read and verify.
    assert SnapshotStore(target).latest()["version"] == 1


def test_config_keys(tmp_path) -> None:
    with pytest.raises(ConfigError, match="snapshot.publish_to"):
        load_config(None, ["snapshot.publish_to=bucket/prefix"])
    cfg = load_config(None, ["snapshot.publish_to=s3://b/p",
                             "snapshot.publish_options={key: AKIA, secret: s3cr3t, client_kwargs: {region_name: x}}"])
    shown = cfg.to_dict()["snapshot"]["publish_options"]
    assert shown == {"key": "***", "secret": "***", "client_kwargs": {"region_name": "x"}}
    with pytest.raises(ValueError, match="snapshot.publish_to"):
        SnapshotStore.from_config(SnapshotConfig(dir=str(tmp_path), publish_to="nosuchscheme://x/y"))
