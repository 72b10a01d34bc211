"""Training as a library: :func:`train` (what ``sequencer train`` runs), timm-compatible training, fine-tuning and
transfer of Sequencer models.

Settings (:class:`~sequencer.engine.config.TrainConfig`, the command's flags) keep the names and meaning of timm's ``train.py`` (the paper's recipes run unchanged); the library pieces
are timm's (optimizer/scheduler factories, Mixup/CutMix, RandAugment and random erasing in the data pipeline,
ModelEmaV3, losses). With no DATA argument it trains ``sequencer2d_nano`` on the scikit-learn digits (embedded,
nothing downloaded) with defaults tuned for a couple of CPU cores.

Outputs (rank 0 only), as timm writes them: ``OUTPUT/EXPERIMENT/{args.yaml, summary.csv, summary.png,
last.pth.tar, model_best.pth.tar, checkpoint-<epoch>.pth.tar}``. Epochs are numbered from 0 as in timm.

Faults: checkpoints are written atomically; SIGTERM/SIGINT save ``recovery.pth.tar`` at the next step (during an
epoch's evaluation: once the epoch is saved, with no recovery file) and the command exits with 128+signal (so
torchrun ``--max-restarts`` restarts the worker, and ``--resume auto`` continues; under
:func:`train`, SIGTERM then goes to the caller's own disposition, SIGINT raises KeyboardInterrupt); a non-finite loss
stops the run before the bad update, keeping the last good checkpoint.

:func:`_train` reads top to bottom: ``build_data``, ``build_model`` (``engine/train_model.py``), ``build_loaders``,
``build_optimization``, ``restore``, ``prepare_outputs``, then per epoch ``train_one_epoch``, ``evaluate_epoch`` and
``save_epoch`` (``engine/loop.py``; the run's files are ``engine/outputs.py``'s).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.loader_workers import workers_stopped_on_exit
from ..errors import SequencerError
from ..models.caller_module import caller_module_kept
from ..models.loading import extract_state_dict
from . import distributed as dist_utils
from .distributed import print_on_primary
from . import inert_flags, timm_habits
from .amp import autocast_dtype
from .checkpoint import load_optimizer_state, resume_position
from .guest import caller_state_kept, console, own_modes, poly_schedule_note_dropped, warn
from .train_data import TrainData, build_data
from .data_record import evaluated_data, evaluated_weights
from .config import RunState, TrainConfig, checked_callbacks, explicit_settings, resolve_config
from .config_checks import check_config
from .loop import (EpochProgress, Loaders, Optimization, TrainingRun, batch_split, current_lr, epoch_ends_run,
                   evaluate_epoch, resumed_progress, save_epoch, save_recovery, train_one_epoch)
from .outputs import claimed_process_group, plural, prepare_outputs, primary_result, read_back, run_args, say_start_notes
from .resume import evaluation_change, reseed_unless_resumed
from .stop_request import StopRequest, hand_sigterm_to_caller, stopped_after_epochs
from .train_model import build_model, wrap_model
from .user_data import module_name

_logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run left: the best epoch by ``eval_metric`` and its top-1 (percent), the path of
    ``model_best.pth.tar``, the experiment folder, the summary rows (one dict of numbers per epoch: ``epoch``,
    ``train_loss``, ``eval_loss``, ``eval_top1``, ``eval_top5``, ``lr``, ``epoch_seconds``), whether a signal
    (SIGTERM, or SIGINT under the command) stopped the run early (with epochs left to resume: one after the last
    epoch's training steps leaves the run finished, not interrupted), and the command's exit status (0, or 128 +
    signal, also for a run that a signal ended once finished).
    A run without a held-out split has no best: ``best_top1`` and ``best_epoch`` are None, the eval columns are
    nan and ``checkpoint`` is ``last.pth.tar``."""
    best_top1: float | None
    best_epoch: int | None
    checkpoint: Path | None
    output_dir: Path | None
    summary: list[dict] = field(default_factory=list)
    exit_code: int = 0
    interrupted: bool = False


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`train` (or ``segmentation.train_segmenter``) once its recovery checkpoint was
    written (during an evaluation: once the epoch's checkpoint was; during the last epoch's evaluation the run is
    finished, and the message says so); ``result`` is the run's :class:`TrainResult` (``SegmentResult``) so far. A ``KeyboardInterrupt``, so a loop of runs stops as Python code does."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


def train(config: TrainConfig | str | os.PathLike | None = None, /, *, callbacks=(), progress: bool = True,
          **settings) -> TrainResult:
    """Train a model as ``sequencer train DATA --flag value ...`` does; returns the run's :class:`TrainResult`.

    Settings are a :class:`~sequencer.engine.config.TrainConfig` (or, positionally, the ``data``) and/or keywords
    (which win), named as the
    command's flags with underscores (``epochs``, ``lr``, ``batch_size``, ``output``, ``experiment``, ``workers``,
    ``seed``, ``resume``, ...), merged and checked exactly as the flags are. Only the settings given count (None
    means the default): the rest keep the digits demo's defaults and a resumed run's recorded settings. A wrong
    type or an unknown keyword is a SequencerError naming it.

    ``model``: a registry name, or an ``nn.Module`` to train in place (one of ours, or any classifier taking
    (N, C, H, W) images and returning (N, classes) logits; a module we did not build is checkpointed as its
    ``state_dict``, its architecture not recorded; a ``torch.compile`` wrapper runs the forward passes and the
    checkpoints hold the module's own keys, without ``_orig_mod.``). It keeps the trained weights, on ``device``, and
    comes back in the mode it was given in, each submodule's (an eval-mode part stays so), and its
    ``grad_checkpointing`` too.
    ``data``: a folder or .tar of class folders, None (the embedded digits), or a ``(train, val)`` pair of map-style
    Datasets yielding ``(PIL image or (C, H, W) float32 tensor, int label)``: PIL images get the recipe's transforms,
    tensors are used as given, class names come from
    ``dataset.classes`` when it exists.

    ``callbacks``: callables, each called on every process after every epoch (once it is saved) with that epoch's
    metrics as a dict of numbers (the summary row); a callback that returns True stops the run after that epoch,
    on every process. Under DDP each process may be given its own callbacks, or none (a logger on rank 0 only).

    ``progress=False`` prints nothing at all; ``progress=True`` logs through the ``"sequencer"`` logger, shown
    on stdout unless your logging already prints to the console. Ctrl-C writes a recovery checkpoint, then raises
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). SIGTERM keeps your own disposition: the run writes a
    recovery checkpoint, restores your handlers and delivers the signal again, so with the default disposition the
    process ends by SIGTERM (status 143 / -15, as a preempted job should) and with your handler that handler runs,
    then ``train`` returns the result with ``interrupted=True`` and ``exit_code=143`` (``interrupted`` False where the
    signal came after the last epoch's training steps: the run is finished); a SIGTERM you ignore (SIG_IGN) is not
    caught, and the run goes on. The caller's ``random``, ``numpy`` and torch random state is restored on
    return: the run draws from its own ``seed``.
    """
    explicit = explicit_settings(config, settings, TrainConfig, "train")
    state = RunState(quiet=not progress, callbacks=checked_callbacks(callbacks, "train"), caller_sigterm=True)
    state.module = _user_module(explicit)
    state.datasets = explicit.pop("data") if isinstance(explicit.get("data"), (tuple, list)) else None

    def run() -> TrainResult:
        with console(progress), caller_state_kept(), caller_module_kept(state.module, tensors=False):
            return run_training(resolve_config(explicit, state), state)

    return as_library_call(run, state, "training")


def as_library_call(run, state: RunState, what: str):
    """``run()`` (a run with ``state``, returning its result) as a library entry point runs it, in its own modes
    (:func:`~.guest.own_modes`), and ends it: a SIGTERM the run caught goes on to the caller's own disposition
    (``stop_request.hand_sigterm_to_caller``), and a run stopped by SIGINT raises :class:`TrainingInterrupted`
    carrying its result, where the command returns it (exit 130)."""
    try:
        with own_modes():
            result = run()
    finally:
        hand_sigterm_to_caller(state)
    if result.exit_code == 128 + signal.SIGINT:
        # a signal after the last epoch's training steps leaves the run finished (`interrupted` False): there was
        # nothing to resume, yet it said "resume from" the folder
        where = (f"resume from {result.output_dir}" if result.interrupted
                 else f"the run had finished its epochs; checkpoints in {result.output_dir}")
        raise TrainingInterrupted(f"{what} stopped by SIGINT; {where}", result)
    return result


def _user_module(explicit: dict) -> nn.Module | None:
    model = explicit.get("model")
    if isinstance(model, nn.Module):
        del explicit["model"]
        return model
    if model is not None and not isinstance(model, str):
        raise SequencerError(f"train: `model={type(model).__name__}` is not a registry name or an nn.Module")
    return None


def run_training(cfg: TrainConfig, state: RunState | None = None) -> TrainResult:
    """Check ``cfg``, then run it in this process or as one rank of a torchrun launch (or of the caller's process
    group); a failed run leaves no empty experiment folder behind. ``state``: from :func:`resolve_config`
    (without it no setting counts as the user's choice, so a resume takes all of them from its checkpoint). The
    run's data-loader workers end with it, also when it raises (``data.loader_workers``)."""
    state = state if state is not None else RunState()
    cfg = check_config(cfg, state)
    try:
        with claimed_process_group(cfg.device, state) as info, workers_stopped_on_exit():
            return _train(cfg, state, info)
    finally:
        if state.wandb is not None:
            state.wandb.finish()


def _train(cfg, state: RunState, info: dist_utils.DistInfo) -> TrainResult:
    """The run, step by step. Data, model and settings are all checked before a file or folder is written. Each
    step that derives a setting (the held-out split, the model, the image size, the lr) returns a new config."""
    from timm.utils import random_seed

    started = time.time()
    random_seed(cfg.seed, info.rank)
    data, cfg = build_data(cfg, state, info)
    model, cfg = build_model(cfg, state, data, info.device)
    dist_utils.broadcast_weights(model, info)  # one start for every rank, before the EMA copy
    loaders = build_loaders(cfg, info, model, data)
    cfg = dataclasses.replace(cfg, lr=resolved_lr(cfg, info.world_size))
    opt = build_optimization(cfg, info, model, loaders, data.num_classes, state.amp_notes)
    resumed_within = epoch_progress(cfg, info, data.resume_ckpt, loaders)  # a recovery file's interrupted epoch
    # the resumed epochs' metrics, measured on other weights (`model_ema` switched) or data, compare with none of ours
    changed = evaluation_change(data.resume_ckpt, evaluated_weights(opt, info.device),
                                evaluated_data(cfg, state, loaders.eval))
    start_epoch = restore(cfg, info, data.resume_ckpt, opt, loaders.updates_per_epoch,
                          updates_within=resumed_within.batches // cfg.grad_accum_steps, fresh_metric=bool(changed))
    if start_epoch >= opt.num_epochs:
        print_on_primary(info, f"`resume={data.resume_path}`: the run already finished: it ran "
                               f"{plural(start_epoch, 'epoch')} and this schedule has {plural(opt.num_epochs, 'epoch')}"
                               f"; nothing to do (pass a larger `epochs` to extend it)")
        return _result(cfg, info, Path(data.resume_path).parent, None, 0,
                       best_epoch=data.resume_ckpt.get("best_epoch"))
    out = prepare_outputs(cfg, state, info, data.resume_path, data.resume_ckpt, start_epoch, loaders.img_size,
                          held_out=data.eval_set, evaluated=data.eval_set is not None, evaluation_change=changed)
    say_start_notes(state, info, [*timm_habits.notes(cfg, info.device, model, state.given),
                                  *inert_flags.notes(cfg, state.given, resuming=data.resume_ckpt is not None)])
    state.wandb = timm_habits.start_wandb(cfg, run_args(cfg)) if info.is_primary else None
    train_model, eval_model = wrap_model(cfg, info, model, runs=state.module)
    training = TrainingRun(cfg, info, model, train_model, eval_model, data.class_names, loaders, opt, out,
                           ignored_classes=data.ignored_classes, state=state)
    _log_start(training, data, start_epoch)

    with StopRequest(state) as stop:
        for epoch in range(start_epoch, opt.num_epochs):
            result = train_one_epoch(training, epoch, stop, resumed_within if epoch == start_epoch else None)
            if result.stopped_at is not None:
                return _result(cfg, info, out.folder, out.manager, save_recovery(training, epoch, result, stop.signum),
                               interrupted=True)
            metrics, raw_top1 = evaluate_epoch(training)  # (None, None) without a held-out split
            metric = float(metrics[cfg.eval_metric]) if metrics is not None else None
            if opt.scheduler is not None:
                opt.scheduler.step(epoch + 1, metric)
            row = save_epoch(training, epoch, result, metrics, metric, raw_top1)
            if epoch_ends_run(training, stop, epoch, opt.num_epochs, row):
                break
    signalled, interrupted = stopped_after_epochs(stop, info, epoch, opt.num_epochs, out.folder)
    if signalled:
        return _result(cfg, info, out.folder, out.manager, signalled, interrupted=interrupted)
    _log_finish(training, metrics, started, epochs_run=epoch + 1)
    return _result(cfg, info, out.folder, out.manager, 0)


def _result(cfg, info: dist_utils.DistInfo, folder: Path, manager, exit_code: int,
            interrupted: bool = False, best_epoch: int | None = None) -> TrainResult:
    """The run's :class:`TrainResult`, rank 0's on every rank (``outputs.primary_result``; every rank calls), read
    back from what it wrote (``outputs.read_back``). ``best_epoch``: without a ``manager`` (a finished run resumed),
    the one its checkpoint records; where it records none, its best row by the metric the run was run with."""
    def read() -> TrainResult:
        got = read_back(folder, manager, "eval_top1", f"eval_{cfg.eval_metric}", cfg.eval_metric != "loss",
                        best_epoch, last_without_evaluation=True)  # without a held-out split: last.pth.tar
        return TrainResult(best_top1=got.best_row["eval_top1"] if got.best_row else None, best_epoch=got.best_epoch,
                           checkpoint=got.checkpoint, output_dir=folder, summary=got.rows, exit_code=exit_code,
                           interrupted=interrupted)
    return primary_result(info, read)


# --------------------------------------------------------------------------------------------------- loaders
def build_loaders(cfg, info: dist_utils.DistInfo, model: nn.Module, data: TrainData) -> Loaders:
    """The training loader (augmented, shuffled, full batches only) and the held-out loader, with the model's
    preprocessing unless flags override it."""
    from ..data import create_loader, resolve_data_config

    in_chans = getattr(model, "in_chans", None) or cfg.in_chans or 3
    data_config = resolve_data_config(
        dict(input_size=(in_chans, cfg.img_size, cfg.img_size), mean=cfg.mean, std=cfg.std,
             crop_pct=cfg.crop_pct, interpolation=cfg.interpolation or None), model)
    img_size = int(data_config["input_size"][-1])
    recorded = dict(mean=list(data_config["mean"]), std=list(data_config["std"]),
                    crop_pct=float(data_config["crop_pct"]), interpolation=data_config["interpolation"],
                    img_size=img_size)
    loader_kw = dict(mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                     num_workers=cfg.workers, distributed=info.distributed, device=info.device, seed=cfg.seed,
                     **timm_habits.loader_options(cfg, info.device))
    if data.tensors:  # the caller's tensors are used as given: no uint8 batches normalised on the device
        loader_kw["normalize_on_device"] = False
    aug = not cfg.no_aug
    train_loader = create_loader(
        data.train_set, data_config["input_size"], cfg.batch_size, True,
        # --no-aug resizes as the eval transform does: a random interpolation is augmentation too (as timm)
        interpolation=cfg.train_interpolation if aug else data_config["interpolation"],
        auto_augment=cfg.aa if aug else None,
        re_prob=cfg.reprob if aug else 0.0, re_mode=cfg.remode, re_count=cfg.recount,
        hflip=cfg.hflip if aug else 0.0, scale=cfg.scale if aug else [1.0, 1.0],
        ratio=cfg.ratio if aug else [1.0, 1.0], color_jitter=cfg.color_jitter if aug else 0.0,
        drop_last=True, **loader_kw)
    eval_loader = None if data.eval_set is None else create_loader(
        data.eval_set, data_config["input_size"], cfg.validation_batch_size or cfg.batch_size, False,
        interpolation=data_config["interpolation"], **loader_kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SequencerError(f"`batch_size={cfg.batch_size}` leaves no full batch of training data")
    updates_per_epoch = (steps_per_epoch + cfg.grad_accum_steps - 1) // cfg.grad_accum_steps
    return Loaders(train_loader, eval_loader, recorded, img_size, steps_per_epoch, updates_per_epoch)


# ---------------------------------------------------------------------------------------------- optimization
def build_optimization(cfg, info: dist_utils.DistInfo, model: nn.Module, loaders: Loaders,
                       num_classes: int, notes: list[str] | None = None) -> Optimization:
    """Optimizer, lr schedule, AMP, EMA, Mixup/CutMix and the loss, from timm's factories; the AMP rule's notes go to
    ``notes`` (:func:`amp_setup`)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3

    kwargs = optimizer_kwargs(cfg)
    if kwargs.get("betas") is not None:  # torch's type; timm 1.0.15 (the floor) passed the flag's list on as it was
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        optimizer = create_optimizer_v2(model, **kwargs)
    except (ValueError, AssertionError, KeyError) as e:
        raise SequencerError(f"`opt={cfg.opt}`: {e}", hint="see timm.optim.list_optimizers()") from None
    amp_dtype, scaler = amp_setup(cfg, info.device, notes)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                               device="cpu" if cfg.model_ema_force_cpu else None)
    try:
        with poly_schedule_note_dropped():  # `sched=poly` of one epoch (cosine's own note is true: kept)
            scheduler, num_epochs = create_scheduler_v2(
                optimizer, **scheduler_kwargs(cfg, decreasing_metric=cfg.eval_metric == "loss"),
                updates_per_epoch=loaders.updates_per_epoch)
    except ValueError as e:
        raise SequencerError(f"`sched={cfg.sched}`: {e}") from None
    if cfg.sched == "plateau":
        _plateau_stepped_with_a_metric_only(scheduler)
    mixup_fn, loss_fn = _build_loss(cfg, num_classes, info.device)
    return Optimization(optimizer, scheduler, num_epochs, scaler, amp_dtype, model_ema, mixup_fn, loss_fn)


def _plateau_stepped_with_a_metric_only(scheduler) -> None:
    """timm 1.0.15 (pyproject's floor) steps torch's ReduceLROnPlateau also without a metric, where newer timm does
    not: a resume's positioning step past the warmup, or an epoch without a held-out split, raised TypeError there
    (``float(None)``). Its own instance steps as newer timm's do (timm's ``state_dict`` keeps only ``best`` and
    ``last_epoch``, so the checkpoint is as before)."""
    plateau = scheduler.lr_scheduler
    step = plateau.step

    def step_with_a_metric(metrics=None, epoch=None):
        if metrics is not None:
            step(metrics)
    plateau.step = step_with_a_metric


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


def amp_setup(cfg, device: torch.device, notes: list[str] | None = None):
    """(autocast dtype or None, GradScaler) for ``cfg.amp`` / ``cfg.amp_dtype`` (train's and segment train's policy);
    float16 scaling only happens on CUDA. The rule's notes go to ``notes`` (a run's ``amp_notes``, which rank 0
    alone says at its start), or to the log."""
    if not cfg.amp:
        return None, torch.amp.GradScaler("cuda", enabled=False)
    # the one rule (engine/amp.py): float16 off CUDA runs bfloat16
    dtype = autocast_dtype(cfg.amp_dtype, device, notes=notes)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))
    return dtype, scaler


def resolved_lr(cfg, world_size: int) -> float:
    """``--lr``, or ``--lr-base`` scaled by the global batch over ``--lr-base-size`` (as timm: linear, or sqrt
    for adaptive optimizers)."""
    if cfg.lr is not None:
        return cfg.lr
    global_batch = cfg.batch_size * world_size * cfg.grad_accum_steps
    ratio = global_batch / cfg.lr_base_size
    scale = cfg.lr_base_scale or ("sqrt" if any(o in cfg.opt.lower() for o in ("ada", "lamb")) else "linear")
    return cfg.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


# --------------------------------------------------------------------------------------------------- restore
def restore(cfg, info: dist_utils.DistInfo, checkpoint: dict | None, opt: Optimization, updates_per_epoch: int,
            updates_within: int = 0, fresh_metric: bool = False) -> int:
    """Restore optimizer, scaler, EMA and RNG from ``checkpoint`` (if any); step the schedule to the start epoch
    (a per-update schedule also past the ``updates_within`` that epoch a recovery checkpoint had made).
    ``fresh_metric``: the checkpoint's metrics were measured otherwise (``resume.evaluation_change``), so the plateau
    schedule's best and patience start again (the lr it reduced to is kept).

    The schedule itself is rebuilt from the (possibly new) settings, never restored: a longer ``--epochs`` or a
    new ``--lr`` then continues from the current position instead of replaying the old length (which ends at
    ``--min-lr``). Only the plateau scheduler keeps state (its best metric and patience), which is restored.
    Returns the epoch to start at.
    """
    optimizer, scaler, scheduler, model_ema = opt.optimizer, opt.scaler, opt.scheduler, opt.model_ema
    start_epoch = 0
    if checkpoint is not None:
        start_epoch = resume_position(checkpoint)
        if not cfg.no_resume_opt:
            if checkpoint.get("optimizer"):
                # the plateau schedule's reduced lr is its state, kept while `lr` is the checkpoint run's
                keep_lr = cfg.sched == "plateau" and (checkpoint.get("args") or {}).get("lr") == cfg.lr
                load_optimizer_state(optimizer, checkpoint["optimizer"], cfg.opt, keep_lr=keep_lr,
                                     hint="pass the run's `opt`, or `no_resume_opt` to start a fresh optimizer")
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            if scheduler is not None and cfg.sched == "plateau" and checkpoint.get("scheduler") and not fresh_metric:
                scheduler.load_state_dict(checkpoint["scheduler"])
        if model_ema is not None:
            ema_state = checkpoint.get("state_dict_ema")
            if ema_state:  # without the `_orig_mod.` prefix of a compiled module's (before 2026-12-07)
                model_ema.module.load_state_dict(extract_state_dict(ema_state))
            elif info.is_primary:  # every rank resumes rank 0's checkpoint: its notes are the run's, said once
                warn("`resume`: the checkpoint has no EMA weights; the EMA restarts from the model")
        reseed_unless_resumed(checkpoint, cfg.seed + start_epoch, info)
    if cfg.start_epoch is not None:
        start_epoch = cfg.start_epoch
    if scheduler is not None and (start_epoch > 0 or updates_within):
        if scheduler.t_in_epochs:
            scheduler.step(start_epoch)
        else:
            scheduler.step_update(start_epoch * updates_per_epoch + updates_within)
    return start_epoch


def epoch_progress(cfg, info: dist_utils.DistInfo, checkpoint: dict | None, loaders) -> EpochProgress:
    """Where the interrupted epoch of a recovery ``checkpoint`` goes on (``loop.resumed_progress``): after the
    batches its updates covered, when this start cuts the data into the same batches and updates (batch size,
    accumulation, processes and batches per epoch as recorded); at the epoch's beginning otherwise and with
    ``start_epoch``. ``loaders``: the run's ``loop.Loaders``."""
    if cfg.start_epoch is not None:
        return EpochProgress()
    split = batch_split(cfg, info, loaders.steps_per_epoch, cfg.grad_accum_steps)
    return resumed_progress(checkpoint, info, split)


# ------------------------------------------------------------------------------------------------------- log
def _log_start(training: TrainingRun, data: TrainData, start_epoch: int) -> None:
    cfg, info = training.cfg, training.info
    n_params = sum(p.numel() for p in training.model.parameters())
    where = f"{info.world_size} processes, " if info.distributed else ""
    source = "the given Datasets" if training.state.datasets is not None else cfg.dataset or cfg.data
    print_on_primary(info, f"train: {module_name(training.model)} ({n_params / 1e6:.2f}M params with a "
               f"{data.num_classes}-class head) on {len(data.train_set)} images of {source}, "
               f"{plural(data.num_classes, 'class', 'classes')}, {training.loaders.img_size}px, "
               f"{where}{info.device}; epochs {start_epoch}..{training.opt.num_epochs - 1}, "
               f"{starting_lr(training.opt, start_epoch, training.loaders.updates_per_epoch)}, batch {cfg.batch_size}; "
               f"output {training.out.folder}")


def starting_lr(opt: Optimization, start_epoch: int, updates_per_epoch: int) -> str:
    """"lr X": the lr the run starts at, with the lr its warmup climbs to where it starts inside a warmup ("lr 1e-06
    (warmup to 0.002)"): the paper's --lr 2e-3 --warmup-lr 1e-6 read "lr 1e-06" alone, as if --lr had not reached
    the run. Both are means over the parameter groups, each group's lr scaled by its ``lr_scale`` (--layer-decay)
    as timm's schedules scale it, as every lr the run logs (``loop.current_lr``)."""
    lr, scheduler, groups = current_lr(opt.optimizer), opt.scheduler, opt.optimizer.param_groups
    position = start_epoch if getattr(scheduler, "t_in_epochs", True) else start_epoch * updates_per_epoch
    peak = getattr(scheduler, "base_values", None)
    if not peak or position >= getattr(scheduler, "warmup_t", 0):
        return f"lr {lr:.3g}"
    scaled = [base * group.get("lr_scale", 1.0) for base, group in zip(peak, groups)]
    return f"lr {lr:.3g} (warmup to {sum(scaled) / len(scaled):.3g})"


def _log_finish(training: TrainingRun, metrics: dict | None, started: float, epochs_run: int) -> None:
    """The run's last line; ``epochs_run``: epochs 0.. the last one run (fewer than planned when a callback
    stopped the run)."""
    cfg, manager = training.cfg, training.out.manager
    skipped = metrics["unreadable"] if metrics is not None else 0  # every rank's, gathered by `evaluate`
    if not training.info.is_primary:
        return
    # a loss to the epoch lines' 4 decimals: at 2, a best loss of 0.004 read 0.00
    digits = 4 if cfg.eval_metric == "loss" else 2
    best = (f"; best {cfg.eval_metric} {manager.best_metric:.{digits}f} at epoch {manager.best_epoch}"
            if manager.best_metric is not None else "")
    what = "digits demo" if cfg.dataset == "digits" else "done"
    unreadable = f" ({skipped} unreadable skipped)" if skipped else ""
    elapsed = training.out.run_seconds(started)
    if metrics is None:
        _logger.info(f"{what}: trained {plural(epochs_run, 'epoch')} in {elapsed:.0f}s without evaluation "
                     f"(no held-out split); checkpoints in {training.out.folder}")
        return
    _logger.info(f"{what}: eval top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['count']} "
                 f"held-out images{unreadable} after {plural(epochs_run, 'epoch')} in {elapsed:.0f}s{best}; "
                 f"checkpoints in {training.out.folder}")
