"""The benchmark scripts run and print the JSON contract (sizes too small for the numbers to mean anything).

The GPU check (``bench/gpu_check.sh``) runs these same scripts on a leased GPU with little time to
spare, so a script that breaks must fail here first. No timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_throughput_smoke_prints_the_contract():
    result = run_bench("bench/throughput.py", "--preset", "cpu", "--smoke", "--naive-records", "32")
    for key in ("preset", "device", "e2e_img_s", "compute_only_img_s", "naive_img_s", "ratio_vs_compute",
                "speedup_vs_naive", "rss_mb", "teacher_only_img_s", "student_step_img_s", "teacher_precision"):
        assert key in result, key
    assert result["preset"] == "cpu" and result["device"].startswith("cpu")
    assert result["trained"] == result["records"] == 600  # the e2e run trained every record it timed
    assert result["ratio_vs_compute"] == round(result["e2e_img_s"] / result["compute_only_img_s"], 3)
    assert all(result[k] > 0 for k in ("e2e_img_s", "compute_only_img_s", "naive_img_s", "rss_mb"))
    parts = [result[f"loop_{k}_ms"] for k in ("wait", "teacher", "student", "other")]
    assert all(v >= 0 for v in parts[:3])  # where the loop thread's time per batch went
    assert abs(sum(parts) - result["loop_batch_ms"]) < 0.01


def test_student_step_matrix_runs_each_variant():
    result = run_bench("bench/student_step.py", "--model", "streamkd:lenet5", "--size", "28", "--channels", "1",
                       "--batch", "8", "--steps", "2", "--no-compile", "--device", "cpu")
    for name in ("auto_cl", "fp32_cl", "auto", "fp32"):
        assert result[name] > 0, name
    assert result["auto_cl_ratio"] == 1.0
