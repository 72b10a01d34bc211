"""Atomic checkpoint writes, best-N history, RNG state, and exact resume."""
from __future__ import annotations

import errno
import os
import random
import signal

import numpy as np
import pytest
import torch

from run_helpers import TINY_RUN, summary_rows, train_cli
from sequencer.engine import checkpoint as ck
from sequencer.errors import SequencerError
from sequencer.models.loading import read_checkpoint


def test_atomic_save_replaces_whole_file(tmp_path):
    path = tmp_path / "last.pth.tar"
    ck.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    ck.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert read_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["last.pth.tar"]


def test_full_disk_leaves_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth.tar"
    ck.atomic_save({"epoch": 1, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fill_disk(obj, f, *a, **kw):
        f.write(b"\x00" * 100)  # some bytes made it to disk before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    with pytest.raises(SequencerError, match="disk is full"):
        ck.atomic_save({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pth.tar"]  # no temporary left behind
    assert read_checkpoint(path)["epoch"] == 1


def test_history_keeps_best_n_and_best_never_takes_nan(tmp_path):
    mgr = ck.CheckpointManager(tmp_path, max_history=2)
    for epoch, metric in enumerate([10.0, 50.0, 30.0, 40.0, float("nan")]):
        mgr.save_epoch({"epoch": epoch, "metric": metric}, epoch, metric)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]
    assert read_checkpoint(tmp_path / ck.BEST)["epoch"] == 1
    assert read_checkpoint(tmp_path / ck.LAST)["epoch"] == 4  # last is always the latest
    assert mgr.best_metric == 50.0 and mgr.history == [(1, 50.0), (3, 40.0)]


def test_history_lower_is_better_for_loss(tmp_path):
    mgr = ck.CheckpointManager(tmp_path, max_history=1, decreasing=True)
    for epoch, metric in enumerate([3.0, 1.0, 2.0]):
        mgr.save_epoch({"epoch": epoch}, epoch, metric)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1.pth.tar"]
    assert read_checkpoint(tmp_path / ck.BEST)["epoch"] == 1


def test_auto_resume_picks_the_most_advanced_file(tmp_path):
    assert ck.find_auto_resume(tmp_path) is None
    ck.atomic_save({"epoch": 2, "epoch_complete": True, "step": 0}, tmp_path / ck.LAST)
    assert ck.find_auto_resume(tmp_path).name == ck.LAST
    ck.atomic_save({"epoch": 3, "epoch_complete": False, "step": 5}, tmp_path / ck.RECOVERY)
    assert ck.find_auto_resume(tmp_path).name == ck.RECOVERY
    assert ck.resume_position(read_checkpoint(tmp_path / ck.RECOVERY)) == 3  # the interrupted epoch re-runs
    ck.atomic_save({"epoch": 3, "epoch_complete": True, "step": 0}, tmp_path / ck.LAST)
    assert ck.find_auto_resume(tmp_path).name == ck.LAST


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.atomic_save({"rng": ck.get_rng_state()}, tmp_path / "s.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(read_checkpoint(tmp_path / "s.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_continues_exactly(image_folder, tmp_path, monkeypatch):
    """Two epochs in one go == one epoch, SIGTERM, --resume: same weights, EMA, optimizer and summary rows."""
    common = [image_folder, *TINY_RUN, "--output", tmp_path, "--epochs", "3", "--mixup", "0.5", "--reprob", "0.3",
              "--aa", "rand-m9-mstd0.5-inc1", "--model-ema", "--model-ema-decay", "0.8", "--sched-on-updates",
              "--warmup-epochs", "1"]
    assert train_cli([*common, "--experiment", "straight"]) == 0

    import sequencer.engine.evaluate as ev
    real_evaluate = ev.evaluate
    calls = []

    def evaluate_then_preempt(*a, **kw):  # SIGTERM arrives while epoch 1 is being evaluated
        out = real_evaluate(*a, **kw)
        calls.append(1)
        if len(calls) == 3:  # epoch 0: model + EMA, epoch 1: model (+ EMA after)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ev, "evaluate", evaluate_then_preempt)
    assert train_cli([*common, "--experiment", "split"]) == 128 + signal.SIGTERM
    assert [int(r["epoch"]) for r in summary_rows(tmp_path / "split")] == [0, 1]
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    assert train_cli([*common, "--experiment", "split", "--resume", "auto"]) == 0

    a = read_checkpoint(tmp_path / "straight" / "last.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "last.pth.tar")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "state_dict_ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    rows_a, rows_b = summary_rows(tmp_path / "straight"), summary_rows(tmp_path / "split")
    assert [r["epoch"] for r in rows_b] == ["0", "1", "2"]
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), abs=1e-4)
        assert ra["eval_top1"] == rb["eval_top1"] and ra["lr"] == rb["lr"]
