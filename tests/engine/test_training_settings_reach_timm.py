"""Settings whose loss no other test would notice (issue 25 item 7): each test here fails for one mutation of the
training code that every other test let through (the lr one epoch late, mixup's label smoothing dropped or its
probabilities swapped, EMA warmup forced on, validation of other weights than the ones the run evaluated by default)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sequencer
from run_helpers import TINY_MODEL, summary_rows, train_cli
from sequencer.engine.checkpoint import atomic_save
from sequencer.engine.config import TrainConfig
from sequencer.engine.distributed import DistInfo
from sequencer.engine.loop import Loaders
from sequencer.engine.train import _build_loss, build_optimization

TINY_KWARGS = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))


@pytest.mark.parametrize("on_updates", [[], ["--sched-on-updates"]])
def test_each_epoch_trains_at_its_own_scheduled_lr(image_folder, tmp_path, on_updates, capsys):
    """--sched step halving every epoch: epochs 0, 1, 2 train at lr, lr/2, lr/4 (the scheduler is stepped to the
    coming epoch after each one, not to the one that ended); the summary row and each step's log line show the lr
    the update used. With --sched-on-updates (3 updates an epoch) they showed the next update's: rows 0.04, 0.02,
    0.01, the last one an lr the run never used."""
    optimizer_lrs = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: optimizer_lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        assert train_cli([image_folder, *TINY_MODEL, "--img-size", "16", "-b", "16", "-j", "0", "--device", "cpu",
                          "--log-interval", "1", "--no-aug", "--epochs", "3", "--warmup-epochs", "0",
                          "--opt", "sgd", "--lr", "0.08", "--sched", "step", "--decay-epochs", "1",
                          "--decay-rate", "0.5", "--output", tmp_path, "--experiment", "lr", *on_updates]) == 0
    finally:
        hook.remove()
    assert optimizer_lrs == pytest.approx([0.08] * 3 + [0.04] * 3 + [0.02] * 3, rel=1e-9)
    lrs = [float(row["lr"]) for row in summary_rows(tmp_path / "lr")]
    assert lrs == pytest.approx([0.08, 0.04, 0.02], rel=1e-9)
    logged = [line.rsplit(" lr ", 1)[1].split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("train: epoch")]
    assert logged == ["8.00e-02"] * 3 + ["4.00e-02"] * 3 + ["2.00e-02"] * 3


def test_mixup_gets_the_smoothing_and_both_probabilities_in_place():
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, mixup_prob=0.7, mixup_switch_prob=0.3, smoothing=0.15)
    mixup, loss = _build_loss(cfg, 10, torch.device("cpu"))
    assert (mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing) == (0.7, 0.3, 0.15)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.num_classes) == (0.8, 1.0, 10)
    # behaviour too: with cutmix off, the smoothed soft targets of an unmixed batch (mixup prob 0 never mixes)
    cfg = TrainConfig(mixup=0.8, cutmix=0.0, mixup_prob=0.0, mixup_switch_prob=1.0, smoothing=0.1)
    mixup, _ = _build_loss(cfg, 4, torch.device("cpu"))
    x, target = torch.randn(2, 3, 4, 4), torch.tensor([1, 3])
    mixed, soft = mixup(x.clone(), target)
    assert torch.equal(mixed, x)
    expected = torch.full((2, 4), 0.1 / 4)
    expected[0, 1] = expected[1, 3] = 1 - 0.1 + 0.1 / 4
    assert torch.allclose(soft, expected)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_warmup_only_when_asked(warmup):
    model = sequencer.create_model("sequencer2d_nano", num_classes=3, img_size=16, **TINY_KWARGS)
    cfg = TrainConfig(model_ema=True, model_ema_decay=0.9, model_ema_warmup=warmup, lr=0.1, epochs=2,
                      warmup_epochs=0)
    loaders = Loaders(None, None, {}, 16, steps_per_epoch=2, updates_per_epoch=2)
    opt = build_optimization(cfg, DistInfo(), model, loaders, 3)
    assert opt.model_ema.use_warmup is warmup
    # behaviour: an EMA update at step 10 after moving the weights averages with the decay asked for, 0.9, or
    # with warmup a smaller one (timm's ramp)
    with torch.no_grad():
        before = opt.model_ema.module.head.fc.bias.clone()
        model.head.fc.bias.add_(1.0)
    opt.model_ema.update(model, step=10)
    at_decay = torch.allclose(opt.model_ema.module.head.fc.bias, before * 0.9 + model.head.fc.bias * 0.1)
    assert at_decay is not warmup


def test_every_loader_takes_the_weights_the_run_evaluated(image_folder, tmp_path, capsys, caplog):
    """A checkpoint whose EMA head is zero (logits 0, loss ln 3) and whose raw head is not. Its run evaluated the EMA
    weights (recorded, or an older file's `model_ema`): validate's default, like the CLI's, evaluates them;
    use_ema=False the raw ones. Its run evaluated the raw model (an EMA kept on the CPU by a GPU run: recorded, or
    read from an older file's settings): validate, load_model, create_model, `checkpoint clean`/`average` and an
    initial checkpoint take the raw weights, as the logged top-1 was measured, and say so; use_ema=True the EMA's."""
    from sequencer.cli import build_parser, main
    from sequencer.engine.config import RunState
    from sequencer.engine.inference import load_model
    from sequencer.engine.train_data import TrainData
    from sequencer.engine.train_model import build_model
    from sequencer.tools.checkpoints import read_weights

    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_nano", num_classes=3, img_size=16, **TINY_KWARGS)
    torch.nn.init.normal_(model.head.fc.weight, std=1.0)
    ema = {k: (torch.zeros_like(v) if k.startswith("head.") else v) for k, v in model.state_dict().items()}
    forced = dict(model_ema=True, model_ema_force_cpu=True)
    records = {"ema": dict(evaluated_weights="ema"), "ema-old": dict(args=dict(model_ema=True)),
               "model": dict(evaluated_weights="model"), "model-old": dict(args=dict(forced, device="cuda:0"))}
    for name, record in records.items():
        atomic_save(dict(version=1, arch="sequencer2d_nano", model_kwargs=dict(model.model_kwargs),
                         class_names=["blue", "green", "red"], state_dict=model.state_dict(), state_dict_ema=ema,
                         epoch=0, epoch_complete=True, **record), tmp_path / f"{name}.pth.tar")

    def loss(name, **kw) -> float:
        return sequencer.validate(str(tmp_path / f"{name}.pth.tar"), str(image_folder), split="val", workers=0,
                                  device="cpu", progress=False, **kw).loss

    def zero_head(module) -> bool:
        return not module.head.fc.weight.detach().any()

    for name in ("ema", "ema-old"):
        assert loss(name) == pytest.approx(math.log(3), abs=1e-4)  # validate reports 5 decimals
        assert abs(loss(name, use_ema=False) - math.log(3)) > 1e-3
    for name in ("model", "model-old"):
        assert abs(loss(name) - math.log(3)) > 1e-3
        assert loss(name, use_ema=True) == pytest.approx(math.log(3), abs=1e-4)
    path = str(tmp_path / "model.pth.tar")
    loaded = load_model(path)
    assert not zero_head(loaded.model) and loaded.weights == "model"
    assert not zero_head(sequencer.create_model("sequencer2d_nano", checkpoint_path=path, **model.model_kwargs))
    assert zero_head(sequencer.create_model("sequencer2d_nano", checkpoint_path=path, use_ema=True,
                                        **model.model_kwargs))
    _, state, took_ema = read_weights(path, None)
    assert state["head.fc.weight"].any() and not took_ema and read_weights(path, True)[2]
    for flags, weights in (([], "model"), (["--use-ema"], "ema")):  # a cleaned file names the weights it holds
        assert main(["checkpoint", "clean", path, *flags, "-o", str(tmp_path / f"{weights}.pth")]) == 0
        cleaned = load_model(str(tmp_path / f"{weights}.pth"))
        assert cleaned.weights == weights and zero_head(cleaned.model) is (weights == "ema")
    def start(name, caplog, **choice) -> bool:  # whether train starts from the EMA (zero) head
        cfg = TrainConfig(initial_checkpoint=str(tmp_path / f"{name}.pth.tar"), img_size=16, **choice)
        data = TrainData(None, None, ["blue", "green", "red"], 3)
        with caplog.at_level(logging.INFO, logger="sequencer"):
            return zero_head(build_model(cfg, RunState(), data, torch.device("cpu"))[0])

    assert not start("model", caplog) and "`initial_checkpoint_ema=True` starts from its EMA weights" in caplog.text
    assert start("model", caplog, initial_checkpoint_ema=True) and start("ema", caplog)
    assert not start("ema", caplog, initial_checkpoint_ema=False)
    # a .safetensors file of ours names its model in its metadata: a new run from it without `model` builds that
    # one (it built the default sequencer2d_s, which refused the weights)
    assert main(["checkpoint", "clean", path, "-o", str(tmp_path / "clean.safetensors")]) == 0
    cfg = TrainConfig(initial_checkpoint=str(tmp_path / "clean.safetensors"), img_size=16)
    built = build_model(cfg, RunState(), TrainData(None, None, ["blue", "green", "red"], 3), torch.device("cpu"))
    assert built[0].model_name == built[1].model == "sequencer2d_nano"
    parse = build_parser("train").parse_args
    assert [vars(parse(["train", "d", *flag])).get("initial_checkpoint_ema") for flag in
            ([], ["--initial-checkpoint-ema"], ["--no-initial-checkpoint-ema"])] == [None, True, False]

    # the command says which weights it took: a note where they are not the EMA's, and the result line names them
    capsys.readouterr()
    for flags, named in (([], "raw model weights"), (["--use-ema"], "EMA weights")):
        assert main(["validate", str(image_folder), "--split", "val", "--checkpoint", path, "-j", "0", "--device",
                     "cpu", *flags]) == 0
        out = capsys.readouterr()
        assert "sequencer2d_nano (" in out.out and f"M params, {named}) at 16px" in out.out
        note = ("loading its raw model weights, the ones its run evaluated and logged, not its EMA weights; "
                "--use-ema takes its EMA weights")
        assert (note in out.out + out.err) is not bool(flags)
