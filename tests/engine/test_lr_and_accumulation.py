"""`--lr-base` / `--lr-base-scale` (the lr from the global batch) and `--grad-accum-steps` (micro-batches per update).

Accumulation is checked by its defining property: N micro-batches of b images give the same update as one batch of
N*b images holding the same images (the sampler's order does not depend on the batch size), also for the lr
schedule stepped per update.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from run_helpers import TINY_MODEL, make_image_folder, summary_rows, train_cli
from sequencer.engine.config import TrainConfig
from sequencer.engine.train import resolved_lr
from sequencer.models.loading import read_checkpoint

# the common flags of these runs: no augmentation or dropout, so the same images give the same gradients
PLAIN_RUN = TINY_MODEL + ["--img-size", "16", "-j", "0", "--log-interval", "1000", "--device", "cpu",
                          "--warmup-epochs", "0", "--hflip", "0", "--no-aug", "--epochs", "1", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """Two classes, 8 training images each (two batches of 8), one validation image each."""
    return make_image_folder(tmp_path_factory.mktemp("rg16"), {"red": (200, 30, 30), "green": (30, 200, 30)}, 8, 1)


@pytest.mark.parametrize("opt, scale, world_size, accum, expected", [
    ("sgd", "", 1, 1, 0.4 * 32 / 64),               # SGD: linear by default
    ("sgd", "sqrt", 2, 1, 0.4 * (64 / 64) ** 0.5),  # the global batch counts every process ...
    ("adamw", "", 1, 2, 0.4 * (64 / 64) ** 0.5),    # ... and every accumulated micro-batch; ada*: sqrt by default
    ("lamb", "", 1, 1, 0.4 * (32 / 64) ** 0.5),
    ("adamw", "linear", 4, 1, 0.4 * 128 / 64),
])
def test_lr_base_scales_with_the_global_batch(opt, scale, world_size, accum, expected):
    cfg = TrainConfig(lr=None, lr_base=0.4, lr_base_size=64, lr_base_scale=scale, opt=opt, batch_size=32,
                      grad_accum_steps=accum)
    assert resolved_lr(cfg, world_size) == pytest.approx(expected, rel=1e-12)
    assert cfg.lr is None  # the setting stays as given: the run holds the resolved value


def test_an_explicit_lr_is_kept():
    cfg = TrainConfig(lr=0.123, lr_base=0.4, lr_base_size=64, opt="sgd", batch_size=32, grad_accum_steps=1)
    assert resolved_lr(cfg, 1) == 0.123


def test_lr_base_reaches_the_optimizer(small_folder, tmp_path):
    """From the command line: -b 4 x 2 micro-batches = 8 of --lr-base-size 32, sqrt: lr 0.4 * 0.5 = 0.2."""
    assert train_cli([small_folder, *PLAIN_RUN, "-b", "4", "--grad-accum-steps", "2", "--opt", "sgd",
                      "--sched", "none", "--lr-base", "0.4", "--lr-base-size", "32", "--lr-base-scale", "sqrt",
                      "--output", tmp_path, "--experiment", "lr"]) == 0
    assert float(summary_rows(tmp_path / "lr")[0]["lr"]) == pytest.approx(0.2, rel=1e-6)
    ckpt = read_checkpoint(tmp_path / "lr" / "last.pth.tar")
    assert all(g["lr"] == pytest.approx(0.2, rel=1e-12) for g in ckpt["optimizer"]["param_groups"])


def test_cooldown_epochs_run_after_epochs_at_min_lr(small_folder, tmp_path):
    """As timm's scheduler does (docs/training.md, the paper's recipes): --cooldown-epochs adds epochs to --epochs,
    run at --min-lr."""
    assert train_cli([small_folder, *PLAIN_RUN, "-b", "8", "--opt", "sgd", "--lr", "0.1", "--min-lr", "1e-6",
                      "--cooldown-epochs", "1", "--output", tmp_path, "--experiment", "cool"]) == 0
    rows = summary_rows(tmp_path / "cool")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[0]["lr"]) == pytest.approx(0.1) and float(rows[1]["lr"]) == pytest.approx(1e-6)


def _train(folder, out, name: str, *flags) -> dict:
    assert train_cli([folder, *PLAIN_RUN, *flags, "--output", out, "--experiment", name]) == 0
    return read_checkpoint(out / name / "last.pth.tar")


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest weight difference between two state dicts, relative to each tensor's largest weight."""
    return max(((a[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item() for k, v in b.items())


def test_accumulated_micro_batches_update_like_one_big_batch(small_folder, tmp_path):
    """SGD with momentum, cosine lr stepped per update: 2 updates of the same 8 images each, either way."""
    flags = ["--opt", "sgd", "--momentum", "0.9", "--lr", "0.5", "--sched", "cosine", "--sched-on-updates",
             "--min-lr", "0"]
    big = _train(small_folder, tmp_path, "b8", "-b", "8", *flags)["state_dict"]
    accumulated = _train(small_folder, tmp_path, "b4x2", "-b", "4", "--grad-accum-steps", "2", *flags)["state_dict"]
    unaccumulated = _train(small_folder, tmp_path, "b4", "-b", "4", *flags)["state_dict"]  # 4 updates of 4
    assert _max_rel_diff(accumulated, big) <= 1e-5
    assert _max_rel_diff(unaccumulated, big) > 1e-2  # the comparison can tell the two apart
    assert float(summary_rows(tmp_path / "b4x2")[0]["train_loss"]) == pytest.approx(
        float(summary_rows(tmp_path / "b8")[0]["train_loss"]), rel=1e-5)


@pytest.mark.parametrize("micro_batches, accum, updates", [(4, 3, 2), (4, 4, 1), (4, 1, 4)])
def test_optimizer_steps_per_epoch(small_folder, tmp_path, micro_batches, accum, updates):
    """A last, shorter accumulation still updates: ceil(micro-batches / accum) optimizer steps (Adam counts them)."""
    ckpt = _train(small_folder, tmp_path, "adam", "-b", str(16 // micro_batches), "--grad-accum-steps", str(accum),
                  "--opt", "adamw", "--lr", "1e-3", "--sched", "none")
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {float(updates)}


class _FixedBatches(list):
    """The same micro-batches every epoch, in order (a loader whose shuffling ignores the epoch)."""

    def set_epoch(self, epoch: int) -> None:
        pass


class _RecordingScheduler:
    def __init__(self):
        self.updates = []

    def step_update(self, num_updates, metric=None):
        self.updates.append(num_updates)


def _linear_run(batches, accum: int, tmp_path):
    """A TrainingRun around a linear classifier trained by plain SGD (lr 1) on ``batches``, for the epoch loop."""
    from sequencer.engine.distributed import DistInfo
    from sequencer.engine.loop import Loaders, Optimization, TrainingRun

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    cfg = TrainConfig(grad_accum_steps=accum, log_interval=1000)
    updates = -(-len(batches) // accum)
    loaders = Loaders(_FixedBatches(batches), [], {}, 16, len(batches), updates)
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=1.0), _RecordingScheduler(), 2,
                       torch.amp.GradScaler("cpu", enabled=False), None, None, None, torch.nn.CrossEntropyLoss())
    return TrainingRun(cfg, DistInfo(), model, model, model, ["a", "b", "c", "d"], loaders, opt,
                       argparse.Namespace(folder=tmp_path))


@pytest.mark.parametrize("accum", [1, 2, 3, 5])
def test_each_update_descends_the_mean_loss_of_its_own_micro_batches(accum, tmp_path):
    """5 micro-batches of 2: groups of ``accum`` (the last one shorter), each update the gradient of the mean loss
    over exactly its group's samples; the schedule is stepped once per update, counted across epochs."""
    from sequencer.engine.loop import train_one_epoch
    from sequencer.engine.stop_request import StopRequest

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, generator=g), torch.randint(0, 4, (2,), generator=g)) for _ in range(5)]
    run = _linear_run(batches, accum, tmp_path)
    expected = torch.nn.Linear(3, 4)
    expected.load_state_dict(run.model.state_dict())
    for epoch in range(2):
        train_one_epoch(run, epoch, StopRequest())
        for start in range(0, len(batches), accum):
            group = batches[start:start + accum]
            x, y = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
            expected.zero_grad()
            torch.nn.functional.cross_entropy(expected(x), y).backward()
            with torch.no_grad():
                for p in expected.parameters():
                    p -= p.grad
    updates = run.loaders.updates_per_epoch
    assert run.opt.scheduler.updates == list(range(1, 2 * updates + 1))
    for got, want in zip(run.model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_start_line_names_the_lr_a_warmup_climbs_to():
    """The run's first line gives the lr it starts at and, inside a warmup, the lr it warms up to: the paper's
    --lr 2e-3 --warmup-lr 1e-6 read "lr 1e-06" alone. Both as the run logs every lr: the mean over parameter groups,
    each scaled by its --layer-decay lr_scale."""
    from types import SimpleNamespace

    from timm.scheduler import create_scheduler_v2

    from sequencer.engine.train import starting_lr

    def opt(groups, **sched):
        optimizer = torch.optim.SGD([dict(params=[torch.zeros(1, requires_grad=True)], **g) for g in groups], lr=2e-3)
        scheduler, _ = create_scheduler_v2(optimizer, num_epochs=10, warmup_lr=1e-6, updates_per_epoch=4, **sched)
        return SimpleNamespace(optimizer=optimizer, scheduler=scheduler)

    assert starting_lr(opt([{}], warmup_epochs=2), 0, 4) == "lr 1e-06 (warmup to 0.002)"
    assert starting_lr(opt([{}], warmup_epochs=0), 0, 4) == "lr 0.002"
    resumed = opt([{}], warmup_epochs=2)
    resumed.scheduler.step(2)  # a resume at epoch 2 starts past the warmup
    assert starting_lr(resumed, 2, 4) == f"lr {resumed.optimizer.param_groups[0]['lr']:.3g}"
    on_updates = opt([{}], warmup_epochs=2, step_on_epochs=False)  # a warmup of 8 updates
    on_updates.scheduler.step_update(4)
    assert starting_lr(on_updates, 1, 4) == f"lr {1e-6 + (2e-3 - 1e-6) / 2:.3g} (warmup to 0.002)"
    layered = opt([dict(lr_scale=1.0), dict(lr_scale=0.5)], warmup_epochs=2)
    assert starting_lr(layered, 0, 4) == "lr 7.5e-07 (warmup to 0.0015)"
