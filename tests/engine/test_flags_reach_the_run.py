"""Each `sequencer train` flag that changes numbers reaches the object the run builds (issue: no flag silently
ignored). The reference is timm's own factory given the flag's value by hand (never our mapping of the flags), and
each case also checks that the flag changes the object, so a flag dropped on the way fails here. Resume-time flags
(`drop`, `drop_path`, `lr_base`) are checked on a resumed run's checkpoint."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import sequencer
from run_helpers import TINY_MODEL, TINY_RUN, train_cli
from sequencer.data import create_dataset
from sequencer.engine.config import TrainConfig
from sequencer.engine.distributed import DistInfo
from sequencer.engine.loop import Loaders
from sequencer.engine.train import _build_loss, build_loaders, build_optimization, restore
from sequencer.engine.train_data import TrainData
from sequencer.errors import SequencerError
from sequencer.models.loading import read_checkpoint

TINY_KWARGS = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
UPDATES = 3  # updates per epoch of the schedules below


def _model(num_classes=3):
    torch.manual_seed(0)
    return sequencer.create_model("sequencer2d_nano", num_classes=num_classes, img_size=16, **TINY_KWARGS)


def _optimization(**settings):
    cfg = TrainConfig(**{"lr": 0.1, "epochs": 6, "warmup_epochs": 0, **settings})
    loaders = Loaders(None, None, {}, 16, steps_per_epoch=UPDATES, updates_per_epoch=UPDATES)
    return build_optimization(cfg, DistInfo(), _model(), loaders, 3)


def _hyperparameters(optimizer) -> list[dict]:
    # the lr is the schedule's (times each group's lr_scale with --layer-decay), set once a scheduler is built
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]


@pytest.mark.parametrize("settings, reference", [
    (dict(opt="adamw", opt_eps=1e-6, opt_betas=[0.8, 0.95], weight_decay=0.03),
     dict(opt="adamw", eps=1e-6, betas=(0.8, 0.95), weight_decay=0.03)),
    (dict(opt="sgd", momentum=0.7, weight_decay=1e-3), dict(opt="sgd", momentum=0.7, weight_decay=1e-3)),
    (dict(opt="adamw", layer_decay=0.5), dict(opt="adamw", layer_decay=0.5, weight_decay=2e-5)),
])
def test_optimizer_flags_reach_the_param_groups(settings, reference):
    from timm.optim import create_optimizer_v2
    ours = _hyperparameters(_optimization(**settings).optimizer)
    theirs = _hyperparameters(create_optimizer_v2(_model(), lr=0.1, **reference))
    assert ours == theirs
    default = _hyperparameters(_optimization(opt=settings["opt"]).optimizer)
    assert ours != default  # the flags changed something


SCHEDULES = [  # (train flags, timm's create_scheduler_v2 keywords for the same schedule)
    (dict(sched="cosine", lr_cycle_mul=2.0, lr_cycle_decay=0.3, lr_cycle_limit=3, lr_k_decay=1.5, min_lr=1e-3,
          warmup_epochs=1, warmup_lr=1e-2, warmup_prefix=True, cooldown_epochs=2),
     dict(sched="cosine", cycle_mul=2.0, cycle_decay=0.3, cycle_limit=3, k_decay=1.5, min_lr=1e-3,
          warmup_epochs=1, warmup_lr=1e-2, warmup_prefix=True, cooldown_epochs=2)),
    (dict(sched="multistep", decay_milestones=[2, 4], decay_rate=0.3),
     dict(sched="multistep", decay_milestones=[2, 4], decay_rate=0.3)),
    (dict(sched="step", decay_epochs=2, decay_rate=0.5), dict(sched="step", decay_epochs=2, decay_rate=0.5)),
    (dict(sched="cosine", lr_noise=[0.2, 0.9], lr_noise_pct=0.5, lr_noise_std=2.0, seed=7),
     dict(sched="cosine", noise=[0.2, 0.9], noise_pct=0.5, noise_std=2.0, noise_seed=7)),
    (dict(sched="poly", decay_rate=2.0, sched_on_updates=True, warmup_epochs=2, warmup_lr=1e-3),
     dict(sched="poly", decay_rate=2.0, step_on_epochs=False, warmup_epochs=2, warmup_lr=1e-3)),
    (dict(sched="plateau", patience_epochs=1, decay_rate=0.5), dict(sched="plateau", patience_epochs=1,
                                                                     decay_rate=0.5, plateau_mode="max")),
]


def _lrs(scheduler, optimizer, num_epochs: int) -> list[float]:
    """The lr of every update of ``num_epochs`` epochs, stepping as the training loop does (a falling metric: a
    loss improving, a top-1 getting worse)."""
    lrs, update = [], 0
    for epoch in range(num_epochs):
        for _ in range(UPDATES):
            lrs.append(optimizer.param_groups[0]["lr"])
            update += 1
            scheduler.step_update(num_updates=update, metric=1.0)
        scheduler.step(epoch + 1, 1.0 / (epoch + 1))
    return lrs


@pytest.mark.parametrize("settings, reference", SCHEDULES, ids=[s["sched"] for s, _ in SCHEDULES])
def test_schedule_flags_match_timms_scheduler(settings, reference):
    from timm.scheduler import create_scheduler_v2
    ours = _optimization(**settings)
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.1)
    theirs, num_epochs = create_scheduler_v2(optimizer, **{"num_epochs": 6, "warmup_epochs": 0, **reference},
                                             updates_per_epoch=UPDATES)
    assert ours.num_epochs == num_epochs
    got = _lrs(ours.scheduler, ours.optimizer, num_epochs)
    assert got == pytest.approx(_lrs(theirs, optimizer, num_epochs), rel=1e-12)
    default = _optimization(sched=settings["sched"])
    assert got != pytest.approx(_lrs(default.scheduler, default.optimizer, default.num_epochs), rel=1e-9)
    assert len(set(got)) > 1  # the schedule moves within the steps compared


def test_eval_metric_loss_is_what_the_plateau_schedule_minimises():
    """A falling metric is a loss improving (no decay) under `eval_metric=loss`, a top-1 worsening otherwise."""
    loss, top1 = (_optimization(sched="plateau", patience_epochs=1, eval_metric=metric) for metric in ("loss", "top1"))
    assert set(_lrs(loss.scheduler, loss.optimizer, 6)) == {0.1}
    assert min(_lrs(top1.scheduler, top1.optimizer, 6)) < 0.1


@pytest.mark.parametrize("settings, kind, fields", [
    (dict(bce_loss=True, bce_target_thresh=0.3, smoothing=0.2), "BinaryCrossEntropy",
     dict(smoothing=0.2, target_threshold=0.3)),
    (dict(bce_loss=True, smoothing=0.2, mixup=0.5), "BinaryCrossEntropy", dict(smoothing=0.0)),  # Mixup smooths
    (dict(smoothing=0.25), "LabelSmoothingCrossEntropy", dict(smoothing=0.25)),
    (dict(smoothing=0.0), "CrossEntropyLoss", {}),
    (dict(cutmix_minmax=[0.2, 0.6], mixup_mode="pair"), "SoftTargetCrossEntropy", {}),
])
def test_loss_flags_build_the_loss_asked_for(settings, kind, fields):
    mixup, loss = _build_loss(TrainConfig(**settings), 3, torch.device("cpu"))
    assert type(loss).__name__ == kind
    assert {k: getattr(loss, k) for k in fields} == fields
    if "cutmix_minmax" in settings:
        assert (mixup.cutmix_minmax, mixup.mode) == ([0.2, 0.6], "pair")
    assert (mixup is None) == (kind not in ("SoftTargetCrossEntropy",) and "mixup" not in settings)


def test_no_aug_turns_mixup_off():
    mixup, loss = _build_loss(TrainConfig(mixup=0.8, no_aug=True, smoothing=0.1), 3, torch.device("cpu"))
    assert mixup is None and type(loss).__name__ == "LabelSmoothingCrossEntropy"


@pytest.mark.parametrize("force_cpu", [False, True])
def test_ema_flags_reach_the_ema(force_cpu):
    opt = _optimization(model_ema=True, model_ema_decay=0.99, model_ema_force_cpu=force_cpu)
    assert opt.model_ema.decay == 0.99
    assert opt.model_ema.device == ("cpu" if force_cpu else None)
    assert _optimization().model_ema is None


@pytest.fixture(scope="module")
def train_data(image_folder) -> TrainData:
    train = create_dataset("", root=str(image_folder), split="train", is_training=True)
    val = create_dataset("", root=str(image_folder), split="val")
    return TrainData(train, val, list(train.class_names), 3)


def _transforms(cfg, data):
    loaders = build_loaders(cfg, DistInfo(), _model(), data)
    return loaders, repr(loaders.train.dataset.dataset.transform), repr(loaders.eval.dataset.dataset.transform)


STATS = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))


def test_augmentation_and_preprocessing_flags_reach_the_transforms(train_data):
    """The train transform is timm's for the augmentation flags, the eval transform timm's for --crop-pct,
    --interpolation, --mean and --std (both normalise with them); -vb is the eval batch size."""
    from timm.data import create_transform
    cfg = TrainConfig(img_size=16, batch_size=4, validation_batch_size=3, workers=0, device="cpu", hflip=0.25,
                      scale=[0.3, 0.9], ratio=[0.5, 2.0], color_jitter=0.2, train_interpolation="bilinear",
                      reprob=0.3, remode="const", recount=2, aa="rand-m3-n1", crop_pct=0.8, interpolation="nearest",
                      mean=list(STATS["mean"]), std=list(STATS["std"]))
    loaders, train, val = _transforms(cfg, train_data)
    assert train == repr(create_transform((3, 16, 16), is_training=True, hflip=0.25, scale=(0.3, 0.9),
                                          ratio=(0.5, 2.0), color_jitter=0.2, interpolation="bilinear",
                                          auto_augment="rand-m3-n1", re_prob=0.3, re_mode="const", re_count=2,
                                          **STATS))
    assert val == repr(create_transform((3, 16, 16), crop_pct=0.8, interpolation="nearest", **STATS))
    assert loaders.eval.batch_size == 3 and loaders.train.batch_size == 4
    assert loaders.data_config == dict(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], crop_pct=0.8,
                                       interpolation="nearest", img_size=16)  # what checkpoints record


def test_no_aug_trains_on_the_eval_resize(train_data):
    """--no-aug: no flip, jitter, erasing or policy, and the eval interpolation (a random one is augmentation)."""
    from timm.data import create_transform
    cfg = TrainConfig(img_size=16, batch_size=4, workers=0, device="cpu", no_aug=True, aa="rand-m3-n1", reprob=0.5,
                      interpolation="bilinear")
    loaders, train, _ = _transforms(cfg, train_data)
    stats = dict(mean=loaders.data_config["mean"], std=loaders.data_config["std"])  # the model's
    assert train == repr(create_transform((3, 16, 16), is_training=True, hflip=0.0, scale=(1.0, 1.0),
                                          ratio=(1.0, 1.0), color_jitter=0.0, interpolation="bilinear", **stats))


def test_lr_base_scale_other_than_linear_or_sqrt_is_refused(image_folder, tmp_path):
    """It used to scale linearly whatever it said."""
    with pytest.raises(SequencerError, match=r"`lr_base_scale=lin`: is 'linear' or 'sqrt'"):
        sequencer.train(str(image_folder), lr_base_scale="lin", output=str(tmp_path), progress=False)
    assert not any(tmp_path.iterdir())


def test_no_resume_opt_and_start_epoch_reach_the_restore():
    """--no-resume-opt starts a fresh optimizer state; --start-epoch moves the schedule there."""
    checkpoint = dict(_trained_checkpoint(opt="adamw"), epoch=1)
    for fresh in (False, True):
        opt = _optimization(opt="adamw")
        cfg = TrainConfig(opt="adamw", no_resume_opt=fresh)
        with pytest.warns(UserWarning, match="RNG state missing"):
            assert restore(cfg, DistInfo(), checkpoint, opt, UPDATES) == 2
        assert (len(opt.optimizer.state) == 0) is fresh
    with warnings.catch_warnings():  # rank 1 of 2 reseeds too, and leaves the note to rank 0 (each rank said it)
        warnings.simplefilter("error")
        assert restore(TrainConfig(opt="adamw"), DistInfo(True, 1, 1, 2), checkpoint, _optimization(opt="adamw"),
                       UPDATES) == 2
    assert torch.initial_seed() == TrainConfig().seed + 2 + 1  # timm's random_seed(seed + start epoch, rank)
    opt = _optimization(sched="step", decay_epochs=1, decay_rate=0.5)
    assert restore(TrainConfig(start_epoch=3), DistInfo(), None, opt, UPDATES) == 3
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_a_resume_runs_the_drop_rates_and_lr_base_given(image_folder, tmp_path):
    """`drop`, `drop_path` and `lr_base` given to a resume are the ones it trains with: they used to be recorded in
    args.yaml while the model kept the checkpoint's rates and the lr the one derived from the old `lr_base`.
    Without the flags a resume keeps the checkpoint's."""
    run = [str(a) for a in TINY_RUN]
    del run[run.index("--lr"):run.index("--lr") + 2]
    common = [image_folder, *run, "--output", tmp_path, "--experiment", "x"]
    with pytest.warns(UserWarning, match="`clip_mode=agc` applies only with `clip_grad`"):  # said at the start
        assert train_cli([*common, "--epochs", "1", "--lr-base", "0.01", "--drop-path", "0.1",
                          "--clip-mode", "agc"]) == 0
    first = read_checkpoint(tmp_path / "x" / "last.pth.tar")
    assert first["args"]["lr"] == pytest.approx(0.01 * (8 / 256) ** 0.5)  # adamw: sqrt scaling
    init = tmp_path / "init.pth.tar"
    init.write_bytes((tmp_path / "x" / "last.pth.tar").read_bytes())
    with pytest.warns(UserWarning, match="`initial_checkpoint=.*` sets a new run's weights; a resume continues"):
        assert train_cli([*common, "--resume", "auto", "--epochs", "2", "--initial-checkpoint", init]) == 0
    kept = read_checkpoint(tmp_path / "x" / "last.pth.tar")
    assert kept["args"]["lr"] == first["args"]["lr"] and kept["model_kwargs"]["drop_path_rate"] == 0.1
    assert train_cli([*common, "--resume", "auto", "--epochs", "3", "--lr-base", "0.02", "--drop", "0.2",
                      "--drop-path", "0.3"]) == 0
    resumed = read_checkpoint(tmp_path / "x" / "last.pth.tar")
    assert resumed["args"]["lr"] == pytest.approx(0.02 * (8 / 256) ** 0.5)
    assert (resumed["model_kwargs"]["drop_rate"], resumed["model_kwargs"]["drop_path_rate"]) == (0.2, 0.3)


@pytest.mark.parametrize("settings, note", [
    (dict(clip_mode="agc"), "`clip_mode=agc` applies only with `clip_grad`"),
    (dict(bce_target_thresh=0.2), "`bce_target_thresh=0.2` applies only with `bce_loss`"),
    (dict(model_ema_decay=0.99), "`model_ema_decay=0.99` applies only with `model_ema`"),
    (dict(amp_dtype="bfloat16"), "`amp_dtype=bfloat16` applies only with `amp` (this run computes in float32)"),
    (dict(torchcompile_mode="max-autotune"), "`torchcompile_mode=max-autotune` applies only with `torchcompile`"),
    (dict(mixup_prob=0.5), "`mixup_prob=0.5` applies only with `mixup` or `cutmix`"),
    (dict(patience_epochs=3), "`patience_epochs=3` is not read by `sched=cosine` (only by plateau)"),
    (dict(lr=0.1, lr_base=0.5), "`lr_base=0.5` derives an lr, and `lr` is given"),
    (dict(no_aug=True, reprob=0.25), "`reprob=0.25` is off with `no_aug`"),
    (dict(warmup_epochs=0, warmup_lr=1e-3), "`warmup_lr=0.001` applies only with `warmup_epochs` above 0"),
    (dict(sched="none", cooldown_epochs=2), "`cooldown_epochs=2` is not read by `sched=none` (a constant lr)"),
])
def test_a_flag_that_does_nothing_in_the_run_is_said(settings, note):
    from sequencer.engine.inert_flags import notes
    assert notes(TrainConfig(**settings), frozenset(settings)) == [f"{note}; it has no effect in this run"]


def test_an_output_a_resume_does_not_use_is_said():
    """`resume=PATH` without `experiment` continues in PATH's folder: an `output` given beside it does nothing."""
    from sequencer.engine.inert_flags import notes
    given = dict(resume="run/last.pth.tar", output="elsewhere")
    assert notes(TrainConfig(**given), frozenset(given), resuming=True) == [
        "`output=elsewhere` is not where a resume without `experiment` writes: it continues in its checkpoint's "
        "folder; it has no effect in this run"]
    given["experiment"] = "e"  # writes to elsewhere/e
    assert notes(TrainConfig(**given), frozenset(given), resuming=True) == []


def test_input_size_is_in_chans_and_img_size(tmp_path):
    """`input_size C H W` sets the size the run and a resume train at (a resume used to drop it for its checkpoint's
    `img_size`); an `img_size` given beside it with another value is refused (timm silently took `input_size`), and
    either flag beats the other spelling in a `config` file (an args.yaml's `input_size` used to win over the
    `img_size` flag)."""
    from sequencer.engine.config import RunState, resolve_config
    from sequencer.engine.config_checks import check_config

    def run_size(settings):
        state = RunState()
        cfg = check_config(resolve_config(dict(settings, epochs=4), state), state)
        assert {"in_chans", "img_size"} <= state.given
        return cfg.in_chans, cfg.img_size

    assert run_size({"input_size": [1, 32, 32]}) == (1, 32)  # the digits demo's own img_size is 16
    with pytest.raises(SequencerError, match=r"^`img_size=48` vs `input_size=3 32 32` \(hint: give one of them"):
        run_size({"input_size": [3, 32, 32], "img_size": 48})
    (tmp_path / "args.yaml").write_text("input_size: [3, 16, 16]\nimg_size: 16\nin_chans: 3\n")
    assert run_size({"config": tmp_path / "args.yaml", "img_size": 48}) == (3, 48)
    assert run_size({"config": tmp_path / "args.yaml", "input_size": [3, 32, 32]}) == (3, 32)
    assert run_size({"config": tmp_path / "args.yaml"}) == (3, 16)


def test_a_resumes_in_chans_is_compared_with_its_models():
    """A run started without `in_chans` records None; a resume given 3 (or `input_size 3 ...`) was refused as "vs the
    checkpoint's None". An args.yaml's `in_chans: null` (as `config`) asks for nothing."""
    from sequencer.engine.resume import apply_resume_contract
    checkpoint = dict(arch="sequencer2d_nano", model_kwargs=dict(in_chans=3, num_classes=3), args=dict(in_chans=None),
                      class_names=["a", "b", "c"])
    for in_chans in (3, None):
        apply_resume_contract(TrainConfig(in_chans=in_chans), frozenset({"in_chans"}), checkpoint, "run/last.pth.tar",
                              ["a", "b", "c"])
    with pytest.raises(SequencerError, match=r"^`resume=run/last.pth.tar`: `in_chans=1` vs the checkpoint's 3"):
        apply_resume_contract(TrainConfig(in_chans=1), frozenset({"in_chans"}), checkpoint, "run/last.pth.tar",
                              ["a", "b", "c"])


def test_a_resume_at_another_size_keeps_a_position_embeddings_grid():
    """v_sequencer_s_pe's position embedding is sized by `img_size`: a resume at another size keeps the checkpoint's
    grid (its optimizer moments have that shape), interpolated to the new inputs, and says so; a Sequencer2d (no
    parameter depends on the size) is rebuilt at the new size."""
    from sequencer.engine.config import RunState
    from sequencer.engine.train_model import build_model
    pe_kwargs = dict(TINY_KWARGS, hidden_sizes=(8, 8))  # a 1D LSTM's output (2 x hidden) is the embedding width
    for name, kwargs, kept in (("v_sequencer_s_pe", pe_kwargs, 16), ("sequencer2d_nano", TINY_KWARGS, 32)):
        trained = sequencer.create_model(name, num_classes=3, img_size=16, **kwargs)
        checkpoint = dict(arch=name, model_kwargs=trained.model_kwargs, state_dict=trained.state_dict(), epoch=0,
                          args=dict(model=name, model_kwargs=kwargs, img_size=16))
        cfg, state = TrainConfig(model=name, model_kwargs=kwargs, img_size=32), RunState()
        data = TrainData(None, None, ["a", "b", "c"], 3, resume_path="run/last.pth.tar", resume_ckpt=checkpoint)
        model, run_cfg = build_model(cfg, state, data, torch.device("cpu"))
        assert (model.img_size, run_cfg.img_size, model.model_kwargs["img_size"]) == (kept, 32, kept)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
        noted = [f"`img_size=32`: {name} keeps the checkpoint's 16 px model (absolute_pos_embed sized for it"]
        assert [w[:len(noted[0])] for w in state.start_warnings] == (noted if kept == 16 else [])


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_mode_reaches_the_gradient_clipping(mode):
    """`clip_grad` with each `clip_mode` clips the update as torch's / timm's own clipping of that kind does (before,
    only `norm` was checked to reach it); the three kinds clip these gradients differently. `agc` leaves the
    classifier (the last two parameters) out, as timm's train.py does (it clipped the head too: after one step of a
    sequencer2d_nano run at `clip_grad=0.01`, lr 0.5, the head's weights were 0.045 off timm's)."""
    from types import SimpleNamespace

    from timm.utils.agc import adaptive_clip_grad
    from sequencer.engine.loop import _update
    reference = {"norm": lambda p: torch.nn.utils.clip_grad_norm_(p, 0.5),
                 "value": lambda p: torch.nn.utils.clip_grad_value_(p, 0.5),
                 "agc": lambda p: adaptive_clip_grad(p[:-2], 0.5),
                 "agc with the head": lambda p: adaptive_clip_grad(p, 0.5)}

    def gradients_of_one_batch():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
        (model(torch.randn(8, 4)) * 10).pow(2).mean().backward()
        return model, torch.optim.SGD(model.parameters(), lr=1.0)

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def stepped_after(clip):  # the reference: the clipped gradient, stepped by SGD at lr 1
        model, sgd = gradients_of_one_batch()
        clip(list(model.parameters()))
        sgd.step()
        return flat(model)

    ours, optimizer = gradients_of_one_batch()
    opt = SimpleNamespace(optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), model_ema=None,
                          scheduler=None)
    _update(SimpleNamespace(cfg=TrainConfig(clip_grad=0.5, clip_mode=mode), opt=opt, model=ours), 1, 0.0)
    expected = {name: stepped_after(clip) for name, clip in reference.items()}
    assert torch.allclose(flat(ours), expected[mode], atol=1e-6)
    assert all(not torch.allclose(flat(ours), expected[other], atol=1e-4) for other in expected if other != mode)


def test_weights_for_a_new_run_are_said_on_a_resume():
    from sequencer.engine.inert_flags import notes
    given = dict(initial_checkpoint="w.pth", pretrained=True)
    assert notes(TrainConfig(**given), frozenset(given)) == []  # a first start (`resume=auto` found nothing)
    assert notes(TrainConfig(**given), frozenset(given), resuming=True) == [
        f"`{name}` sets a new run's weights; a resume continues from its checkpoint's; it has no effect in this run"
        for name in ("initial_checkpoint=w.pth", "pretrained=True")]


def test_flags_that_act_or_keep_their_default_are_not_said():
    from sequencer.engine.inert_flags import notes
    acting = dict(clip_grad=1.0, clip_mode="agc", model_ema=True, model_ema_decay=0.99, sched="plateau",
                  patience_epochs=3, mixup=0.8, mixup_prob=0.5, amp=True, amp_dtype="bfloat16", lr_base=0.5)
    assert notes(TrainConfig(**acting), frozenset(acting)) == []
    at_default = dict(clip_mode="norm", remode="pixel", model_ema_decay=0.9998)  # e.g. an args.yaml as --config
    assert notes(TrainConfig(**at_default), frozenset(at_default)) == []
    off = dict(no_aug=True, hflip=0.0, reprob=0.0, color_jitter=0.0)  # no augmentation asked for: none unused
    assert notes(TrainConfig(**off), frozenset(off)) == []


def test_mixup_turns_off_from_mixup_off_epoch_also_in_a_resumed_run():
    from types import SimpleNamespace

    from sequencer.engine.loop import _set_epoch
    cfg = TrainConfig(mixup=0.8, mixup_off_epoch=2)
    for start in (0, 3):  # a fresh run, and one resumed past the off epoch (a new Mixup)
        mixup, _ = _build_loss(cfg, 3, torch.device("cpu"))
        run = SimpleNamespace(cfg=cfg, opt=SimpleNamespace(mixup_fn=mixup),
                              loaders=SimpleNamespace(train=SimpleNamespace(set_epoch=lambda epoch: None)))
        enabled = []
        for epoch in range(start, 4):
            _set_epoch(run, epoch)
            enabled.append(mixup.mixup_enabled)
        assert enabled == [True, True, False, False][start:]


@pytest.mark.parametrize("device, expected", [
    ("cuda", dict(pin_memory=True, normalize_on_device=False)),
    ("cpu", dict(pin_memory=None, normalize_on_device=False)),  # no page-locking without a GPU (a note says so)
])
def test_pin_mem_and_no_prefetcher_reach_the_loader_options(device, expected):
    from sequencer.engine import timm_habits
    cfg = TrainConfig(pin_mem=True, no_prefetcher=True)
    assert timm_habits.loader_options(cfg, torch.device(device)) == expected
    assert timm_habits.loader_options(TrainConfig(), torch.device(device)) == dict(pin_memory=None,
                                                                                  normalize_on_device=None)


def test_lr_base_reaches_the_digits_demo():
    """The demo's own lr (2e-3) used to win over a `lr_base` given without `lr`."""
    from sequencer.engine.config import resolve_config
    from sequencer.engine.train import resolved_lr
    assert resolve_config({}).lr == 2e-3
    derived = resolve_config({"lr_base": 0.05, "lr_base_scale": "linear"})
    assert resolved_lr(derived, world_size=2) == pytest.approx(0.05 * 32 * 2 / 256)  # demo batch 32, 2 processes
    assert resolve_config({"lr_base": 0.05, "lr": 1e-3}).lr == 1e-3


def test_seed_decides_the_run(image_folder, tmp_path):
    """The same --seed trains to the same numbers (weights, shuffling, augmentation), another one does not; the
    loaders draw from it."""
    settings = dict(model="sequencer2d_nano", model_kwargs=TINY_KWARGS, img_size=16, batch_size=8, workers=0,
                    device="cpu", opt="adamw", lr=3e-3, warmup_epochs=0, epochs=1, output=str(tmp_path),
                    progress=False)

    def losses(seed, name):
        result = sequencer.train(str(image_folder), seed=seed, experiment=name, **settings)
        return [(row["train_loss"], row["eval_loss"]) for row in result.summary]

    assert losses(3, "a") == losses(3, "b") != losses(4, "c")
    loaders = build_loaders(TrainConfig(img_size=16, batch_size=4, workers=0, seed=11), DistInfo(), _model(),
                            TrainData(create_dataset("", root=str(image_folder), split="train", is_training=True),
                                      None, ["blue", "green", "red"], 3))
    assert loaders.train.seed == 11


def _trained_checkpoint(**settings) -> dict:
    """A checkpoint of one optimizer step (its state non-empty) of a run with ``settings``, after epoch 0."""
    trained = _optimization(**settings)
    trained.optimizer.zero_grad()
    sum(p.sum() for g in trained.optimizer.param_groups for p in g["params"]).backward()
    trained.optimizer.step()
    return dict(epoch=0, epoch_complete=True, optimizer=trained.optimizer.state_dict(), rng_state=None,
                args=dict(lr=0.1, **settings))  # no RNG state: restore reseeds, with a warning


@pytest.mark.parametrize("sched", ["none", "plateau", "cosine"])
def test_a_resume_runs_the_optimizer_settings_given(sched):
    """The optimizer's state is resumed, its hyperparameters are this start's: the saved groups used to win, so a
    new `lr` (with `sched=none` or `plateau`), `weight_decay`, `opt_betas` or `opt_eps` did nothing."""
    checkpoint = _trained_checkpoint(opt="adamw", sched=sched)
    new = dict(opt="adamw", sched=sched, lr=0.02, weight_decay=0.3, opt_betas=[0.8, 0.9], opt_eps=1e-5)
    opt = _optimization(**new)
    with pytest.warns(UserWarning, match="RNG state"):
        restore(TrainConfig(**new), DistInfo(), checkpoint, opt, UPDATES)
    groups = opt.optimizer.param_groups
    assert len(opt.optimizer.state) > 0  # the moments are the checkpoint's
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3} and {g["betas"] for g in groups} == {(0.8, 0.9)}
    assert {g["eps"] for g in groups} == {1e-5}
    if sched != "cosine":  # cosine: the schedule's value at epoch 1 of 6
        assert {g["lr"] for g in groups} == {0.02}


def test_a_resumed_plateau_keeps_its_reduced_lr_unless_lr_is_given():
    checkpoint = _trained_checkpoint(opt="adamw", sched="plateau")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["lr"] = 0.01  # reduced by the plateau from the run's 0.1
    for lr, expected in ((0.1, 0.01), (0.05, 0.05)):
        opt = _optimization(opt="adamw", sched="plateau", lr=lr)
        with pytest.warns(UserWarning, match="RNG state"):
            restore(TrainConfig(opt="adamw", sched="plateau", lr=lr), DistInfo(), checkpoint, opt, UPDATES)
        assert {g["lr"] for g in opt.optimizer.param_groups} == {expected}


def test_what_counts_as_evaluating_otherwise():
    """Other weights or another split count (a split's synonyms do not, nor weights when nothing is evaluated); a
    checkpoint written before `evaluated_weights` was recorded is read from its `model_ema` flag."""
    from sequencer.engine.resume import evaluation_change
    val, ema = dict(data=dict(split="val"), evaluated_weights="ema"), "the EMA weights on split 'val'"
    assert evaluation_change(val, "ema", dict(split="validation")) is None
    assert evaluation_change(val, "model", dict(split="val")) == (ema, "the raw model weights on split 'val'")
    assert evaluation_change(val, "ema", dict(split="test")) == (ema, "the EMA weights on split 'test'")
    assert evaluation_change(val, "ema", dict(split=None)) == (ema, "nothing (no held-out split)")
    assert evaluation_change(dict(data=dict(split=None), evaluated_weights="ema"), "model", dict(split=None)) is None
    assert evaluation_change(dict(args=dict(model_ema=True)), "model", dict(split="val"))[0] == ema
    # ... except an EMA kept on the CPU by a GPU run (`model_ema_force_cpu`), which evaluated the raw model: its
    # `device`, or where it was left to the run, CUDA's RNG state in the file (it was read as the EMA's)
    raw = "the raw model weights on split 'val'"
    forced = dict(model_ema=True, model_ema_force_cpu=True)
    for device, rng, before in (("cuda:1", [{}], raw), (None, [{"cuda": []}], raw), (None, [{}], ema),
                                ("cpu", [{"cuda": []}], ema)):
        old = dict(args=dict(forced, device=device), rng_state=rng)
        assert evaluation_change(old, "ema", dict(split="val")) == (None if before == ema else (raw, ema))
    # the caller's validation Dataset (`sequencer.train(data=(train, val))`) is told apart by its length: another
    # one, or a split where there was one, kept a stale best; a checkpoint from before the length was recorded is not
    from types import SimpleNamespace
    from sequencer.engine.config import RunState
    from sequencer.engine.data_record import CALLERS_DATA, evaluated_data
    callers = evaluated_data(None, RunState(datasets=([], [])), SimpleNamespace(dataset=range(40)))
    assert callers == dict(CALLERS_DATA, images=40)
    given = dict(data=callers, evaluated_weights="ema")
    assert evaluation_change(given, "ema", dict(callers)) is None
    assert evaluation_change(dict(given, data=CALLERS_DATA), "ema", dict(callers)) is None
    assert evaluation_change(given, "ema", dict(callers, images=50)) == (
        "the EMA weights on the validation Dataset of 40 images given to sequencer.train",
        "the EMA weights on the validation Dataset of 50 images given to sequencer.train")
    assert evaluation_change(val, "ema", callers)[1] == evaluation_change(given, "ema", dict(split="val"))[0]
    carved = dict(split="train", files=["a/1.png", "b/2.png"])
    assert evaluation_change(dict(data=carved, evaluated_weights="model"), "ema", carved) == (
        "the raw model weights on the 2 images held out of 'train'", "the EMA weights on the 2 images held out of "
        "'train'")


def test_a_resume_evaluating_otherwise_restarts_the_plateaus_best():
    """The plateau schedule's best metric is the checkpoint's (`fresh_metric` False), unless the resume evaluates other
    weights or data (`resume.evaluation_change`): it starts again, as the run's best epoch does."""
    checkpoint = dict(_trained_checkpoint(opt="adamw", sched="plateau"), scheduler={"best": 91.0, "last_epoch": 1})
    for fresh, best in ((False, 91.0), (True, -math.inf)):
        opt = _optimization(opt="adamw", sched="plateau")
        with pytest.warns(UserWarning, match="RNG state"):
            restore(TrainConfig(opt="adamw", sched="plateau", lr=0.1), DistInfo(), checkpoint, opt, UPDATES,
                    fresh_metric=fresh)
        assert opt.scheduler.state_dict()["best"] == best


RANKS_SCRIPT = '''
import json, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from sequencer.engine.distributed import DistInfo, broadcast_weights

def rank_main(rank, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(rank)  # as a model built by name under DDP: each rank's own seed
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    model[1].running_mean.add_(rank)
    broadcast_weights(model, DistInfo(distributed=True, rank=rank, world_size=2))
    flat = torch.cat([t.float().flatten() for t in model.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    json.dump(dict(same=bool(torch.equal(*gathered)), channels_last=model[0].weight.is_contiguous(
        memory_format=torch.channels_last)), open(f"{folder}/rank{rank}.json", "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1],), nprocs=2)
'''


@pytest.mark.slow  # two spawned processes: about 15 s on 2 busy cores
def test_every_rank_starts_from_rank_0s_weights(tmp_path):
    """Under DDP a model built by name was initialised from each rank's seed and the --model-ema copy taken before
    DDP synced the weights, so each rank evaluated its own EMA; the run now gives every rank rank 0's weights and
    buffers first (channels-last ones too)."""
    import json
    import subprocess
    import sys

    from run_helpers import subprocess_env
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {k: v for k, v in subprocess_env().items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == dict(same=True, channels_last=True)


def test_a_val_fraction_runs_split_name_is_fixed_on_resume():
    """A run that held out files of its training images evaluates on them when resumed: a `val_split` naming another
    split did nothing in silence; it is refused like `val_fraction`. Its own value (an args.yaml as `config`) passes."""
    from sequencer.engine.resume import apply_resume_contract
    checkpoint = dict(arch="sequencer2d_nano", model_kwargs=dict(num_classes=2), class_names=["a", "b"],
                      args=dict(val_split="validation", val_fraction=0.5),
                      data=dict(dataset="", root="/d", split="train", files=["a/1.png", "b/1.png"], files_in="/d"))
    apply_resume_contract(TrainConfig(val_split="validation"), frozenset({"val_split"}), checkpoint, "r/last.pth.tar",
                          ["a", "b"])
    with pytest.raises(SequencerError, match=r"^`resume=r/last.pth.tar`: `val_split=test` vs the checkpoint's "
                                             r"validation \(hint: drop `val_split` when resuming \(its run evaluates"):
        apply_resume_contract(TrainConfig(val_split="test"), frozenset({"val_split"}), checkpoint, "r/last.pth.tar",
                              ["a", "b"])
    del checkpoint["data"]["files"]  # a run evaluated on a split of its own: another one is a resume's choice
    apply_resume_contract(TrainConfig(val_split="test"), frozenset({"val_split"}), checkpoint, "r/last.pth.tar",
                          ["a", "b"])
