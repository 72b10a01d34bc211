"""DDP: 2-process gloo runs on the CPU through distributed_train.sh (torchrun): a killed worker, errors, Ctrl-C.

A plain 2-process run of distributed_train.sh (rank 0 alone logs and writes, the checkpoint unwrapped with an RNG
state per rank) is tests/engine/test_recipes.py::test_from_scratch_recipe, the paper's command; EMA and mixup
under DDP are this file's restart test."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_helpers import HELD_RUN, REPO, TINY_RUN, env_with_site, held_after_batch_3, subprocess_env, summary_epochs
from sequencer.models.loading import read_checkpoint


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
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "sequencer", "train", str(image_folder), *HELD_RUN, "--output", str(tmp_path),
           "--experiment", "run", "--epochs", "2", "--resume", "auto", "--mixup", "0.5", "--model-ema"]
    with open(log, "w") as out:  # the kill lands in epoch 1 (held_after_batch_3): the restart resumes it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=env_with_site(tmp_path, held_after_batch_3(epoch=1)))
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
    assert ckpt["epoch"] == 1 and len(ckpt["rng_state"]) == 2  # one RNG state per rank
    assert "state_dict_ema" in ckpt and ckpt["args"]["mixup"] == 0.5


def _launch(image_folder, tmp_path, extra: list[str], env=None, **kw):
    tmp_path.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(REPO / "distributed_train.sh"), "2", str(image_folder), *map(str, TINY_RUN),
         "--output", str(tmp_path), "--experiment", "ddp", "--epochs", "2", *extra],
        capture_output=True, text=True, env=env or subprocess_env(), cwd=tmp_path, timeout=300, **kw)


@pytest.mark.slow
def test_an_error_on_rank_0_stops_the_job_with_one_line(image_folder, tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "summary.csv").write_text("epoch\n0\n")  # an existing run: rank 0 refuses, rank 1 waits
    started = time.time()
    proc = _launch(image_folder, tmp_path, [])
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert "already holds a run" in out
    assert time.time() - started < 120


# a fault the test injects: every data-loader worker of rank 1 fails on its first image
WORKER_FAULT = """
import os
import torch.utils.data
from sequencer.data import datasets
_get = datasets.ImageFileDataset.__getitem__
def _failing(self, index):
    if os.environ.get("RANK") == "1" and torch.utils.data.get_worker_info() is not None:
        raise ValueError("injected fault")
    return _get(self, index)
datasets.ImageFileDataset.__getitem__ = _failing
"""


@pytest.mark.slow
def test_an_exception_in_a_data_worker_stops_every_rank_with_one_line(image_folder, tmp_path):
    proc = _launch(image_folder, tmp_path / "out", ["-j", "1"], env=env_with_site(tmp_path, WORKER_FAULT))
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == ["sequencer train: error: a data-loader worker failed: ValueError: injected fault "
                      "(hint: run with -j 0 to see the full traceback)"], out
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_ctrl_c_under_distributed_train_sh_saves_exits_130_and_resumes_where_it_stopped(image_folder, tmp_path):
    """48 training images, 2 ranks, batch 2: 12 batches per rank and epoch."""
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "distributed_train.sh"), "2", str(image_folder), *HELD_RUN,
                                 "--output", str(tmp_path), "--experiment", "run", "--epochs", "2"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env=env_with_site(tmp_path, held_after_batch_3(epoch=0)))
    try:
        deadline = time.time() + 300
        while "train: epoch 0 [   3/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    recovery = read_checkpoint(tmp_path / "run" / "recovery.pth.tar")
    done = recovery["epoch_progress"]["batches"]
    # the workers waited after batch 3 (held_after_batch_3) for the signal, and stopped at the next step's agreement
    assert recovery["epoch"] == 0 and done == 3, recovery["epoch_progress"]

    # the resume goes on after the stopped update, under DDP too: every rank's 12 batches of each epoch make one
    # Adam step each (a resume that re-ran epoch 0 from its start made `done` steps more)
    resumed = subprocess.run(["bash", str(REPO / "distributed_train.sh"), "2", str(image_folder), *HELD_RUN,
                              "--output", str(tmp_path), "--experiment", "run", "--epochs", "2", "--resume", "auto"],
                             capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert summary_epochs(tmp_path / "run") == [0, 1], out[-3000:]
    optimizer = read_checkpoint(tmp_path / "run" / "last.pth.tar")["optimizer"]
    steps = {int(state["step"]) for state in optimizer["state"].values()}
    assert steps == {2 * 12}, (steps, out[-3000:])


def test_launch_reports_the_rank_that_failed_in_its_own_right(monkeypatch):
    """torchrun may see the peer that lost the failing rank exit first (status 1), and stop the failing rank with
    SIGTERM while it exits: the launch still ends with the failing rank's own status, which that rank recorded."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from sequencer.cli import main
    from sequencer.engine import distributed

    def run_two_ranks(_args):
        assert main(["validate", "--model", "no_such_model"]) == 2  # rank 1 fails in its own right ...
        failures = {0: ProcessFailure(local_rank=0, pid=1, exitcode=distributed.PEER_GONE_EXIT, error_file=""),
                    1: ProcessFailure(local_rank=1, pid=2, exitcode=-signal.SIGTERM, error_file="")}
        raise ChildFailedError("sequencer", failures)  # ... but torchrun saw only its peer's status and a SIGTERM

    monkeypatch.setattr(torchrun, "run", run_two_ranks)
    assert distributed.launch(["--nproc_per_node", "2", "-m", "sequencer", "train"]) == 2
    assert distributed.FAILURE_FILE_ENV not in os.environ


def _leave_at_once_or_wait_at_the_end(rank, folder):
    """Rank 1 joins the group and is gone; rank 0's run ends normally, in process_group's last wait for its peers."""
    import torch
    import torch.distributed as dist

    from sequencer.engine.distributed import process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    if rank == 1:
        os._exit(0)
    try:
        with process_group("cpu"):
            pass
        got = "no error"
    except BaseException as e:  # noqa: BLE001 -- what the wait raised, whatever it is, for the test to read
        got = f"{type(e).__module__}.{type(e).__name__}: {e}"
    (Path(folder) / "rank0.txt").write_text(got)


def test_a_peer_gone_at_the_last_wait_is_peer_gone(tmp_path):
    """The wait for every rank at the end of a run that went well fails when a peer is gone: the rank stops with
    PeerGone's one line (the command exits 1, the launch reporting the other rank's status), as in every other
    collective; it raised gloo's own RuntimeError, which a command shows as an internal error with a traceback."""
    import torch.multiprocessing as mp

    mp.start_processes(_leave_at_once_or_wait_at_the_end, args=(str(tmp_path),), nprocs=2, start_method="fork")
    got = (tmp_path / "rank0.txt").read_text()
    assert got.startswith("sequencer.engine.distributed.PeerGone: another process of the run stopped ("), got
