"""Export: a published snapshot -> ONNX / TorchScript / torch.export, checked against PyTorch on real images."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streamkd import cli
from streamkd.commands.datasets import load_fashion_mnist
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model
from streamkd.learn.preprocess import to_model_input
from streamkd.serve import export as export_mod
from streamkd.serve.export import (
    FORMATS,
    INPUT_NAME,
    OUTPUT_NAME,
    SnapshotExports,
    export_model,
    load_student,
    snapshot_exporters,
)
from streamkd.state.layout import SnapshotError, check_manifest_model_spec
from streamkd.state.snapshot import SnapshotStore

SHAPE = (1, 1, 28, 28)


def daemon_manifest(model: str = "streamkd:lenet5") -> dict:
    """Shaped like daemon.manifest(): what a server has to go on."""
    return {
        "step": 120, "samples_seen": 3840,
        "student": {"model": model, "num_classes": 10, "input_shape": list(SHAPE), "channels": 1,
                    "input_size": [28, 28], "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD),
                    "input_dtype": "float32", "preprocess": "x = (uint8 / 255 - mean) / std, NCHW"},
        "teacher": {"model": "streamkd:fmnist_cnn", "weights": None, "sha256": None, "num_classes": 10},
        "offsets": {"images": {"0": 40, "1": 41}},
        "metrics": {"agreement": 0.8, "kd_loss": 0.4, "label_accuracy": None},
        "config_sha256": "0" * 64,
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist("test", download=False)
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    """A lenet5 nudged by a few SGD steps on real images, so its logits are not near-zero noise."""
    torch.manual_seed(0)
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    x, y = load_fashion_mnist("test", download=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(15):
        xb = to_model_input(x[1000 + 64 * i: 1064 + 64 * i], (28, 28), 1, FMNIST_MEAN, FMNIST_STD)
        loss = torch.nn.functional.cross_entropy(model(xb), y[1000 + 64 * i: 1064 + 64 * i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def snap(tmp_path_factory, student) -> tuple[Path, dict]:
    """A snapshot store holding version 1 with every export format, as the daemon publishes it
    (exports made by the child process from the published weights)."""
    root = tmp_path_factory.mktemp("snap")
    store = SnapshotStore(root)
    m = daemon_manifest()
    manifest = store.publish(student.state_dict(), m,
                             write_extras=SnapshotExports(m["student"], ["onnx", "torchscript", "pt2"]))
    return root, manifest


def test_snapshot_exports_files_are_hashed_into_the_manifest(snap) -> None:
    root, m = snap
    vdir = root / "1"
    assert sorted(m["files"]) == ["config.pbtxt", "model.onnx", "model.pt", "model.pt2", "model.safetensors"]
    for name, digest in m["files"].items():
        assert sha(vdir / name) == digest
    # No temporaries or ONNX external-data companions: the ONNX file is self-contained.
    assert sorted(p.name for p in vdir.iterdir()) == sorted([*m["files"], "manifest.json"])
    assert SnapshotStore(root).latest()["files"] == m["files"]


def test_snapshot_exporters_rejects_unknown_format(student) -> None:
    with pytest.raises(ValueError, match="Invalid snapshot format 'tflite'.*onnx, torchscript, pt2"):
        snapshot_exporters(student, SHAPE, ["onnx", "tflite"])
    assert set(snapshot_exporters(student, SHAPE, ["pt2"])) == {FORMATS["pt2"]}


def test_load_student_roundtrip(snap, student) -> None:
    root, m = snap
    for where in (root, root / "1"):  # a snapshot root (LATEST) or a version folder
        model, manifest = load_student(where)
        assert manifest == m
        assert not model.training
        got, want = model.state_dict(), student.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_onnx_matches_pytorch_on_real_images_from_the_manifest_alone(snap, student, images) -> None:
    import onnx
    import onnxruntime as ort

    root, _ = snap
    path = root / "1" / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic batch axis

    # What a non-Python server does: read the manifest, normalise with numpy, run the file.
    s = json.loads((root / "1" / "manifest.json").read_text())["student"]
    x_u8, _ = images
    mean = np.asarray(s["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(s["std"], np.float32).reshape(1, -1, 1, 1)
    x_np = ((x_u8.numpy().astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    assert list(x_np.shape[1:]) == s["input_shape"][1:]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in sess.get_outputs()] == [OUTPUT_NAME]

    with torch.no_grad():  # the daemon's own preprocessing, in PyTorch
        want = student(to_model_input(x_u8, (28, 28), 1, FMNIST_MEAN, FMNIST_STD)).numpy()
    got64 = sess.run([OUTPUT_NAME], {INPUT_NAME: x_np})[0]
    got1 = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x_np[i:i + 1]})[0] for i in range(8)])
    diff = float(np.abs(got64 - want).max())
    print(f"onnx vs pytorch on 64 Fashion-MNIST test images: max abs diff {diff:.3g}, "
          f"max |logit| {np.abs(want).max():.2f}")
    assert got64.shape == (64, 10)
    assert diff < 1e-4
    assert np.abs(got1 - want[:8]).max() < 1e-4
    assert (got64.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", ["model.pt", "model.pt2"])
def test_torchscript_and_pt2_reload_and_match(snap, student, images, name) -> None:
    root, _ = snap
    path = root / "1" / name
    loaded = torch.jit.load(str(path)) if name.endswith(".pt") else torch.export.load(str(path)).module()
    x = to_model_input(images[0], (28, 28), 1, FMNIST_MEAN, FMNIST_STD)
    with torch.no_grad():
        for batch in (x[:1], x):  # batch 1 and 64: the batch axis is dynamic
            assert (loaded(batch) - student(batch)).abs().max().item() < 1e-4


def test_cli_exports_a_verified_file(snap, tmp_path, capsys) -> None:
    root, _ = snap
    out = tmp_path / "student.pt2"
    assert cli.main(["export", str(root), "--format", "pt2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "preprocess" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt2"]  # no temporaries left
    assert torch.export.load(str(out)).module()(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_cli_bad_input_exits_2(snap, tmp_path, capsys) -> None:
    root, _ = snap
    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["export", str(root), "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(root), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert e.value.code == 2


def test_tampered_snapshot_is_refused(snap, tmp_path, capsys) -> None:
    root, _ = snap
    copy = tmp_path / "7"
    copy.mkdir()
    for p in (root / "1").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit in the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="model.safetensors: sha256"):
        load_student(copy)
    assert cli.main(["export", str(copy), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "m.ts").exists()


def test_failed_verification_leaves_nothing(student, tmp_path, monkeypatch) -> None:
    real = export_mod._reload

    def off_by_a_bit(fmt, path):
        run = real(fmt, path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export_mod, "_reload", off_by_a_bit)
    out = tmp_path / "m.ts"
    with pytest.raises(RuntimeError, match="disagrees with PyTorch"):
        export_model(student, SHAPE, "torchscript", out)
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary


def test_export_keeps_the_callers_mode(tmp_path) -> None:
    model = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28)).train()
    report = export_model(model, SHAPE, "torchscript", tmp_path / "m.ts")
    assert model.training
    assert report["dynamic_batch"] and report["max_abs_diff"] < 1e-4
    with pytest.raises(ValueError, match="Invalid format"):
        export_model(model, SHAPE, "coreml", tmp_path / "m.x")


def test_onnx_falls_back_to_the_torchscript_exporter(student, tmp_path, monkeypatch) -> None:
    real = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated: onnxscript cannot translate this op")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    report = export_model(student, SHAPE, "onnx", tmp_path / "m.onnx")
    assert report["exporter"] == "torch.onnx (torchscript)"
    assert report["dynamic_batch"] and report["max_abs_diff"] < 1e-4
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("spec", ["FILE", "model.pt2", "streamkd:lenet5.pt2", "torchvision:../../x", "file:/x.ts",
                                  "streamkd:lenet5\n", None, 7])
def test_manifest_naming_a_model_file_is_never_loaded(tmp_path, monkeypatch, capsys, spec) -> None:
    from streamkd.learn import models

    # A real TorchScript file: loading one runs whatever code it was saved with.
    ts_file = tmp_path / "student.ts"
    lenet = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28)).eval()
    torch.jit.save(torch.jit.trace(lenet, torch.zeros(SHAPE)), str(ts_file))
    loaded: list[str] = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise AssertionError(f"loaded model file {spec}")

    monkeypatch.setattr(models, "_build_file_model", record)
    monkeypatch.setattr(torch.jit, "load", record)
    monkeypatch.setattr(torch.export, "load", record)
    root = tmp_path / "snap"
    SnapshotStore(root).publish(lenet.state_dict(), daemon_manifest(str(ts_file) if spec == "FILE" else spec))

    with pytest.raises(SnapshotError, match="student.model .* is refused"):
        load_student(root)
    assert cli.main(["export", str(root), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is refused" in capsys.readouterr().err
    assert cli.main(["eval", str(root), "--no-teacher", "--limit", "8"]) == 2
    assert "is refused" in capsys.readouterr().err
    assert loaded == [] and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("spec", ["streamkd:lenet5", "torchvision:mobilenet_v3_small", "torchvision:resnet18"])
def test_manifest_model_names_are_accepted(spec) -> None:
    assert check_manifest_model_spec(spec, "manifest.json") == spec


# ---- exports in a child process ----------------------------------------------------------


def test_snapshot_exports_never_run_in_the_calling_process(student, tmp_path, monkeypatch) -> None:
    """The exports come from another process: breaking every exporter here changes nothing."""
    def broken(*args, **kwargs):
        raise AssertionError("export ran in the training process")

    monkeypatch.setattr(export_mod, "export_model", broken)
    monkeypatch.setattr(torch.onnx, "export", broken)
    monkeypatch.setattr(torch.jit, "trace", broken)
    m = daemon_manifest()
    out = SnapshotStore(tmp_path).publish(student.state_dict(), m,
                                          write_extras=SnapshotExports(m["student"], ["onnx", "torchscript"]))
    assert {"model.onnx", "model.pt", "config.pbtxt"} <= set(out["files"])
    loaded = torch.jit.load(str(tmp_path / "1" / "model.pt"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (loaded(x) - student(x)).abs().max().item() < 1e-4


def test_a_failed_export_costs_only_its_file(student, tmp_path, caplog) -> None:
    """A child that runs past its time is killed; the snapshot is published without the exports."""
    m = daemon_manifest()
    store = SnapshotStore(tmp_path)
    with caplog.at_level("ERROR", logger="streamkd.serve.export"):
        out = store.publish(student.state_dict(), m,
                            write_extras=SnapshotExports(m["student"], ["onnx", "torchscript"], timeout_s=0.2))
    assert sorted(out["files"]) == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["manifest.json", "model.safetensors"]
    assert not (tmp_path / "config.pbtxt").exists()
    assert "export_timeout_s" in caplog.text and "publishing the snapshot without it" in caplog.text
    assert store.latest()["version"] == 1


def test_one_failing_format_keeps_the_others(student, tmp_path, caplog) -> None:
    """A student the exporter cannot rebuild fails every format, in the child, and is reported."""
    m = daemon_manifest()
    bad = {**m["student"], "num_classes": 7}  # the weights have 10 outputs: the child refuses to load them
    with caplog.at_level("ERROR", logger="streamkd.serve.export"):
        out = SnapshotStore(tmp_path).publish(student.state_dict(), m,
                                              write_extras=SnapshotExports(bad, ["torchscript"]))
    assert sorted(out["files"]) == ["model.safetensors"]
    assert "export process exited" in caplog.text and "does not fit" in caplog.text


def test_snapshot_exports_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="Invalid snapshot format 'tflite'"):
        SnapshotExports(daemon_manifest()["student"], ["onnx", "tflite"])


def test_cleanup_keeps_exactly_the_finished_files(tmp_path, monkeypatch) -> None:
    """After the child: a failed format's file and any temporary go, a finished one stays (model.pt2
    survives a failed model.pt although its name starts the same)."""
    def child(self, vdir):
        (vdir / "model.pt").write_bytes(b"half-written")
        (vdir / "model.pt2").write_bytes(b"exported")
        (vdir / ".tmp-model.pt.1234").mkdir()
        (vdir / ".tmp-model.pt.1234" / "model.pt").write_bytes(b"x")
        return {"torchscript": {"format": "torchscript", "ok": False, "error": "simulated"},
                "pt2": {"format": "pt2", "ok": True, "dynamic_batch": True}}

    monkeypatch.setattr(SnapshotExports, "_run_worker", child)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    SnapshotExports(daemon_manifest()["student"], ["torchscript", "pt2"])(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "model.safetensors"]
