"""DDP: a 2-process gloo run on the CPU through distributed_train.sh (torchrun)."""
from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, TINY_RUN, subprocess_env, summary_epochs
from sequencer.models.loading import read_checkpoint


@pytest.mark.slow
def test_two_process_gloo_run(image_folder, tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "distributed_train.sh"), "2", str(image_folder), *map(str, TINY_RUN),
         "--output", str(tmp_path), "--experiment", "ddp", "--epochs", "2", "--mixup", "0.5", "--model-ema"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 processes" in out
    assert out.count("epoch 1: train_loss") == 1  # only rank 0 logs epochs
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # only rank 0 writes, one experiment folder
    folder = tmp_path / "ddp"
    assert summary_epochs(folder) == [0, 1]
    ckpt = read_checkpoint(folder / "last.pth.tar")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # saved unwrapped from DDP
    assert len(ckpt["rng_state"]) == 2  # one RNG state per rank
    assert ckpt["args"]["batch_size"] == 8
