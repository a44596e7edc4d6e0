"""`streamkd demo` end to end on a small --limit: embedded broker, real images, final table, a snapshot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

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
    assert 0.0 < float(rows["student accuracy (test, 10k)"]) <= 1.0
    assert rows["images"] == "400"
    latest = (state / "snapshots" / "LATEST").read_text().strip()
    assert (state / "snapshots" / latest / "model.safetensors").is_file()
    assert (state / "snapshots" / latest / "manifest.json").is_file()
