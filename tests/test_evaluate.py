"""Evaluation: accuracy and agreement on real Fashion-MNIST images, and the `streamkd eval` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamkd import cli
from streamkd.commands.datasets import load_fashion_mnist
from streamkd.commands.evaluate import spec_from_manifest
from streamkd.learn import models as models_mod
from streamkd.learn.evaluation import agreement, evaluate, predict
from streamkd.learn.learner import InputSpec
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model
from streamkd.learn.preprocess import to_model_input
from streamkd.state.snapshot import SnapshotStore

SPEC = InputSpec((28, 28), 1, FMNIST_MEAN, FMNIST_STD)


def lenet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist("test", download=False)
    return x[:200], y[:200]


def hand_predictions(model: torch.nn.Module, images: torch.Tensor, spec: InputSpec) -> list[int]:
    """The obvious way: all images in one forward, then a Python argmax per row."""
    model.eval()
    with torch.no_grad():
        logits = model(to_model_input(images, spec.size, spec.channels, spec.mean, spec.std)).tolist()
    return [max(range(len(row)), key=row.__getitem__) for row in logits]


def test_accuracy_equals_a_hand_loop(data) -> None:
    images, labels = data
    model = lenet(3).train()
    hand = hand_predictions(lenet(3), images, SPEC)
    want = sum(int(p == y) for p, y in zip(hand, labels.tolist(), strict=False)) / 200
    got = evaluate(model, images, labels, SPEC, batch_size=64)  # 64 does not divide 200: a short last batch
    assert got == {"acc": want, "n": 200}
    assert model.training  # mode restored


def test_agreement_equals_a_hand_loop(data) -> None:
    images, _ = data
    a, b = lenet(1), lenet(2)
    pa, pb = hand_predictions(lenet(1), images, SPEC), hand_predictions(lenet(2), images, SPEC)
    want = sum(int(x == y) for x, y in zip(pa, pb, strict=False)) / 200
    assert agreement(a, b, images, SPEC, batch_size=77) == {"agreement": want, "n": 200}
    assert agreement(a, a, images, SPEC)["agreement"] == 1.0
    # Each model gets its own preprocessing: a 3-channel 32 px model on the same 1-channel images.
    rgb = build_model("streamkd:lenet5", 10, in_channels=3, input_size=(32, 32))
    spec_rgb = InputSpec((32, 32), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert predict(rgb, images[:10], spec_rgb).shape == (10,)
    prgb = hand_predictions(rgb, images, spec_rgb)
    want = sum(int(x == y) for x, y in zip(pa, prgb, strict=False)) / 200
    assert agreement(a, rgb, images, SPEC, spec_rgb) == {"agreement": want, "n": 200}
    # With the 1-channel spec the 3-channel model could not run at all: the second spec is what it used.
    with pytest.raises(RuntimeError):
        agreement(a, rgb, images, SPEC)


def test_predict_runs_under_autocast_when_asked(data) -> None:
    images, _ = data
    model = lenet(4)
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    fp32 = predict(model, images[:16], SPEC, batch_size=8)
    assert seen == [torch.float32, torch.float32]
    seen.clear()
    bf16 = predict(model, images[:16], SPEC, batch_size=8, amp=torch.bfloat16)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert bf16.dtype == fp32.dtype == torch.int64 and bf16.shape == fp32.shape == (16,)


def publish_student(root: Path, model: torch.nn.Module) -> dict:
    m = {"step": 50, "samples_seen": 1600,
         "student": {"model": "streamkd:lenet5", "num_classes": 10, "input_shape": [1, 1, 28, 28], "channels": 1,
                     "input_size": [28, 28], "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD)},
         "metrics": {"agreement": 0.5, "kd_loss": 1.0}}
    return SnapshotStore(root).publish(model.state_dict(), m)


def test_cli_json_matches_the_functions(data, tmp_path, capsys) -> None:
    images, labels = data
    student, teacher = lenet(4), lenet(5)
    manifest = publish_student(tmp_path / "snap", student)
    assert spec_from_manifest(manifest["student"]) == InputSpec((28, 28), 1, FMNIST_MEAN, FMNIST_STD)
    weights = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(weights))

    for where in (tmp_path / "snap", tmp_path / "snap" / "1"):
        assert cli.main(["eval", str(where), "--limit", "200", "--json",
                         "--teacher", "streamkd:lenet5", "--teacher-weights", str(weights)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["version"] == 1 and out["n"] == 200 and out["split"] == "test"
        assert out["student"]["acc"] == evaluate(student, images, labels, SPEC)["acc"]
        assert out["teacher"]["acc"] == evaluate(teacher, images, labels, SPEC)["acc"]
        assert out["agreement"] == agreement(student, teacher, images, SPEC)["agreement"]


def test_cli_table_without_the_shipped_teacher(data, tmp_path, capsys, monkeypatch) -> None:
    images, labels = data
    publish_student(tmp_path / "snap", lenet(4))

    def missing() -> Path:
        raise FileNotFoundError("shipped teacher weights missing: (test)")

    monkeypatch.setattr(models_mod, "shipped_teacher_weights", missing)
    assert cli.main(["eval", str(tmp_path / "snap"), "--limit", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["snapshot", "dataset", "student", "teacher"]
    assert "not evaluated" in lines[3] and "50 images" in lines[1]
    want = evaluate(lenet(4), images[:50], labels[:50], SPEC)["acc"]  # --limit 50: the first 50 test images
    assert lines[2].split()[1] == f"{want:.4f}"


def test_cli_bad_input_exits_2(tmp_path, capsys) -> None:
    assert cli.main(["eval", str(tmp_path / "nothing"), "--no-teacher"]) == 2
    assert "no such directory" in capsys.readouterr().err
    publish_student(tmp_path / "snap", lenet(4))
    # A teacher with random weights would make the figures meaningless: refused, not silently used.
    assert cli.main(["eval", str(tmp_path / "snap"), "--teacher", "streamkd:lenet5"]) == 2
    assert "--teacher-weights" in capsys.readouterr().err


# ---- any labelled data: an ImageFolder-style directory, a labelled Kafka topic ------------------------


def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> None:
    from streamkd.commands.produce import encode_image

    for i, (img, y) in enumerate(zip(images, labels.tolist(), strict=False)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.png").write_bytes(encode_image(img)[0])


def test_cli_on_an_image_folder(data, tmp_path, capsys) -> None:
    images, labels = data
    images, labels = images[:120], labels[:120]
    names = [f"class-{k}" for k in range(10)]
    write_folder(tmp_path / "imgs", images, labels, names)
    (tmp_path / "imgs" / names[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "imgs" / names[0] / "README.txt").write_text("not an image: ignored")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    student, teacher = lenet(4), lenet(5)
    publish_student(tmp_path / "snap", student)
    weights = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(weights))

    assert cli.main(["eval", str(tmp_path / "snap"), "--folder", str(tmp_path / "imgs"), "--classes-file",
                     str(tmp_path / "classes.txt"), "--json", "--teacher", "streamkd:lenet5",
                     "--teacher-weights", str(weights)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 120 and out["skipped"] == {"corrupt": 1} and out["classes"] == names
    # PNG is lossless: the same images and labels as the arrays, so the same figures.
    assert out["student"]["acc"] == evaluate(student, images, labels, SPEC)["acc"]
    assert out["teacher"]["acc"] == evaluate(teacher, images, labels, SPEC)["acc"]
    assert out["agreement"] == agreement(student, teacher, images, SPEC)["agreement"]

    # The class order decides the labels: the same folders under another order score differently.
    shifted = names[1:] + names[:1]
    assert cli.main(["eval", str(tmp_path / "snap"), "--folder", str(tmp_path / "imgs"), "--classes",
                     ",".join(shifted), "--json", "--no-teacher"]) == 0
    out2 = json.loads(capsys.readouterr().out)
    want = evaluate(student, images, (labels - 1) % 10, SPEC)["acc"]
    assert out2["student"]["acc"] == want != out["student"]["acc"]


def test_cli_folder_needs_a_known_class_order(data, tmp_path, capsys) -> None:
    images, labels = data
    write_folder(tmp_path / "imgs", images[:20], labels[:20], [f"c{k}" for k in range(10)])
    publish_student(tmp_path / "snap", lenet(4))
    base = ["eval", str(tmp_path / "snap"), "--folder", str(tmp_path / "imgs"), "--no-teacher"]
    assert cli.main(base) == 2
    assert "--classes" in capsys.readouterr().err
    assert cli.main([*base, "--classes", "c0,c1"]) == 2  # folders c2.. are not in the list
    assert "not in the class list" in capsys.readouterr().err
    assert cli.main([*base, "--classes", ",".join(f"c{k}" for k in range(11))]) == 2  # more than the student has
    assert "11 class names" in capsys.readouterr().err


@pytest.mark.kafka
def test_cli_on_a_labelled_kafka_topic(broker, topic, data, tmp_path, capsys) -> None:
    from conftest import fmnist_pngs, produce_values

    images, labels = data
    values, headers = fmnist_pngs(60, labels=True)
    unlabelled, _ = fmnist_pngs(5, start=100)
    all_values = values + unlabelled + [b"garbage"]
    produce_values(broker.bootstrap, topic, all_values, headers=lambda i: headers(i) if i < 60 else [])
    student = lenet(4)
    publish_student(tmp_path / "snap", student)
    assert cli.main(["eval", str(tmp_path / "snap"), "--topic", topic, "--bootstrap-servers", broker.bootstrap,
                     "--json", "--no-teacher"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 60 and out["dataset"] == f"kafka {topic}"
    assert out["skipped"] == {"no_label": 5, "unknown_format": 1}
    assert out["student"]["acc"] == evaluate(student, images[:60], labels[:60], SPEC)["acc"]
