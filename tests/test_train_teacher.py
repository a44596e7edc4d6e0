import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from streamkd.commands import datasets
from streamkd.commands import train_teacher as tt
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model, file_sha256, num_classes_of
from streamkd.learn.preprocess import to_model_input

# The teacher costs ~0.12 GMAC per image, so on a small shared CPU even a few
# images take about a second: these runs use --limit 64 (two steps), not 256.
needs_data = pytest.mark.skipif(
    not (datasets.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


@needs_data
def test_quick_run_writes_loadable_weights_and_manifest(tmp_path):
    out = tmp_path / "teacher.safetensors"
    lines = []
    manifest = tt.train_teacher(out, epochs=1, batch_size=32, lr=0.05, seed=0, device="cpu", limit=64,
                                log=lines.append, command="streamkd train-teacher --limit 64")
    assert len(lines) == 1 and lines[0].startswith("epoch   1/1") and "test_acc" in lines[0]

    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk == manifest
    assert manifest["sha256"] == file_sha256(out)
    assert manifest["architecture"] == "streamkd:fmnist_cnn" and manifest["params"] > 500_000
    assert manifest["train_samples"] == 64 and manifest["test_samples"] == 64
    assert manifest["epochs"] == 1 and manifest["seed"] == 0
    assert manifest["command"] == "streamkd train-teacher --limit 64"
    assert manifest["torch"] == torch.__version__ and manifest["device"] == "cpu"

    tensors = load_file(str(out))
    assert any(k.endswith("running_var") for k in tensors)  # BN buffers shipped
    assert all(v.device.type == "cpu" for v in tensors.values())
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if not k.endswith("num_batches_tracked"))
    model = build_model("streamkd:fmnist_cnn", 10, in_channels=1, input_size=(28, 28), weights=str(out))
    assert num_classes_of(model, (28, 28), 1) == 10
    # test_acc is the saved weights' accuracy on the first 64 test images, recomputed here through the
    # daemon's own preprocessing instead of train-teacher's.
    test_x, test_y = datasets.load_fashion_mnist("test", download=False)
    with torch.no_grad():
        pred = model.eval()(to_model_input(test_x[:64], (28, 28), 1, FMNIST_MEAN, FMNIST_STD)).argmax(1)
    assert manifest["test_acc"] == (pred == test_y[:64]).sum().item() / 64
    # the BN statistics moved away from their initial values: they were trained
    assert not torch.allclose(model.features[1].running_mean, torch.zeros(64))
    assert not list(tmp_path.glob("*.tmp"))


@needs_data
def test_same_seed_same_weights(tmp_path):
    kwargs = dict(epochs=1, batch_size=16, lr=0.05, device="cpu", limit=32, log=lambda _: None)
    a = tt.train_teacher(tmp_path / "a.safetensors", seed=3, **kwargs)
    b = tt.train_teacher(tmp_path / "b.safetensors", seed=3, **kwargs)
    assert a["sha256"] == b["sha256"]
    assert not torch.are_deterministic_algorithms_enabled()  # global flags restored


@needs_data
def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="streamkd")
    tt.register(parser.add_subparsers())
    out = tmp_path / "w.safetensors"
    args = parser.parse_args(["train-teacher", "--out", str(out), "--epochs", "1", "--limit", "32",
                              "--batch-size", "16", "--device", "cpu"])
    assert args.func(args) == 0
    assert "epoch   1/1" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == file_sha256(out)

    args = parser.parse_args(["train-teacher", "--out", str(out), "--epochs", "0"])
    assert args.func(args) == 2
    assert "epochs" in capsys.readouterr().err


def test_cli_defaults():
    parser = argparse.ArgumentParser(prog="streamkd")
    tt.register(parser.add_subparsers())
    args = parser.parse_args(["train-teacher"])
    assert (args.epochs, args.batch_size, args.lr, args.seed, args.device) == (30, 256, 0.1, 0, "auto")
    assert args.out == Path("teacher.safetensors") and args.limit is None  # the current directory


def test_cli_writes_into_the_package_only_when_asked(capsys):
    from streamkd.learn.models import WEIGHTS_DIR

    parser = argparse.ArgumentParser(prog="streamkd")
    tt.register(parser.add_subparsers())
    assert not parser.parse_args(["train-teacher"]).out.resolve().is_relative_to(WEIGHTS_DIR.resolve())
    assert parser.parse_args(["train-teacher", "--into-package"]).out == WEIGHTS_DIR / "fmnist_cnn.safetensors"
    with pytest.raises(SystemExit):
        parser.parse_args(["train-teacher", "--into-package", "--out", "w.safetensors"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_missing_dataset_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_torchvision_download", lambda d: (_ for _ in ()).throw(OSError("offline")))
    parser = argparse.ArgumentParser(prog="streamkd")
    tt.register(parser.add_subparsers())
    args = parser.parse_args(["train-teacher", "--out", str(tmp_path / "w.safetensors"), "--device", "cpu"])
    assert args.func(args) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_augment_shapes_determinism_and_shift():
    x = torch.rand(8, 1, 28, 28)
    a = tt.augment(x, torch.Generator().manual_seed(0))
    b = tt.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    # without erasing, each output is a flipped/shifted copy of its input: a
    # single bright pixel lands within 2 px of (the mirror of) where it was
    img = torch.zeros(64, 1, 28, 28)
    img[:, 0, 10, 5] = 1.0
    out = tt.augment(img, torch.Generator().manual_seed(1), erase_p=0.0)
    bright = out.flatten(1).argmax(1)
    rows, cols = bright // 28, bright % 28
    assert ((rows - 10).abs() <= 2).all()
    assert (((cols - 5).abs() <= 2) | ((cols - 22).abs() <= 2)).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=False))) > 5  # it does move things around
    assert torch.allclose(out.flatten(1).max(1).values, torch.tensor((1 - 0.2860) / 0.3530))


def test_smoothed_cross_entropy_matches_torch():
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ref = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(tt.smoothed_cross_entropy(logits, labels, 0.1), ref)
