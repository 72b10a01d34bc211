"""Issue 19 item 5: a checkpoint write that fails for want of space (here: a file-size limit, EFBIG, the same path
as ENOSPC) stops training with one line naming the file; no summary row stands for a checkpoint that is not on
disk, and `--resume auto` afterwards gives every epoch exactly once."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import torch

from run_helpers import REPO, TINY_RUN, subprocess_env, summary_epochs, train_cli
from sequencer.engine.outputs import read_summary


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # args.yaml fits, a checkpoint does not


@pytest.mark.slow
def test_checkpoint_write_past_the_file_size_limit(image_folder, tmp_path):
    args = [image_folder, "--output", tmp_path / "out", "--experiment", "full", *TINY_RUN, "--epochs", "2"]
    done = subprocess.run([sys.executable, "-m", "sequencer", "train", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, preexec_fn=limit_file_size, timeout=600)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(err) == 1 and "could not write checkpoint" in err[0] and "last.pth.tar" in err[0], err
    assert "File too large" in err[0]
    folder = tmp_path / "out" / "full"
    assert not read_summary(folder / "summary.csv")  # epoch 0's row waits for its checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["args.yaml"]  # no temporaries, no claim
    # the same command without the limit, continued: every epoch exactly once
    assert train_cli([*args, "--resume", "auto"]) == 0
    assert summary_epochs(folder) == [0, 1]


def test_rows_come_back_from_the_checkpoint_after_a_kill_between_the_writes(image_folder, tmp_path):
    folder = tmp_path / "out" / "x"
    args = [image_folder, "--output", tmp_path / "out", "--experiment", "x", *TINY_RUN]
    assert train_cli([*args, "--epochs", "1"]) == 0
    rows = read_summary(folder / "summary.csv")
    assert torch.load(folder / "last.pth.tar", weights_only=True)["summary_rows"] == rows
    (folder / "summary.csv").write_text("epoch,train_loss\n")  # as if killed before summary.csv was rewritten
    assert train_cli([*args, "--epochs", "2", "--resume", "auto"]) == 0
    assert summary_epochs(folder) == [0, 1]


def test_finish_line_counts_every_invocation_and_says_1_epoch(image_folder, tmp_path, capsys):
    """Issue 19 item 9: "after 1 epoch" (not "1 epochs"); after a resume, "in N s" includes the earlier epochs."""
    folder = tmp_path / "out" / "x"
    args = [image_folder, "--output", tmp_path / "out", "--experiment", "x", *TINY_RUN]
    assert train_cli([*args, "--epochs", "1"]) == 0
    assert " after 1 epoch in " in capsys.readouterr().out
    text = (folder / "summary.csv").read_text().splitlines()
    row = text[1].split(",")
    row[-1] = "1000.00"  # epoch 0 took 1000 s in the first invocation
    (folder / "summary.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    assert train_cli([*args, "--epochs", "2", "--resume", "auto"]) == 0
    finish = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done:"))
    seconds = int(finish.split(" after 2 epochs in ")[1].split("s")[0])
    assert 1000 <= seconds < 1300, finish
