"""`streamkd demo` end to end on a small --limit: embedded broker, real images, final table, a snapshot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from streamkd.commands.datasets import load_fashion_mnist
from streamkd.learn.models import FMNIST_MEAN, FMNIST_STD, build_model
from streamkd.learn.preprocess import to_model_input

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_prints_table_and_publishes(tmp_path):
    state = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "streamkd", "demo", "--limit", "400", "--port", "0", "--no-progress",
                        "--state-dir", str(state), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = r.stdout
    assert "streamkd demo result" in out
    rows = dict(re.findall(r"^  (.+?)\s{2,}(\S.*)$", out.split("streamkd demo result", 1)[1], re.M))
    for key in ("teacher accuracy (test, 10k)", "student accuracy (test, 10k)", "student / teacher",
                "agreement on test", "prequential agreement (stream)", "images", "images/s", "snapshots"):
        assert key in rows, (key, rows)
    assert float(rows["teacher accuracy (test, 10k)"]) > 0.93  # the shipped teacher
    student_acc = float(rows["student accuracy (test, 10k)"])
    # 400 images (14 steps) take the student well past chance (0.1 on 10 classes).
    assert student_acc > 0.2, rows
    assert rows["images"] == "400"
    latest = (state / "snapshots" / "LATEST").read_text().strip()
    assert (state / "snapshots" / latest / "manifest.json").is_file()
    # The printed accuracy is the published student's, recomputed here from the snapshot file alone
    # (two of 10,000 predictions may flip between the daemon's channels_last model and this one).
    student = build_model("streamkd:lenet5", 10, in_channels=1, input_size=(28, 28))
    student.load_state_dict(load_file(str(state / "snapshots" / latest / "model.safetensors")))
    images, labels = load_fashion_mnist("test", download=False)
    with torch.no_grad():
        pred = student.eval()(to_model_input(images, (28, 28), 1, FMNIST_MEAN, FMNIST_STD)).argmax(1)
    assert (pred == labels).float().mean().item() == pytest.approx(student_acc, abs=2e-4)
