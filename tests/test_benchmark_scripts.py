"""The benchmark scripts of ``benchmarks/`` run as a user runs them (a subprocess, on a tiny model) and write what
BENCHMARKS.md quotes; what they measure is not asserted here (speed is never a unit test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_deployment_script_writes_every_path_and_both_extra_lines(tmp_path):
    results = tmp_path / "deployment.json"
    cmd = [sys.executable, "benchmarks/deployment.py", "--models", "sequencer2d_nano", "--threads", "1",
           "--batches", "1", "2", "--num-iter", "1", "--memory-iter", "0", "--agreement-images", "4",
           "--train-batch", "2", "--train-iter", "1", "--trained-epochs", "1", "--results", str(results)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = json.loads(results.read_text())
    assert list(report["rows"]) == ["ours-fp32", "ours-fp32-1stream", "ours-bf16", "ours-fast", "ort-fp32",
                                    "ort-int8"]
    for impl, row in report["rows"].items():
        assert row["img_per_s_b1"] > 0 and row["img_per_s_b2"] > 0, impl
        if row["dtype"] == "float32":  # fp32 paths: the eager model's logits (the script itself refuses 1e-4)
            assert row["logit_err_b2"] < 1e-4, impl
    training = report["training"]
    assert training["batch"] == 2 and training["img_per_s_float32"] > 0 and training["img_per_s_bfloat16"] > 0
    trained = report["trained_agreement"]
    assert trained["images"] == 1797 and 0 <= trained["agreement"] <= 1  # bf16 rounding differs by CPU
    assert trained["flips"] == len(trained["flip_margins"]) == round((1 - trained["agreement"]) * 1797)
    table = proc.stdout[proc.stdout.index("| path |"):]
    assert "| img/s b2 | vs ORT fp32 b2 |" in table and "| ours-fp32-1stream |" in table
    assert "Training (AdamW, batch 2)" in table and "on a digits nano trained 1 epochs" in table
    rendered = subprocess.run([sys.executable, "benchmarks/deployment.py", "--render-only", "--results",
                               str(results)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0 and rendered.stdout.strip() in proc.stdout
