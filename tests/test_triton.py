"""Triton-ready snapshots: config.pbtxt parsed with Triton's own ModelConfig protobuf, models run with its shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model
from streamkd.serve.export import SnapshotExports
from streamkd.serve.triton import CONFIG_FILE, model_config
from streamkd.state.snapshot import SnapshotStore

STUDENT = {"model": "streamkd:lenet5", "num_classes": 10, "input_shape": [1, 1, 28, 28], "channels": 1,
           "input_size": [28, 28], "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD)}


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A Triton model repository whose model folder `student` is the snapshot directory itself."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28)).eval()
    store = SnapshotStore(root / "student")
    store.publish(model.state_dict(), {"student": STUDENT},
                  write_extras=SnapshotExports(STUDENT, ["onnx", "torchscript"], triton_max_batch_size=16))
    return root, model


def test_layout_is_a_triton_model_folder(repo) -> None:
    root, _ = repo
    model_dir = root / "student"
    # <repository>/<model>/config.pbtxt and <repository>/<model>/<version>/model.onnx
    assert (model_dir / CONFIG_FILE).is_file() and (model_dir / "1" / "model.onnx").is_file()
    assert (model_dir / "1" / "model.pt").is_file()  # the file name Triton's libtorch backend loads
    assert (model_dir / CONFIG_FILE).read_bytes() == (model_dir / "1" / CONFIG_FILE).read_bytes()


def test_config_parses_as_triton_model_config(repo) -> None:
    root, _ = repo
    cfg = parse((root / "student" / CONFIG_FILE).read_text())
    assert cfg.name == ""  # Triton takes the folder's name
    assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
    assert cfg.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("input", model_config_pb2.TYPE_FP32, [1, 28, 28])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        ("logits", model_config_pb2.TYPE_FP32, [10])]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.version_policy.latest.num_versions == 1


def test_onnx_runs_with_the_declared_shapes(repo) -> None:
    import onnxruntime as ort

    root, model = repo
    cfg = parse((root / "student" / CONFIG_FILE).read_text())
    sess = ort.InferenceSession(str(root / "student" / "1" / cfg.default_model_filename),
                                providers=["CPUExecutionProvider"])
    (inp,), (out,) = cfg.input, cfg.output
    for batch in (1, cfg.max_batch_size):  # Triton sends [batch] + dims, batch up to max_batch_size
        x = np.random.default_rng(batch).standard_normal((batch, *inp.dims)).astype(np.float32)
        (got,) = sess.run([out.name], {inp.name: x})
        assert got.shape == (batch, *out.dims) and got.dtype == np.float32
        with torch.no_grad():
            assert np.abs(got - model(torch.from_numpy(x)).numpy()).max() < 1e-4


def test_torchscript_config_uses_libtorch_names(repo) -> None:
    root, model = repo
    cfg = parse(model_config("torchscript", STUDENT, max_batch_size=8))
    assert cfg.platform == "pytorch_libtorch" and cfg.default_model_filename == "model.pt"
    (inp,), (out,) = cfg.input, cfg.output
    assert (inp.name, out.name) == ("input__0", "logits__0")  # libtorch maps <name>__<index> to positions
    loaded = torch.jit.load(str(root / "student" / "1" / cfg.default_model_filename))
    x = torch.randn(cfg.max_batch_size, *inp.dims)
    with torch.no_grad():
        y = loaded(x)
        assert tuple(y.shape) == (cfg.max_batch_size, *out.dims)
        assert (y - model(x)).abs().max() < 1e-4


def test_fixed_batch_export_gets_no_batching() -> None:
    cfg = parse(model_config("onnx", STUDENT, dynamic_batch=False))
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 1, 28, 28] and list(cfg.output[0].dims) == [1, 10]


def test_torchscript_first_when_listed_first_and_no_config_without_a_servable_format(tmp_path) -> None:
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    ts = SnapshotStore(tmp_path / "ts")
    m = ts.publish(model.state_dict(), {"student": STUDENT},
                   write_extras=SnapshotExports(STUDENT, ["torchscript"]))
    assert parse((tmp_path / "ts" / CONFIG_FILE).read_text()).platform == "pytorch_libtorch"
    assert "model.onnx" not in m["files"]
    pt2 = SnapshotStore(tmp_path / "pt2")
    m = pt2.publish(model.state_dict(), {"student": STUDENT}, write_extras=SnapshotExports(STUDENT, ["pt2"]))
    assert "model.pt2" in m["files"] and CONFIG_FILE not in m["files"]
    assert not (tmp_path / "pt2" / CONFIG_FILE).exists()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Only onnx, torchscript"):
        model_config("pt2", STUDENT)
    with pytest.raises(ValueError, match="max_batch_size"):
        model_config("onnx", STUDENT, max_batch_size=0)


def test_pull_into_a_triton_repository(repo, tmp_path) -> None:
    """`streamkd pull URL REPO/MODEL` writes a model folder Triton can poll: config.pbtxt beside the versions."""
    from prometheus_client import CollectorRegistry

    from streamkd.serve.pull import pull_once
    from streamkd.serve.server import HttpServer

    root, _ = repo
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                        snapshots=SnapshotStore(root / "student"))
    server.start()
    try:
        assert pull_once(f"http://127.0.0.1:{server.port}", tmp_path / "models" / "fmnist") == 1
    finally:
        server.stop()
    model_dir = tmp_path / "models" / "fmnist"
    assert parse((model_dir / CONFIG_FILE).read_text()).platform == "onnxruntime_onnx"
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "1" / "model.pt").is_file()
