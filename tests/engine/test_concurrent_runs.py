"""Two `sequencer train --experiment same` started together: one run owns the folder, the other is refused."""
from __future__ import annotations

import os

import pytest
import yaml

from run_helpers import TINY_RUN, start_train, summary_epochs, train_cli


@pytest.mark.slow
def test_two_runs_started_together_into_one_experiment(image_folder, tmp_path):
    out = tmp_path / "out"
    runs = {lr: [image_folder, "--output", out, "--experiment", "same", *TINY_RUN, "--lr", lr,
                 "--epochs", epochs] for lr, epochs in (("0.001", "1"), ("0.002", "2"))}
    procs = {lr: start_train(args, tmp_path / f"{lr}.log") for lr, args in runs.items()}
    codes = {lr: p.wait(timeout=600) for lr, p in procs.items()}
    logs = {lr: (tmp_path / f"{lr}.log").read_text() for lr in runs}
    winners = [lr for lr, rc in codes.items() if rc == 0]
    assert len(winners) == 1, (codes, logs)
    (loser,) = set(runs) - set(winners)
    lines = [line for line in logs[loser].splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in logs[loser], logs[loser]
    assert "is in use by another run" in lines[0] or "already holds a run" in lines[0], lines[0]
    # every file in the folder belongs to the winner
    folder = out / "same"
    winner_cfg = yaml.safe_load((folder / "args.yaml").read_text())
    assert str(winner_cfg["lr"]) == str(float(winners[0]))
    assert summary_epochs(folder) == list(range(int(winner_cfg["epochs"])))
    assert not (folder / ".run.lock").exists()  # the claim goes with its run


def test_stale_claim_of_a_killed_run_is_taken_over(image_folder, tmp_path):
    folder = tmp_path / "out" / "same"
    folder.mkdir(parents=True)
    (folder / ".run.lock").write_text(f"{os.uname().nodename} 999999999\n")  # no such process
    assert train_cli([image_folder, "--output", tmp_path / "out", "--experiment", "same", *TINY_RUN,
                      "--epochs", "1"]) == 0
    assert summary_epochs(folder) == [0]
    assert not (folder / ".run.lock").exists()


def test_claim_of_a_live_run_is_refused_in_one_line(image_folder, tmp_path, capsys):
    folder = tmp_path / "out" / "same"
    folder.mkdir(parents=True)
    (folder / ".run.lock").write_text(f"{os.uname().nodename} {os.getppid()}\n")  # alive: our parent
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert train_cli([image_folder, "--output", tmp_path / "out", "--experiment", "same", *TINY_RUN]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is in use by another run (process" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_runs_without_experiment_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from argparse import Namespace
    from sequencer.engine import outputs
    from sequencer.engine.config import RunState
    from sequencer.engine.distributed import DistInfo

    class Frozen(outputs.datetime):
        @classmethod
        def now(cls, tz=None):
            return outputs.datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(outputs, "datetime", Frozen)
    first = Namespace(output=str(tmp_path), experiment="", resume="")
    first_state, second_state = RunState(), RunState()
    folder = outputs.make_output_dir(first, first_state, DistInfo(), "m", 16)
    # the second run saw the name free a moment earlier: it must not share the first one's folder
    second = Namespace(output=str(tmp_path), experiment="", resume="")
    monkeypatch.setattr(outputs.Path, "exists", lambda self: self != folder and os.path.exists(self))
    other = outputs.make_output_dir(second, second_state, DistInfo(), "m", 16)
    assert folder.name == "20260101-120000-m-16" and other.name == "20260101-120000-m-16-1"
    assert first_state.claim == str(folder / outputs.CLAIM_NAME)
    assert second_state.claim == str(other / outputs.CLAIM_NAME)
    outputs.release_claim(first_state)
    outputs.release_claim(second_state)
    assert not (folder / outputs.CLAIM_NAME).exists() and not (other / outputs.CLAIM_NAME).exists()


def test_resume_auto_that_cannot_read_the_runs_checkpoint_leaves_the_run_as_it_was(image_folder, tmp_path, capsys):
    """A truncated last.pth.tar: `--resume auto` skipped it, found nothing and started a new run in the folder,
    writing over the old run's model_best.pth.tar, checkpoint history and summary.csv (a new run without
    `--resume` is refused there)."""
    args = [image_folder, *TINY_RUN, "--epochs", "2", "--output", tmp_path, "--experiment", "e"]
    assert train_cli(args) == 0
    folder = tmp_path / "e"
    last = folder / "last.pth.tar"
    last.write_bytes(last.read_bytes()[:100])
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    capsys.readouterr()
    assert train_cli([*args, "--resume", "auto"]) == 2
    out, err = capsys.readouterr()
    assert f"--resume auto: nothing to resume in {folder}" in out and "starting" not in out, out
    assert (f"error: experiment folder '{folder}' holds a run, but --resume auto found no checkpoint there to "
            f"continue (last.pth.tar and recovery.pth.tar missing or unreadable)") in err, err
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
