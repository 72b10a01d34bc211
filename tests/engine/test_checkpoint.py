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


@pytest.mark.slow
def test_resume_continues_exactly(image_folder, tmp_path, monkeypatch):
    """A run stopped twice (SIGTERM while epoch 0 is evaluated, Ctrl-C in the middle of an accumulation window of
    epoch 1) and resumed each time, the last time with another -j, is bit for bit the uninterrupted run: weights,
    EMA, optimizer state, the lr of every update, summary rows. The interrupted epoch went on where its last update
    left it; it used to re-run from its beginning (3 more optimizer steps here, a rewound lr, other weights)."""
    import sequencer.engine.evaluate as ev
    import sequencer.engine.loop as loop

    common = [image_folder, *TINY_RUN, "--output", tmp_path, "--epochs", "2", "-j", "2", "--mixup", "0.5",
              "--reprob", "0.3", "--aa", "rand-m9-mstd0.5-inc1", "--model-ema", "--model-ema-decay", "0.8",
              "--sched-on-updates", "--warmup-epochs", "1", "--grad-accum-steps", "2"]  # 6 batches, 3 updates
    update_lrs = {"straight": [], "split": []}
    real_update, real_forward, real_evaluate = loop._update, loop._forward, ev.evaluate

    def record_update(run, *a):
        update_lrs[run.out.folder.name].append(loop.current_lr(run.opt.optimizer))
        return real_update(run, *a)

    monkeypatch.setattr(loop, "_update", record_update)
    assert train_cli([*common, "--experiment", "straight"]) == 0

    def evaluate_then_preempt(*a, **kw):  # SIGTERM arrives while epoch 0's model is evaluated
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", evaluate_then_preempt)
    assert train_cli([*common, "--experiment", "split"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    forwards = []

    def forward_then_interrupt(run, *a):  # Ctrl-C during epoch 1's batch 3, the second of its update's 2
        forwards.append(1)
        if len(forwards) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(run, *a)

    monkeypatch.setattr(loop, "_forward", forward_then_interrupt)
    assert train_cli([*common, "--experiment", "split", "--resume", "auto"]) == 128 + signal.SIGINT
    recovery = read_checkpoint(tmp_path / "split" / "recovery.pth.tar")
    assert (recovery["epoch"], recovery["epoch_progress"]["batches"]) == (1, 2)
    monkeypatch.setattr(loop, "_forward", real_forward)
    assert train_cli([*common, "--experiment", "split", "--resume", "auto", "-j", "1"]) == 0

    a = read_checkpoint(tmp_path / "straight" / "last.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "last.pth.tar")
    assert a["epoch"] == b["epoch"] == 1
    assert update_lrs["split"] == update_lrs["straight"] and len(update_lrs["straight"]) == 6
    for key in ("state_dict", "state_dict_ema"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key}.{name}"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name, value in state_a.items():
            assert torch.equal(state_b[name], value), name
    rows_a, rows_b = summary_rows(tmp_path / "straight"), summary_rows(tmp_path / "split")
    assert [r["epoch"] for r in rows_b] == ["0", "1"]
    for ra, rb in zip(rows_a, rows_b):
        assert [ra[k] for k in ("train_loss", "eval_loss", "eval_top1", "lr")] == \
            [rb[k] for k in ("train_loss", "eval_loss", "eval_top1", "lr")]


@pytest.mark.parametrize("change, note", [(dict(batch_size=4), "batch_size 8 -> 4"),
                                          (dict(world_size=2), "world_size 1 -> 2"), (None, None)])
def test_an_interrupted_epoch_goes_on_only_over_the_same_batches(change, note):
    """A recovery file's epoch goes on after its last update only when this start cuts the data into the same
    batches; otherwise (another batch size, accumulation or number of processes) it re-runs, and says so."""
    from sequencer.engine.config import TrainConfig
    from sequencer.engine.distributed import DistInfo
    from sequencer.engine.loop import EpochProgress, Loaders
    from sequencer.engine.train import epoch_progress

    recorded = dict(batches=4, batch_size=8, grad_accum_steps=2, world_size=1, steps_per_epoch=6,
                    losses=[[3.5, 32]])
    checkpoint = dict(epoch=1, epoch_complete=False, step=5, epoch_progress=recorded)
    cfg = TrainConfig(batch_size=8, grad_accum_steps=2)
    loaders = Loaders(None, None, {}, 16, steps_per_epoch=6, updates_per_epoch=3)
    info = DistInfo()
    if change:
        cfg.batch_size = change.get("batch_size", 8)
        info = DistInfo(rank=0, world_size=change.get("world_size", 1)) if "world_size" in change else info
        recorded["losses"] *= info.world_size
        with pytest.warns(UserWarning, match=f"epoch 1 re-runs from its beginning.*{note}"):
            assert epoch_progress(cfg, info, checkpoint, loaders) == EpochProgress()
        return
    assert epoch_progress(cfg, info, checkpoint, loaders) == EpochProgress(4, 3.5, 32)
    assert epoch_progress(cfg, info, {**checkpoint, "epoch_complete": True}, loaders) == EpochProgress()
    del checkpoint["epoch_progress"]  # a recovery file of an older version: the epoch re-runs, as it did
    assert epoch_progress(cfg, info, checkpoint, loaders) == EpochProgress()


class _BatchNormNet(torch.nn.Module):
    """A caller's classifier whose forward moves state: BatchNorm's running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def test_an_interrupted_window_leaves_batchnorm_statistics_as_the_last_update_did(image_folder, tmp_path,
                                                                                   monkeypatch):
    """Ctrl-C in the middle of a `grad_accum_steps` window, after that window's first batch went forward: the resumed
    epoch redoes the window, so the recovery file keeps the running statistics of the last update, not those of the
    batches forwarded since (they would count twice: 8 tracked batches where the uninterrupted run has 6)."""
    import sequencer
    import sequencer.engine.loop as loop

    common = dict(data=image_folder, img_size=16, batch_size=8, epochs=1, workers=0, grad_accum_steps=2,
                  lr=0.01, warmup_epochs=0, output=str(tmp_path), progress=False)
    torch.manual_seed(0)
    straight = _BatchNormNet()
    sequencer.train(model=straight, experiment="straight", **common)
    real_forward, forwards = loop._forward, []

    def forward_then_interrupt(run, *a):  # Ctrl-C as batch 4 (the second of the second window) goes forward
        forwards.append(1)
        if len(forwards) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(run, *a)

    torch.manual_seed(0)
    split = _BatchNormNet()
    monkeypatch.setattr(loop, "_forward", forward_then_interrupt)
    with pytest.raises(sequencer.TrainingInterrupted):
        sequencer.train(model=split, experiment="split", **common)
    monkeypatch.setattr(loop, "_forward", real_forward)
    recovery = read_checkpoint(tmp_path / "split" / "recovery.pth.tar")
    assert recovery["epoch_progress"]["batches"] == 2
    assert recovery["state_dict"]["norm.num_batches_tracked"].item() == 2
    sequencer.train(model=split, experiment="split", resume="auto", **common)
    for name, value in straight.state_dict().items():
        assert torch.equal(split.state_dict()[name], value), name


def test_a_resume_from_an_earlier_checkpoint_makes_model_best_its_best_epoch_again(tmp_path):
    """A resume from checkpoint-<N> of a run that went past N abandons its later epochs: model_best.pth.tar was
    left as the abandoned best (epoch 3 here) while the run named its best epoch 1 (a real run said "best loss 0.7315
    at epoch 1" and validate of model_best gave 0.7102, epoch 3's). It is made epoch 1's again from
    checkpoint-1.pth.tar; where no file holds that epoch, the best is picked again, with a note."""
    from sequencer.engine.config import RunState, TrainConfig
    from sequencer.engine.distributed import DistInfo
    from sequencer.engine.outputs import prepare_outputs, release_claim

    folder = tmp_path / "e"
    folder.mkdir()
    manager = ck.CheckpointManager(folder)
    for epoch, top1 in enumerate([50.0, 60.0, 55.0, 70.0]):
        manager.save_epoch({"epoch": epoch, "epoch_complete": True, "state_dict": {}}, epoch, top1)
    assert read_checkpoint(folder / ck.BEST)["epoch"] == 3

    def resume_from(epoch: int):
        state, path = RunState(), folder / f"checkpoint-{epoch}.pth.tar"
        cfg = TrainConfig(output=str(tmp_path), experiment="e", model="sequencer2d_nano")
        try:
            out = prepare_outputs(cfg, state, DistInfo(False, 0, 0, 1, torch.device("cpu")), str(path),
                                  read_checkpoint(path), epoch + 1, 16)
        finally:
            release_claim(state)
        return out.manager, state.start_warnings

    best, notes = resume_from(2)  # its one note: checkpoint-3 set aside (the test below)
    assert (best.best_epoch, best.best_metric, read_checkpoint(folder / ck.BEST)["epoch"]) == (1, 60.0, 1)
    assert len(notes) == 1
    (folder / "checkpoint-1.pth.tar").unlink()
    ck.atomic_save({"epoch": 3, "epoch_complete": True, "state_dict": {}}, folder / ck.BEST)
    best, notes = resume_from(2)
    assert (best.best_epoch, best.best_metric) == (None, None)
    assert notes == [f"model_best.pth.tar held epoch 3, which this resume from {folder / 'checkpoint-2.pth.tar'} "
                     f"trains again, and no file holds the best epoch before it (1): the best is picked again from "
                     f"the resumed epoch on"]


def test_a_resume_from_an_earlier_checkpoint_sets_the_abandoned_epochs_checkpoints_aside(tmp_path):
    """A resume from checkpoint-<N> of a run that went past N left the later epochs' checkpoint-<E>.pth.tar under
    their names: where the resumed run wrote no epoch E of its own (a diverged epoch here, one not good enough for
    the history, or a shorter run: a real `--epochs 3` resume from checkpoint-1 left checkpoint-3 of the first run,
    loss 0.8208, beside its own checkpoint-1 and -2), `checkpoint average checkpoint-*.pth.tar` mixed both runs.
    They are renamed abandoned-checkpoint-<E>.pth.tar (never over an earlier one), with a note. So are the abandoned
    run's last.pth.tar (epoch 3) and recovery.pth.tar, and last.pth.tar becomes the resumed epoch: they stayed until
    the first resumed epoch ended, and a real run SIGKILLed in it was continued by `--resume auto` from that last
    ("the run already finished: it ran 4 epochs"), the abandoned run, not the one resumed from checkpoint-1."""
    from sequencer.engine.config import RunState, TrainConfig
    from sequencer.engine.distributed import DistInfo
    from sequencer.engine.outputs import prepare_outputs, release_claim

    folder = tmp_path / "e"
    folder.mkdir()
    manager = ck.CheckpointManager(folder, max_history=3)
    for epoch, top1 in enumerate([50.0, 60.0, 55.0, 70.0]):
        manager.save_epoch({"epoch": epoch, "epoch_complete": True, "state_dict": {}}, epoch, top1)
    ck.atomic_save({"epoch": 3, "older": True}, folder / "abandoned-checkpoint-3.pth.tar")  # an earlier resume's
    ck.atomic_save({"epoch": 3, "epoch_complete": False, "step": 7, "state_dict": {}}, folder / ck.RECOVERY)
    state, path = RunState(), folder / "checkpoint-1.pth.tar"
    cfg = TrainConfig(output=str(tmp_path), experiment="e", model="sequencer2d_nano", checkpoint_hist=3)
    try:
        out = prepare_outputs(cfg, state, DistInfo(False, 0, 0, 1, torch.device("cpu")), str(path),
                              read_checkpoint(path), 2, 16)
    finally:
        release_claim(state)
    assert (ck.find_auto_resume(folder), read_checkpoint(folder / ck.LAST)["epoch"]) == (folder / ck.LAST, 1)
    assert [read_checkpoint(folder / f"abandoned-{name}")["epoch"] for name in (ck.LAST, ck.RECOVERY)] == [3, 3]
    out.manager.save_epoch({"epoch": 2, "epoch_complete": True, "state_dict": {}, "resumed": True}, 2, 58.0)
    out.manager.save_epoch({"epoch": 3, "epoch_complete": True, "state_dict": {}, "resumed": True}, 3, float("nan"))

    def epochs(pattern: str) -> dict[str, tuple]:
        return {f.name: (read_checkpoint(f)["epoch"], read_checkpoint(f).get("resumed", False))
                for f in sorted(folder.glob(pattern))}

    assert epochs("checkpoint-*.pth.tar") == {"checkpoint-1.pth.tar": (1, False), "checkpoint-2.pth.tar": (2, True)}
    assert epochs("abandoned-checkpoint-*") == {"abandoned-checkpoint-2.pth.tar": (2, False),
                                     "abandoned-checkpoint-3.1.pth.tar": (3, False),
                                     "abandoned-checkpoint-3.pth.tar": (3, False)}
    assert read_checkpoint(folder / "abandoned-checkpoint-3.pth.tar")["older"]
    assert state.start_warnings == [
        f"this resume from {path} trains the epochs from 2 on again: renamed the earlier run's checkpoint-2.pth.tar "
        f"to abandoned-checkpoint-2.pth.tar, checkpoint-3.pth.tar to abandoned-checkpoint-3.1.pth.tar, last.pth.tar "
        f"to abandoned-last.pth.tar, recovery.pth.tar to abandoned-recovery.pth.tar, so that no checkpoint-<E>.pth.tar "
        f"mixes them with this run's epochs and `--resume auto` continues this run"]
