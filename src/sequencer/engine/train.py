"""Training as a library: :func:`train` (what ``sequencer train`` runs), timm-compatible training, fine-tuning and
transfer of Sequencer models.

Settings (:class:`~sequencer.engine.config.TrainConfig`, the command's flags) keep the names and meaning of timm's ``train.py`` (the paper's recipes run unchanged); the library pieces
are timm's (optimizer/scheduler factories, Mixup/CutMix, RandAugment and random erasing in the data pipeline,
ModelEmaV3, losses). With no DATA argument it trains ``sequencer2d_nano`` on the scikit-learn digits (embedded,
nothing downloaded) with defaults tuned for a couple of CPU cores.

Outputs (rank 0 only), as timm writes them: ``OUTPUT/EXPERIMENT/{args.yaml, summary.csv, summary.png,
last.pth.tar, model_best.pth.tar, checkpoint-<epoch>.pth.tar}``. Epochs are numbered from 0 as in timm.

Faults: checkpoints are written atomically; SIGTERM/SIGINT save ``recovery.pth.tar`` at the next step and exit with
128+signal (so torchrun ``--max-restarts`` restarts the worker, and ``--resume auto`` continues); a non-finite loss
stops the run before the bad update, keeping the last good checkpoint.

:func:`_train` reads top to bottom: ``build_data``, ``build_model``, ``build_loaders``, ``build_optimization``,
``restore``, ``prepare_outputs``, then per epoch ``train_one_epoch``, ``evaluate_epoch`` and ``save_epoch``
(``engine/loop.py``; the run's files are ``engine/outputs.py``'s).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SequencerError
from ..models import create_model, get_model_entry
from ..models.loading import checkpoint_metadata, extract_state_dict, load_state_dict_into, read_checkpoint
from . import distributed as dist_utils
from .distributed import print_on_primary
from . import timm_habits
from .amp import autocast_dtype
from .checkpoint import resume_position, set_rng_state
from .head_by_name import head_rows_by_name
from .train_data import TrainData, build_data
from .config import RunState, TrainConfig, check_config, resolve_config
from .loop import (Loaders, Optimization, StopRequest, TrainingRun, current_lr, evaluate_epoch, save_epoch,
                   save_recovery, train_one_epoch)
from .outputs import plural, prepare_outputs, read_summary, release_claim, remove_if_empty, run_args


@dataclass
class TrainResult:
    """What a training run left: the best epoch by ``eval_metric`` and its top-1 (percent), the path of
    ``model_best.pth.tar``, the experiment folder, the summary rows (as ``summary.csv`` holds them, as text) and
    the command's exit status (0, or 128 + signal when a signal stopped the run). A run without a held-out split
    has no best: ``best_top1`` and ``best_epoch`` are None and ``checkpoint`` is ``last.pth.tar``."""
    best_top1: float | None
    best_epoch: int | None
    checkpoint: Path | None
    output_dir: Path | None
    summary: list[dict] = field(default_factory=list)
    exit_code: int = 0


def train(data: str | os.PathLike | None = None, *, progress: bool = True, **config) -> TrainResult:
    """Train a model as ``sequencer train DATA --flag value ...`` does; returns the run's :class:`TrainResult`.

    ``data=None`` trains on the embedded digits demo, as the command without DATA. Keywords are the command's
    flags with underscores (``model``, ``epochs``, ``lr``, ``output``, ``experiment``, ``workers``, ``seed``,
    ``resume``, ...; see :class:`~sequencer.engine.config.TrainConfig`), merged and checked exactly as the flags
    are; an unknown keyword is a SequencerError naming it. ``progress=False`` silences the log lines the command
    prints (warnings still show).
    """
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in config.items()}
    if data is not None:
        settings["data"] = os.fspath(data)
    state = RunState(quiet=not progress)  # no progress bar either
    cfg = resolve_config(settings, state)
    with contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO()):
        return run_training(cfg, state)


def run_training(cfg: TrainConfig, state: RunState | None = None) -> TrainResult:
    """Check ``cfg``, then run it in this process or as one rank of a torchrun launch; a failed run leaves no
    empty experiment folder behind. ``state``: from :func:`resolve_config` (without it no setting counts as the
    user's choice, so a resume takes all of them from its checkpoint)."""
    state = state if state is not None else RunState()
    check_config(cfg, state)
    try:
        with dist_utils.process_group(cfg.device) as info:
            return _train(cfg, state, info)
    except BaseException:
        release_claim(state)  # first: the claim file would keep a folder this start made from counting as empty
        remove_if_empty(state)
        raise
    finally:
        release_claim(state)
        if state.wandb is not None:
            state.wandb.finish()


def _train(cfg, state: RunState, info: dist_utils.DistInfo) -> TrainResult:
    """The run, step by step. Data, model and settings are all checked before a file or folder is written."""
    from timm.utils import random_seed

    started = time.time()
    random_seed(cfg.seed, info.rank)
    if cfg.input_size:
        cfg.in_chans, cfg.img_size = cfg.input_size[0], cfg.input_size[1]
    data = build_data(cfg, state, info)
    model = build_model(cfg, data, info.device)
    loaders = build_loaders(cfg, info, model, data)
    opt = build_optimization(cfg, info, model, loaders, data.num_classes)
    start_epoch = restore(cfg, info, data.resume_ckpt, opt, loaders.updates_per_epoch)
    if start_epoch >= opt.num_epochs:
        print_on_primary(info, f"--resume {data.resume_path}: the run already finished: it ran "
                               f"{plural(start_epoch, 'epoch')} and this schedule has {plural(opt.num_epochs, 'epoch')}"
                               f"; nothing to do (pass a larger --epochs to extend it)")
        return _result(cfg, Path(data.resume_path).parent, None, 0)
    out = prepare_outputs(cfg, state, info, data.resume_path, data.resume_ckpt, start_epoch, loaders.img_size,
                          held_out=data.eval_set, evaluated=data.eval_set is not None)
    for message in [*state.start_warnings, *timm_habits.notes(cfg, info.device)]:
        if info.is_primary:
            warnings.warn(message)
    state.wandb = timm_habits.start_wandb(cfg, run_args(cfg)) if info.is_primary else None
    train_model, eval_model = wrap_model(cfg, info, model)
    training = TrainingRun(cfg, info, model, train_model, eval_model, data.class_names, loaders, opt, out,
                           ignored_classes=data.ignored_classes, state=state)
    _log_start(training, data, start_epoch)

    metrics, finished = None, False
    with StopRequest() as stop:
        for epoch in range(start_epoch, opt.num_epochs):
            result = train_one_epoch(training, epoch, stop)
            if result.stopped_at is not None:
                return _result(cfg, out.folder, out.manager,
                               save_recovery(training, epoch, result.stopped_at, stop.signum))
            metrics, raw_top1 = evaluate_epoch(training)  # (None, None) without a held-out split
            metric = float(metrics[cfg.eval_metric]) if metrics is not None else None
            if opt.scheduler is not None:
                opt.scheduler.step(epoch + 1, metric)
            save_epoch(training, epoch, result, metrics, metric, raw_top1)
            if stop.signum:  # the signal arrived during evaluation: the epoch is saved, stop here
                print_on_primary(info, f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch}; resume with "
                           f"--resume {out.folder / 'last.pth.tar'}")
                return _result(cfg, out.folder, out.manager, 128 + stop.signum)
            finished = True
    if finished:
        _log_finish(training, metrics, started)
    return _result(cfg, out.folder, out.manager, 0)


def _result(cfg, folder: Path, manager, exit_code: int) -> TrainResult:
    """The run's :class:`TrainResult`, read back from what it wrote (``summary.csv``, ``model_best.pth.tar``)."""
    rows = read_summary(folder / "summary.csv") if (folder / "summary.csv").is_file() else []
    evaluated = [r for r in rows if r.get("eval_top1")]  # none without a held-out split
    best_epoch = manager.best_epoch if manager is not None else None
    if manager is None and evaluated:  # a finished run resumed: its best row by the metric it was run with
        column, sign = {"top1": ("eval_top1", 1), "top5": ("eval_top5", 1), "loss": ("eval_loss", -1)}[cfg.eval_metric]
        best_epoch = int(max(evaluated, key=lambda r: (sign * float(r[column]), -int(r["epoch"])))["epoch"])
    best_row = next((r for r in evaluated if int(r["epoch"]) == best_epoch), None)
    best = folder / ("model_best.pth.tar" if evaluated or not rows else "last.pth.tar")
    return TrainResult(best_top1=float(best_row["eval_top1"]) if best_row else None, best_epoch=best_epoch,
                       checkpoint=best if best.is_file() else None, output_dir=folder, summary=rows,
                       exit_code=exit_code)


# ----------------------------------------------------------------------------------------------------- model
def build_model(cfg, data: TrainData, device: torch.device) -> nn.Module:
    """The model on ``device``, with the resumed or initial checkpoint's weights, checked against --img-size."""
    init_meta = read_checkpoint(cfg.initial_checkpoint) if cfg.initial_checkpoint else None
    model = _create_model(cfg, data.resume_ckpt, init_meta if init_meta and init_meta.get("arch") else None,
                          data.num_classes)
    if init_meta is not None and data.resume_ckpt is None:
        state = extract_state_dict(init_meta)
        if not state:
            raise SequencerError(f"--initial-checkpoint {cfg.initial_checkpoint!r} holds no weights")
        source = f"--initial-checkpoint {cfg.initial_checkpoint!r}"
        state = head_rows_by_name(state, checkpoint_metadata(init_meta).get("class_names"), data.class_names,
                                  model, source)
        load_state_dict_into(model, state, source=source)
    if data.resume_ckpt is not None:
        load_state_dict_into(model, extract_state_dict(data.resume_ckpt, use_ema=False),
                             source=f"--resume {data.resume_path!r}")
        data.num_classes = model.num_classes
        if cfg.img_size is None:
            cfg.img_size = model.img_size
    cfg.img_size = cfg.img_size or model.pretrained_cfg["input_size"][-1]
    try:
        model.check_input_size(cfg.img_size, cfg.img_size)
    except ValueError as e:
        raise SequencerError(f"--img-size {cfg.img_size}: {e}",
                             hint=f"use a multiple of {model.reduction}") from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _create_model(cfg, resume_ckpt: dict | None, init_ckpt_meta: dict | None, num_classes: int):
    """The model to train; architecture from the resumed checkpoint, else --model (or an initial checkpoint's)."""
    base = resume_ckpt or init_ckpt_meta or {}
    if resume_ckpt is not None and cfg.model and base.get("arch") and cfg.model != base["arch"]:
        raise SequencerError(f"--model {cfg.model} does not match the resumed checkpoint's {base['arch']}",
                             hint="drop --model when resuming")
    arch_kwargs = {}
    if base.get("arch") and (not cfg.model or cfg.model == base["arch"]):
        cfg.model = base["arch"]
        arch_kwargs = dict(base.get("model_kwargs") or {})
        if resume_ckpt is None:  # a new run from these weights: size, classes and regularisation come from flags
            for k in ("num_classes", "img_size", "in_chans", "drop_rate", "drop_path_rate"):
                arch_kwargs.pop(k, None)
    cfg.model = cfg.model or "sequencer2d_s"
    get_model_entry(cfg.model)
    kwargs = dict(arch_kwargs, **cfg.model_kwargs)
    if resume_ckpt is None:
        kwargs.update(num_classes=num_classes, drop_rate=cfg.drop)
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        if cfg.img_size:
            kwargs["img_size"] = cfg.img_size
        if cfg.in_chans:
            kwargs["in_chans"] = cfg.in_chans
    try:
        return create_model(cfg.model, pretrained=cfg.pretrained and not resume_ckpt, **kwargs)
    except SequencerError as e:
        if not cfg.pretrained or e.hint is None:
            raise
        # the library's hint names the other commands' --checkpoint; train takes the file as --initial-checkpoint
        message = e.message
        raise SequencerError(f"--pretrained: {message}",
                             hint="download the file by other means and pass it with --initial-checkpoint FILE, "
                                  "or drop --pretrained") from None


def wrap_model(cfg, info: dist_utils.DistInfo, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the model to train: DDP across processes, compiled with --torchcompile; the model to evaluate)."""
    train_model = model
    if info.distributed:
        device = info.device
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.torchcompile:
        train_model = torch.compile(train_model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
    eval_model = (torch.compile(model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode) if cfg.torchcompile
                  else model)
    return train_model, eval_model


# --------------------------------------------------------------------------------------------------- loaders
def build_loaders(cfg, info: dist_utils.DistInfo, model: nn.Module, data: TrainData) -> Loaders:
    """The training loader (augmented, shuffled, full batches only) and the held-out loader, with the model's
    preprocessing unless flags override it."""
    from ..data import create_loader, resolve_data_config

    data_config = resolve_data_config(
        dict(input_size=(model.in_chans, cfg.img_size, cfg.img_size), mean=cfg.mean, std=cfg.std,
             crop_pct=cfg.crop_pct, interpolation=cfg.interpolation or None), model)
    img_size = int(data_config["input_size"][-1])
    recorded = dict(mean=list(data_config["mean"]), std=list(data_config["std"]),
                    crop_pct=float(data_config["crop_pct"]), interpolation=data_config["interpolation"],
                    img_size=img_size)
    loader_kw = dict(mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                     num_workers=cfg.workers, distributed=info.distributed, device=info.device, seed=cfg.seed,
                     **timm_habits.loader_options(cfg, info.device))
    aug = not cfg.no_aug
    train_loader = create_loader(
        data.train_set, data_config["input_size"], cfg.batch_size, True,
        interpolation=cfg.train_interpolation, auto_augment=cfg.aa if aug else None,
        re_prob=cfg.reprob if aug else 0.0, re_mode=cfg.remode, re_count=cfg.recount,
        hflip=cfg.hflip if aug else 0.0, scale=cfg.scale if aug else [1.0, 1.0],
        ratio=cfg.ratio if aug else [1.0, 1.0], color_jitter=cfg.color_jitter if aug else 0.0,
        drop_last=True, **loader_kw)
    eval_loader = None if data.eval_set is None else create_loader(
        data.eval_set, data_config["input_size"], cfg.validation_batch_size or cfg.batch_size, False,
        interpolation=data_config["interpolation"], **loader_kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SequencerError(f"--batch-size {cfg.batch_size} leaves no full batch of training data")
    updates_per_epoch = (steps_per_epoch + cfg.grad_accum_steps - 1) // cfg.grad_accum_steps
    return Loaders(train_loader, eval_loader, recorded, img_size, steps_per_epoch, updates_per_epoch)


# ---------------------------------------------------------------------------------------------- optimization
def build_optimization(cfg, info: dist_utils.DistInfo, model: nn.Module, loaders: Loaders,
                       num_classes: int) -> Optimization:
    """Optimizer, lr schedule, AMP, EMA, Mixup/CutMix and the loss, from timm's factories."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3

    _resolve_lr(cfg, info.world_size)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg))
    except (ValueError, AssertionError, KeyError) as e:
        raise SequencerError(f"--opt {cfg.opt}: {e}", hint="see timm.optim.list_optimizers()") from None
    amp_dtype, scaler = amp_setup(cfg, info.device)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                               device="cpu" if cfg.model_ema_force_cpu else None)
    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(cfg, decreasing_metric=cfg.eval_metric == "loss"),
            updates_per_epoch=loaders.updates_per_epoch)
    except ValueError as e:
        raise SequencerError(f"--sched {cfg.sched}: {e}") from None
    mixup_fn, loss_fn = _build_loss(cfg, num_classes, info.device)
    return Optimization(optimizer, scheduler, num_epochs, scaler, amp_dtype, model_ema, mixup_fn, loss_fn)


def _build_loss(cfg, num_classes: int, device: torch.device):
    """(Mixup/CutMix or None, the training loss): soft targets with mixing, else label smoothing or plain CE."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    mixup_on = not cfg.no_aug and (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None)
    if mixup_on:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    if cfg.bce_loss:
        loss_fn = BinaryCrossEntropy(smoothing=0.0 if mixup_on else cfg.smoothing,
                                     target_threshold=cfg.bce_target_thresh)
    elif mixup_on:
        loss_fn = SoftTargetCrossEntropy()
    elif cfg.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    return mixup_fn, loss_fn.to(device)


def amp_setup(cfg, device: torch.device):
    """(autocast dtype or None, GradScaler) for ``cfg.amp`` / ``cfg.amp_dtype`` (train's and segment train's policy);
    float16 scaling only happens on CUDA."""
    if not cfg.amp:
        return None, torch.amp.GradScaler("cuda", enabled=False)
    dtype = autocast_dtype(cfg.amp_dtype, device)  # the one rule (engine/amp.py): float16 off CUDA runs bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))
    return dtype, scaler


def _resolve_lr(cfg, world_size: int) -> None:
    if cfg.lr is not None:
        return
    global_batch = cfg.batch_size * world_size * cfg.grad_accum_steps
    ratio = global_batch / cfg.lr_base_size
    scale = cfg.lr_base_scale or ("sqrt" if any(o in cfg.opt.lower() for o in ("ada", "lamb")) else "linear")
    cfg.lr = cfg.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


# --------------------------------------------------------------------------------------------------- restore
def restore(cfg, info: dist_utils.DistInfo, checkpoint: dict | None, opt: Optimization, updates_per_epoch: int) -> int:
    """Restore optimizer, scaler, EMA and RNG from ``checkpoint`` (if any); step the schedule to the start epoch.

    The schedule itself is rebuilt from the (possibly new) settings, never restored: a longer ``--epochs`` or a
    new ``--lr`` then continues from the current position instead of replaying the old length (which ends at
    ``--min-lr``). Only the plateau scheduler keeps state (its best metric and patience), which is restored.
    Returns the epoch to start at.
    """
    from timm.utils import random_seed

    optimizer, scaler, scheduler, model_ema = opt.optimizer, opt.scaler, opt.scheduler, opt.model_ema
    start_epoch = 0
    if checkpoint is not None:
        start_epoch = resume_position(checkpoint)
        if not cfg.no_resume_opt:
            if checkpoint.get("optimizer"):
                _load_optimizer_state(optimizer, checkpoint["optimizer"], cfg)
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            if scheduler is not None and cfg.sched == "plateau" and checkpoint.get("scheduler"):
                scheduler.load_state_dict(checkpoint["scheduler"])
        if model_ema is not None:
            ema_state = checkpoint.get("state_dict_ema")
            if ema_state:
                model_ema.module.load_state_dict(ema_state)
            else:
                warnings.warn("--resume: the checkpoint has no EMA weights; the EMA restarts from the model")
        rng = checkpoint.get("rng_state")
        if isinstance(rng, list) and len(rng) == info.world_size:
            set_rng_state(rng[info.rank])
        else:
            warnings.warn("--resume: RNG state missing or from another number of processes; reseeding")
            random_seed(cfg.seed + start_epoch, info.rank)
    if cfg.start_epoch is not None:
        start_epoch = cfg.start_epoch
    if scheduler is not None and start_epoch > 0:
        if scheduler.t_in_epochs:
            scheduler.step(start_epoch)
        else:
            scheduler.step_update(start_epoch * updates_per_epoch)
    return start_epoch


def _load_optimizer_state(optimizer, state: dict, cfg) -> None:
    """Load a resumed optimizer state; another optimizer kind's state is refused instead of failing later."""
    saved_keys = {k for g in state.get("param_groups", []) for k in g if k != "params"}
    own_keys = {k for g in optimizer.param_groups for k in g if k != "params"}
    if len(state.get("param_groups", [])) != len(optimizer.param_groups) or not own_keys <= saved_keys:
        raise SequencerError(f"--resume: the checkpoint's optimizer state is not one of --opt {cfg.opt}",
                             hint="pass the run's --opt, or --no-resume-opt to start a fresh optimizer")
    optimizer.load_state_dict(state)


# ------------------------------------------------------------------------------------------------------- log
def _log_start(training: TrainingRun, data: TrainData, start_epoch: int) -> None:
    cfg, info = training.cfg, training.info
    n_params = sum(p.numel() for p in training.model.parameters())
    where = f"{info.world_size} processes, " if info.distributed else ""
    print_on_primary(info, f"train: {cfg.model} ({n_params / 1e6:.2f}M params with a {data.num_classes}-class head) on {len(data.train_set)} images of "
               f"{cfg.dataset or cfg.data}, {plural(data.num_classes, 'class', 'classes')}, {training.loaders.img_size}px, "
               f"{where}{info.device}; epochs {start_epoch}..{training.opt.num_epochs - 1}, "
               f"lr {current_lr(training.opt.optimizer):.3g}, batch {cfg.batch_size}; output {training.out.folder}")


def _log_finish(training: TrainingRun, metrics: dict | None, started: float) -> None:
    cfg, manager = training.cfg, training.out.manager
    if not training.info.is_primary:
        return
    best = (f"; best {cfg.eval_metric} {manager.best_metric:.2f} at epoch {manager.best_epoch}"
            if manager.best_metric is not None else "")
    what = "digits demo" if cfg.dataset == "digits" else "done"
    skipped = len(getattr(training.loaders.eval, "skipped", None) or [])
    unreadable = f" ({skipped} unreadable skipped)" if skipped else ""
    # the whole run's time: the epochs of earlier invocations (resumed) plus this one
    earlier = sum(float(r.get("epoch_seconds") or 0) for r in training.out.rows[:training.out.resumed_rows])
    elapsed = earlier + time.time() - started
    if metrics is None:
        print(f"{what}: trained {plural(training.opt.num_epochs, 'epoch')} in {elapsed:.0f}s without evaluation "
              f"(no held-out split); checkpoints in {training.out.folder}", flush=True)
        return
    print(f"{what}: eval top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['count']} held-out "
          f"images{unreadable} after {plural(training.opt.num_epochs, 'epoch')} in {elapsed:.0f}s{best}; "
          f"checkpoints in {training.out.folder}", flush=True)
