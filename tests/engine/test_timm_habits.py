"""Issue 19 item 10: timm flags typed by habit are accepted, with timm's meaning where it applies to us, or a note."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from run_helpers import TINY_RUN, train_cli


def run_args(image_folder, tmp_path, *extra):
    return [image_folder, *TINY_RUN, "--epochs", "1", "--output", tmp_path / "out", "--experiment", "h", *extra]


def test_log_wandb_logs_args_and_every_epoch(image_folder, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, row, step=None):
            calls["log"].append((step, row))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    assert train_cli(run_args(image_folder, tmp_path, "--log-wandb")) == 0
    (init_kwargs,) = calls["init"]
    assert init_kwargs["config"]["lr"] == pytest.approx(3e-3) and init_kwargs["name"] == "h"
    (step, row), = calls["log"]
    assert step == 0 and 0 <= row["eval_top1"] <= 100 and row["train_loss"] > 0
    assert calls["finish"] == 1


def test_log_wandb_without_wandb_is_a_note_and_the_run_goes_on(image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.warns(UserWarning, match="`log_wandb`: wandb is not installed"):
        assert train_cli(run_args(image_folder, tmp_path, "--log-wandb")) == 0
    assert (tmp_path / "out" / "h" / "last.pth.tar").is_file()


def test_gpu_only_and_batchnorm_flags_are_notes_on_cpu(image_folder, tmp_path, recwarn):
    assert train_cli(run_args(image_folder, tmp_path, "--pin-mem", "--no-prefetcher", "--dist-bn", "reduce")) == 0
    from sequencer.commands.common import as_flags
    notes = [as_flags(str(w.message)) for w in recwarn]  # the library names parameters; the command shows flags
    for flag in ("--pin-mem", "--no-prefetcher", "--dist-bn reduce"):
        assert sum(n.startswith(flag) for n in notes) == 1, notes


def test_recovery_interval_writes_recovery_checkpoints_mid_epoch(image_folder, tmp_path, monkeypatch):
    from sequencer.engine.checkpoint import CheckpointManager
    written = []
    save = CheckpointManager.save_recovery

    def spy(self, state):
        path = save(self, state)
        on_disk = torch.load(path, weights_only=True)
        written.append((on_disk["epoch"], on_disk["step"], on_disk["epoch_complete"]))
        return path

    monkeypatch.setattr(CheckpointManager, "save_recovery", spy)
    # 48 images, batch 8: steps 0..5; every 2 batches -> after steps 1 and 3 (not after the last one)
    assert train_cli(run_args(image_folder, tmp_path, "--recovery-interval", "2")) == 0
    assert written == [(0, 1, False), (0, 3, False)]
    assert not (tmp_path / "out" / "h" / "recovery.pth.tar").exists()  # the finished epoch supersedes it


def test_timms_no_sync_dist_bn_is_accepted_and_the_statistics_are_still_averaged():
    """timm's ``--dist-bn ''`` (no sync) parses; a model with BatchNorm gets one note saying its ranks' statistics
    are still averaged (unsynced they would give logged numbers of no single model); a model without, no note."""
    from sequencer.cli import build_parser
    from sequencer.engine import timm_habits
    from sequencer.engine.config import TrainConfig, resolve_config

    assert build_parser("train").parse_args(["train", "data", "--dist-bn", ""]).dist_bn == ""
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    given, default = TrainConfig(dist_bn=""), TrainConfig()
    (note,) = timm_habits.notes(given, torch.device("cpu"), with_bn)
    assert note.startswith("`dist_bn=''`: timm's no-sync; here the ranks' BatchNorm statistics are still averaged")
    assert timm_habits.notes(default, torch.device("cpu"), with_bn) == []
    assert timm_habits.notes(given, torch.device("cpu"), torch.nn.Linear(2, 2)) == []
    # a run's resolved config has every setting set: the note was said on every run of a BatchNorm model
    resolved = resolve_config({})
    assert timm_habits.notes(resolved, torch.device("cpu"), with_bn, given=frozenset()) == []
    assert len(timm_habits.notes(resolved, torch.device("cpu"), with_bn, given=frozenset({"dist_bn"}))) == 1
