"""DDP: a 2-process gloo run on the CPU through distributed_train.sh (torchrun)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_torchrun_restarts_a_killed_worker_and_resumes(image_folder, tmp_path):
    """A worker dies mid-run (SIGKILL, as an OOM kill would): torchrun --max-restarts restarts the group and
    --resume auto continues from the last finished epoch; every epoch appears once."""
    # batch 2 and the full nano model: slow enough steps for the kill to land inside epoch 1
    slow = ["--model", "sequencer2d_nano", "--img-size", "16", "-b", "2", "-j", "0", "--log-interval", "1",
            "--device", "cpu", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--hflip", "0"]
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "sequencer", "train", str(image_folder), *slow, "--output", str(tmp_path),
           "--experiment", "run", "--epochs", "2", "--resume", "auto"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while "train: epoch 1 [   3/" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("--resume auto: nothing to resume") == 1, text[-3000:]  # rank 0 logs, once per start
    assert text.count("--resume auto: continuing from") == 1, text[-3000:]
    folder = tmp_path / "run"
    assert summary_epochs(folder) == [0, 1]
    ckpt = read_checkpoint(folder / "last.pth.tar")
    assert ckpt["epoch"] == 1 and len(ckpt["rng_state"]) == 2
