"""The README's onnxruntime serving example, run verbatim against a real snapshot, so it cannot rot.

The code block after the line mentioning the "onnxruntime example" in README.md is extracted,
its two paths (the `streamkd pull` folder and the image) are pointed at a snapshot published by
SnapshotStore with a model.onnx from the daemon's own exporter hook and manifest builder, and
at a real Fashion-MNIST PNG. It runs in a fresh interpreter; its printed class must be the
PyTorch student's argmax on the daemon's own preprocessing, and its logits must match.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO

from streamkd import daemon
from streamkd.commands.datasets import load_fashion_mnist
from streamkd.commands.produce import encode_image
from streamkd.config import load_config
from streamkd.learn.models import build_model
from streamkd.learn.preprocess import to_model_input
from streamkd.serve.export import snapshot_exporters
from streamkd.state.snapshot import SnapshotStore

README = REPO / "README.md"
MARKER = "onnxruntime example"
MODELS_LITERAL, IMAGE_LITERAL = '"models"', '"shirt.png"'  # the paths the example names


def readme_example(path: Path = README) -> str:
    """The first ```python block after the line that mentions the onnxruntime example."""
    lines = path.read_text(encoding="utf-8").splitlines()
    marker = [i for i, line in enumerate(lines) if MARKER in line]
    assert marker, f"no line in {path.name} mentions the {MARKER!r}"
    start = next((i for i in range(marker[0], len(lines)) if lines[i].strip() == "```python"), None)
    assert start is not None, f"no ```python block after the {MARKER!r} line of {path.name}"
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[start + 1:end]) + "\n"


def substitute(code: str, models: Path, image: Path) -> str:
    for literal, value in ((MODELS_LITERAL, models), (IMAGE_LITERAL, image)):
        assert code.count(literal) == 1, f"the README example should name {literal} exactly once:\n{code}"
        code = code.replace(literal, repr(str(value)))
    return code


def trained_student(channels: int, mean: list[float], std: list[float], images: torch.Tensor,
                    labels: torch.Tensor) -> torch.nn.Module:
    """A lenet5 after a few SGD steps on real images, so its logits are not near-zero noise."""
    torch.manual_seed(0)
    model = build_model("streamkd:lenet5", 10, in_channels=channels, input_size=(28, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(10):
        xb = to_model_input(images[64 * i: 64 * (i + 1)], (28, 28), channels, mean, std)
        loss = torch.nn.functional.cross_entropy(model(xb), labels[64 * i: 64 * (i + 1)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def colour(gray: torch.Tensor) -> torch.Tensor:
    """uint8 N×1×H×W -> N×3×H×W with different content per channel (a channel mix-up shows)."""
    return torch.cat([gray, 255 - gray, gray // 2], dim=1)


def test_readme_example_exists_and_uses_only_the_manifest():
    code = readme_example()
    assert "manifest.json" in code and "model.onnx" in code and "LATEST" in code
    tree = ast.parse(code)  # also: it is valid Python
    imports = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imports == {"json", "numpy", "onnxruntime", "PIL"}, f"the example should need only these: {imports}"


@pytest.mark.parametrize("channels, overrides", [
    (1, []),  # the shipped default: Fashion-MNIST gray, mean/std of one value
    (3, ["student.channels=3", "student.mean=[0.3,0.6,0.2]", "student.std=[0.4,0.3,0.2]"]),
])
def test_readme_onnxruntime_example_matches_pytorch(tmp_path, channels, overrides):
    cfg = load_config(None, overrides, env={})
    mean, std = list(cfg.student_mean), list(cfg.student_std)
    images, labels = load_fashion_mnist("test", download=False)
    if channels == 3:
        images = colour(images)
    model = trained_student(channels, mean, std, images[1000:1640], labels[1000:1640])

    # A snapshot as the daemon publishes it: its manifest builder, its ONNX exporter hook.
    c, (h, w) = cfg.student_channels, cfg.student_input_size
    prog = SimpleNamespace(step=20, samples_seen=640, offsets={0: 640}, agreement=0.9, kd_loss=0.3,
                           label_accuracy=None)
    parts = SimpleNamespace(num_classes=10, teacher_info={"model": cfg.teacher.model})
    models = tmp_path / "models"
    store = SnapshotStore(models)
    manifest = store.publish(model.state_dict(), daemon.manifest(cfg, parts.num_classes, parts.teacher_info, prog),
                             extra_files=snapshot_exporters(model, (1, c, h, w), ["onnx"]))
    assert "model.onnx" in manifest["files"]

    # A real image the student is decided about (top-1 clear of top-2), as a PNG file.
    with torch.no_grad():
        logits = model(to_model_input(images[:64], (h, w), c, mean, std))
    top2 = logits.topk(2, dim=1).values
    index = int(((top2[:, 0] - top2[:, 1]) > 0.05).nonzero()[0])
    want = logits[index]
    png = tmp_path / "image.png"
    png.write_bytes(encode_image(images[index])[0])

    out = tmp_path / "logits.npy"
    script = tmp_path / "serve.py"
    script.write_text(substitute(readme_example(), models, png)
                      + f"\nnp.save({str(out)!r}, logits)  # test epilogue: the example's logits\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout.strip().splitlines()
    assert printed and printed[-1] == str(int(want.argmax())), (printed, want)

    got = torch.from_numpy(np.load(out))
    assert got.shape == (1, manifest["student"]["num_classes"])
    assert torch.allclose(got[0], want, atol=1e-4 * max(1.0, float(want.abs().max()))), (got, want)
