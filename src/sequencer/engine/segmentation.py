"""Semantic-segmentation training as a library: :func:`train_segmenter` (what ``sequencer segment train`` runs).

It runs on the classification engine's pieces: torchrun/DDP (``distributed``), the experiment folder, its claim,
``args.yaml`` and ``summary.csv`` (``outputs``), atomic checkpoints with best-N history and RNG state
(``checkpoint``), ``resume="auto"`` (``resume``), SIGTERM/SIGINT recovery checkpoints (``stop_request.StopRequest``), the
``amp`` policy (``train.amp_setup``) and the data loader with seeded workers (``data.create_loader``). As with
:func:`sequencer.train`, Ctrl-C under the library call raises ``TrainingInterrupted`` once the recovery checkpoint is
written (during an evaluation: once the epoch's checkpoint is); the command (:func:`run_segmentation`) exits 130
instead.

Schedule: AdamW (timm's optimizer factory: no weight decay on norms and biases) with a poly decay per update after
a linear warmup (``warmup_iters``), as mmsegmentation's recipes. The length is ``iters`` updates (the last epoch
stops part-way) or ``epochs`` passes. Evaluation every ``eval_interval`` epochs and after the last; the best
mIoU is ``model_best.pth.tar``.

Checkpoints hold ``segmenter`` (the model's config), ``class_names``, ``data_config`` (normalisation, crop and
evaluation settings) and ``updates`` (the optimizer updates made before a resume's start epoch) beside the engine's
usual keys, so ``segment validate`` / ``predict`` need only the file.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader_workers import workers_stopped_on_exit
from ..data.segmentation import IGNORE_INDEX, SegmentationDataset, TrainTransform, open_split
from ..errors import SequencerError
from ..models.segmentation import (AUX_LOSS_WEIGHT, batch_norm_maps, complete_config, create_segmenter,
                                   segmenter_from_config)
from . import distributed as dist_utils
from .amp import autocast, dtype_name
from .checkpoint import get_rng_state, load_optimizer_state, resume_position
from .config import RunState, checked_callbacks, checked_settings, explicit_settings, given_settings
from .guest import caller_state_kept, console, poly_schedule_note_dropped
from .inert_flags import NEW_RUN_WEIGHTS, inert_note
from .loop import (EpochProgress, EpochResult, batch_split, buffer_names, current_lr, epoch_ends_run, must_stop,
                   recovery_progress, recovery_state, resume_point, resumed_progress, state_buffers,
                   training_checkpoint)
from .outputs import (claimed_process_group, plain, plural, prepare_outputs, primary_result, read_back, say_start_notes,
                      summary_numbers, write_summary)
from .resume import reseed_unless_resumed, resume_checkpoint
from .segmentation_config import SegmentConfig, SegmentResult, check_segment_config
from .segmentation_eval import (eval_loader, evaluate_segmentation, inference_settings, metrics_row,
                                resumed_evaluation_change, segment_data_config)
from .stop_request import StopRequest, stopped_after_epochs
from .train import amp_setup, as_library_call

_logger = logging.getLogger(__name__)


def train_segmenter(config: SegmentConfig | str | os.PathLike | None = None, /, *, progress: bool = True,
                    callbacks=(), **settings) -> SegmentResult:
    """Train a segmenter as ``sequencer segment train DATA --flag value ...`` does; returns the run's
    :class:`SegmentResult`.

    Settings are a :class:`SegmentConfig` (or, positionally, the ``data`` folder) and/or keywords (which win),
    named as its fields (``data``, ``backbone``, ``head``, ``epochs`` or ``iters``, ``img_size``, ``batch_size``,
    ``lr``, ``output``, ``experiment``, ``resume``, ...), checked as the flags are; only the fields set count
    (None means the default). A wrong type or an unknown keyword is a one-line SequencerError naming it; ``cfg``
    is never changed.

    ``callbacks``: callables, each called on every process after every epoch (once it is saved) with that epoch's
    summary row as a dict of numbers (:attr:`SegmentResult.summary`'s; nan on an epoch not evaluated); one that
    returns True stops the run after that epoch, on every process. Under DDP each process may be given its own
    callbacks, or none (a logger on rank 0 only).

    Checks the settings, then runs them in this process or as one rank of a torchrun launch; a failed start leaves
    no empty experiment folder behind. ``progress=False`` prints nothing at all; ``progress=True`` logs through the
    ``"sequencer"`` logger, shown on stdout unless your logging already prints to the console (as
    :func:`sequencer.train`). Signals as with :func:`sequencer.train`: Ctrl-C writes a recovery checkpoint, then
    raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``; its ``result`` is the run so far); a SIGTERM keeps the
    caller's disposition: after the recovery checkpoint it is delivered again (the default ends the process; a
    handler runs, then the result, ``interrupted`` (False once the last epoch's training steps had passed: the run
    is finished), ``exit_code`` 143, returns); ignored, it is not caught. The
    caller's ``random``, ``numpy`` and torch random state is restored on return."""
    explicit = explicit_settings(config, settings, SegmentConfig, "train_segmenter")
    cfg = SegmentConfig(**checked_settings(explicit, "train_segmenter", "settings are SegmentConfig's fields, segment "
                                           "train's flag names with underscores, e.g. img_size", SegmentConfig))
    state = RunState(quiet=not progress, callbacks=checked_callbacks(callbacks, "train_segmenter"), caller_sigterm=True)
    return as_library_call(lambda: run_segmentation(cfg, state), state, "segment train")


def run_segmentation(cfg: SegmentConfig, state: RunState | None = None) -> SegmentResult:
    """What ``segment train`` runs: :func:`train_segmenter` with the command's signals (a signal's stop is returned,
    ``exit_code`` 128 + signal, never raised or handed on)."""
    state = state if state is not None else RunState()
    with console(not state.quiet), caller_state_kept(), workers_stopped_on_exit():
        check_segment_config(cfg)
        with claimed_process_group(cfg.device, state) as info:
            return _train(cfg, state, info)


# ------------------------------------------------------------------------------------------- the run's parts
@dataclass
class _Run:
    cfg: SegmentConfig
    info: dist_utils.DistInfo
    model: nn.Module
    train_model: nn.Module
    class_names: list[str]
    data_config: dict
    train_loader: object
    eval_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    total_updates: int
    updates_per_epoch: int
    num_epochs: int
    first_update: int = 0  # the updates made before epoch 0's place: epoch e starts after first_update + e * per epoch
    out: object = None  # outputs.Outputs
    fields: list[str] = field(default_factory=list)  # summary.csv columns
    state: RunState = field(default_factory=RunState)  # the callbacks (loop.epoch_ends_run)


def _train(cfg: SegmentConfig, state: RunState, info: dist_utils.DistInfo) -> SegmentResult:
    """The run, step by step; data, model and settings are all checked before a file or folder is written."""
    from timm.utils import random_seed

    started = time.time()
    random_seed(cfg.seed, info.rank)
    resume_path, resume_ckpt = resume_checkpoint(cfg, info, "segment train")
    cfg = _resumed_architecture(cfg, resume_ckpt, state)
    train_split, val_split = _open_splits(cfg, resume_ckpt)
    dist_utils.check_same_data(info, len(train_split), len(val_split), list(train_split.class_names))
    _check_batch_norm_maps(cfg, info)
    model = _build_model(cfg, train_split.num_classes, resume_ckpt, info.device)
    run = _build_run(cfg, state, info, model, train_split, val_split, resume_ckpt)
    resumed_within = resumed_progress(resume_ckpt, info, _batch_split(run))  # a recovery file's interrupted epoch
    start_epoch = _restore(run, resume_ckpt, resumed_within.batches)
    if start_epoch >= run.num_epochs:
        # as train's: "finished its 3 epochs" named neither length where `iters=3` was below the 6 updates made
        made = run.first_update + start_epoch * run.updates_per_epoch
        dist_utils.print_on_primary(info, f"`resume={resume_path}`: the run already finished: it made "
                                          f"{plural(made, 'update')} in {plural(start_epoch, 'epoch')} and this run "
                                          f"has {plural(run.total_updates, 'update')}; nothing to do (pass a larger "
                                          f"`epochs` or `iters` to extend it)")
        return _result(info, Path(resume_path).parent, None, 0, best_epoch=resume_ckpt.get("best_epoch"))
    # the resumed epochs' mIoUs, measured on another split, size, mode or window, compare with none of ours
    changed = resumed_evaluation_change(resume_ckpt, run.data_config, cfg.val_split)
    run.out = prepare_outputs(cfg, state, info, resume_path or None, resume_ckpt, start_epoch, cfg.img_size,
                              evaluation_change=changed)
    say_start_notes(state, info)
    if info.is_primary:
        _log_start(run, train_split, start_epoch, resumed_within.batches)
    with StopRequest(state) as stop:
        for epoch in range(start_epoch, run.num_epochs):
            result = _train_one_epoch(run, epoch, stop, resumed_within if epoch == start_epoch else None)
            if result.stopped_at is not None:
                return _result(info, run.out.folder, run.out.manager,
                               _save_recovery(run, epoch, result.stopped_at, result.done, stop.signum),
                               interrupted=True)
            last = epoch == run.num_epochs - 1
            metrics = None
            if last or (epoch + 1) % cfg.eval_interval == 0:
                # every rank scores its share with the same BatchNorm statistics, the checkpoint's (`dist_bn`, as
                # train's): without SyncBatchNorm (the CPU's gloo) each rank's last forward passes had moved its own
                dist_utils.sync_running_stats(run.model, cfg.dist_bn, info)
                settings = inference_settings(run.data_config, None, None, info.device)
                metrics = evaluate_segmentation(run.model, run.eval_loader, model.num_classes, run.class_names,
                                                settings, distributed=info.distributed)
            row = _save_epoch(run, epoch, result, metrics)
            if epoch_ends_run(run, stop, epoch, run.num_epochs, row):
                break
    signalled, interrupted = stopped_after_epochs(stop, info, epoch, run.num_epochs, run.out.folder)
    if signalled:
        return _result(info, run.out.folder, run.out.manager, signalled, interrupted=interrupted)
    if info.is_primary:
        # the whole run's time, as train's: it counted this invocation's alone after a resume
        _logger.info("done in %.0fs; best mIoU %s; checkpoints in %s", run.out.run_seconds(started),
                     f"{run.out.manager.best_metric:.2f}" if run.out.manager.best_metric is not None else "n/a",
                     run.out.folder)
    return _result(info, run.out.folder, run.out.manager, 0)


def _open_splits(cfg: SegmentConfig, resume_ckpt: dict | None):
    """The checked training and validation splits (every bad file is one line here, before anything is written)."""
    saved = (resume_ckpt or {}).get("segmenter") or {}
    saved_data = (resume_ckpt or {}).get("data_config") or {}
    kw = dict(layout=_resumed(cfg, "layout", saved_data.get("layout"), unset=""),
              num_classes=_resumed(cfg, "num_classes", saved.get("num_classes")),
              reduce_zero_label=_resumed(cfg, "reduce_zero_label", saved_data.get("reduce_zero_label")),
              class_names=(resume_ckpt or {}).get("class_names"))
    train_split = open_split(cfg.data, cfg.train_split, **kw)
    val_split = open_split(cfg.data, cfg.val_split, decode_images=True, **kw)  # evaluation reads every image
    return train_split, val_split


def _resumed(cfg: SegmentConfig, name: str, saved, unset=None):
    """A label setting of a resumed run: the checkpoint's where ``cfg`` leaves it unset (the run's labels must mean
    what they meant: a resume of a ``reduce_zero_label=False`` run defaulting to ADE20K's True shifted every class by
    one), a SequencerError where ``cfg`` sets another value; ``cfg``'s own without a checkpoint value."""
    given = getattr(cfg, name)
    if saved is None:
        return given
    if given != unset and given != saved:
        raise SequencerError(f"`resume={cfg.resume}`: `{name}={given}` vs the checkpoint's {saved}",
                             hint=f"leave `{name}` unset when resuming")
    return saved


def _check_batch_norm_maps(cfg: SegmentConfig, info: dist_utils.DistInfo) -> None:
    """SequencerError (one line naming the settings) where a BatchNorm of the model would train on one value per
    channel: one image of a 1x1 map (UperNet's pooled map at any crop, the FPN's stride-32 level at a crop of 32 px
    or less, the auxiliary head's stride-16 map at 16 px or less), which BatchNorm refuses in training (a
    ValueError at the first step otherwise; mmsegmentation's heads fail the same way). Under DDP on GPUs the
    BatchNorms are synchronised, so the batch is every process's."""
    synced = info.distributed and info.device.type == "cuda"
    images = cfg.batch_size * (info.world_size if synced else 1)
    too_small = [m for m in batch_norm_maps(cfg.head, _aux_head(cfg), cfg.img_size) if images * m.cells < 2]
    if not too_small:
        return
    first = too_small[0]
    crops = [m.min_crop for m in too_small]
    fixes = ["`batch_size=2` or more"]
    if None not in crops:
        fixes.append(f"`img_size={max(crops)}` or more")
    elif all(m.cells >= 2 for m in batch_norm_maps("fpn", bool(cfg.aux_head), cfg.img_size)):
        fixes.append("`head=fpn`")  # UperNet's pooled map is 1x1 at any crop; the FPN's levels grow with it
    crop = f" and `img_size={cfg.img_size}`" if first.min_crop else ""
    raise SequencerError(f"`batch_size={cfg.batch_size}`{crop} with `{first.part}`: {first.what} is batch-normalised "
                         f"in training, which needs 2 or more images per batch"
                         + (" (on each process: the CPU's BatchNorms are not synchronised)" if info.distributed
                            else ""), hint=f"use {', or '.join(fixes)}")


def _aux_head(cfg: SegmentConfig) -> bool:
    """Whether the run trains the auxiliary head: ``aux_head`` where set (a resume's is its checkpoint's), else on
    for UperNet, as mmsegmentation's configs."""
    return cfg.head == "upernet" if cfg.aux_head is None else cfg.aux_head


# the settings that make the model (``Segmenter.config``): a resume takes the checkpoint's
ARCHITECTURE = ("backbone", "backbone_kwargs", "head", "head_channels", "out_channels", "aux_head")
_NEW_RUN_WEIGHTS = ("pretrained", "backbone_checkpoint")  # a new run's backbone weights


def _resumed_architecture(cfg: SegmentConfig, resume_ckpt: dict | None, state: RunState) -> SegmentConfig:
    """``cfg`` with a resumed checkpoint's architecture (``ARCHITECTURE``, from its ``segmenter`` config, as
    ``sequencer train`` takes its model from the checkpoint): a resume need not repeat the flags (without them it
    built the defaults' model and stopped on the checkpoint's weights, or was refused). A setting given with another
    value is refused in one line; ``pretrained``/``backbone_checkpoint`` given are said to do nothing (a note at the
    start, through ``state``)."""
    if resume_ckpt is None:
        return cfg
    saved = complete_config(resume_ckpt["segmenter"])  # what a checkpoint written before a key was had
    missing = [key for key in ARCHITECTURE if key not in saved]
    if missing:
        raise SequencerError(f"`resume={cfg.resume}`: the checkpoint's segmenter config lacks {missing[0]!r}")
    architecture = {key: saved[key] for key in ARCHITECTURE}
    given = given_settings(cfg)
    for key, value in architecture.items():
        if key in given and plain(given[key]) != plain(value):
            raise SequencerError(f"`resume={cfg.resume}`: `{key}={given[key]}` vs the checkpoint's {value}",
                                 hint=f"drop `{key}` when resuming (a resume keeps its model)")
    state.start_warnings.extend(inert_note(key, given[key], NEW_RUN_WEIGHTS) for key in _NEW_RUN_WEIGHTS
                                if given.get(key))
    return dataclasses.replace(cfg, **architecture)


def _build_model(cfg: SegmentConfig, num_classes: int, resume_ckpt: dict | None, device) -> nn.Module:
    if resume_ckpt is not None:  # its architecture is cfg's (_resumed_architecture)
        model = segmenter_from_config(resume_ckpt["segmenter"])
        model.load_state_dict(resume_ckpt["state_dict"])
    else:
        model = create_segmenter(cfg.backbone, num_classes, head=cfg.head, head_channels=cfg.head_channels,
                                 out_channels=cfg.out_channels, backbone_checkpoint=cfg.backbone_checkpoint,
                                 pretrained=cfg.pretrained, backbone_kwargs=cfg.backbone_kwargs,
                                 aux_head=_aux_head(cfg))
    return model.to(device)


def _build_run(cfg: SegmentConfig, state: RunState, info, model: nn.Module, train_split, val_split,
               resume_ckpt: dict | None) -> _Run:
    """Loaders, DDP wrapping, ``torchcompile``, optimizer, poly schedule (over the run's length, counted on from a
    resumed checkpoint's updates: :func:`_schedule_length`; a warmup shortened is said at the start, through
    ``state``) and AMP."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import PolyLRScheduler

    from ..data import create_loader

    data_config = segment_data_config(cfg.backbone, cfg.img_size, cfg.eval_size, cfg.eval_mode, cfg.stride,
                                      train_split.layout, train_split.reduce_zero_label)
    train_loader = create_loader(SegmentationDataset(train_split), None, cfg.batch_size, is_training=True,
                                 transform=TrainTransform(cfg.img_size, data_config["mean"], data_config["std"]),
                                 num_workers=cfg.workers, distributed=info.distributed, device=info.device,
                                 seed=cfg.seed, drop_last=True, normalize_on_device=False)
    evals = eval_loader(val_split, data_config, cfg.workers, info.device, distributed=info.distributed)
    updates_per_epoch = len(train_loader)
    total, first_update, num_epochs = _schedule_length(cfg, updates_per_epoch, resume_ckpt)
    train_model = model
    if info.distributed:
        if info.device.type == "cuda":  # batch statistics over the global batch, as the recipes' SyncBN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.torchcompile:  # the training steps only: evaluation runs eager, as `segment validate` does, on images of
        # every size (each would be a recompile), so that the checkpoint validates to the mIoU logged
        train_model = torch.compile(train_model, backend=cfg.torchcompile)
    try:
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    except (ValueError, AssertionError, KeyError) as e:
        raise SequencerError(f"`opt={cfg.opt}`: {e}", hint="see timm.optim.list_optimizers()") from None
    warmup = cfg.warmup_iters
    if warmup >= total:  # the recipes' 1500 would keep a short try below `lr` throughout: a quarter, as `train` does
        warmup = total // 4
        state.start_warnings.append(f"`warmup_iters={cfg.warmup_iters}` is not below the run's "
                                    f"{plural(total, 'update')}: the lr would never leave warmup; using "
                                    f"`warmup_iters={warmup}`")
    with poly_schedule_note_dropped():
        scheduler = PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=cfg.poly_power,
                                    lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.lr * cfg.warmup_ratio,
                                    warmup_prefix=True, t_in_epochs=False)
    amp_dtype, scaler = amp_setup(cfg, info.device, state.amp_notes)
    data_config["eval_amp_dtype"] = dtype_name(amp_dtype)
    return _Run(cfg, info, model, train_model, list(train_split.class_names), data_config, train_loader, evals,
                optimizer, scheduler, scaler, amp_dtype, total, updates_per_epoch, num_epochs, first_update,
                fields=_summary_fields(train_split.class_names), state=state)


def _schedule_length(cfg: SegmentConfig, updates_per_epoch: int, checkpoint: dict | None) -> tuple[int, int, int]:
    """(the run's updates, the update count before epoch 0's place, its epochs). A resume counts on from the updates
    its checkpoint made (``updates``; older files: its epochs at this run's updates per epoch). With another batch
    size or number of processes they are not ``start_epoch * updates_per_epoch``, which a resume counted from: an
    ``iters`` run found itself finished half-way, or ran past its length with the poly lr set back. ``iters`` stay
    the run's length in updates, ``epochs`` the epoch it ends after, each now of ``updates_per_epoch``."""
    start = resume_position(checkpoint) if checkpoint is not None else 0
    done = int(checkpoint.get("updates", start * updates_per_epoch)) if checkpoint is not None else 0
    total = cfg.iters if cfg.iters is not None else done + (cfg.epochs - start) * updates_per_epoch
    return total, done - start * updates_per_epoch, start + max(0, math.ceil((total - done) / updates_per_epoch))


def _updates_before(run: _Run, epoch: int) -> int:
    """The updates made before ``epoch`` starts (the run's ``total_updates`` at most)."""
    return min(run.total_updates, run.first_update + epoch * run.updates_per_epoch)


def _summary_fields(class_names: list[str]) -> list[str]:
    return (["epoch", "train_loss", "eval_miou", "eval_pixel_acc", "eval_macc"]
            + [f"iou_{name}" for name in class_names] + ["lr", "epoch_seconds"])


def _batch_split(run: _Run) -> dict:
    """How the run cuts its data into batches (one update each): a recovery file's epoch goes on where it matches."""
    return batch_split(run.cfg, run.info, run.updates_per_epoch)


def _restore(run: _Run, checkpoint: dict | None, updates_within: int = 0) -> int:
    """Optimizer, scaler and RNG state of a resumed run; the schedule moved to its position (past the
    ``updates_within`` the start epoch a recovery file had made). The epoch to start."""
    if checkpoint is None:
        return 0
    start_epoch = resume_position(checkpoint)
    if checkpoint.get("optimizer"):
        load_optimizer_state(run.optimizer, checkpoint["optimizer"], run.cfg.opt)
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    reseed_unless_resumed(checkpoint, run.cfg.seed + start_epoch, run.info)
    if run.first_update and run.info.is_primary:  # another batch size or number of processes than the checkpoint's
        _logger.info("`resume`: epoch %d starts after update %d of %d (%d updates an epoch now)", start_epoch,
                     _updates_before(run, start_epoch), run.total_updates, run.updates_per_epoch)
    run.scheduler.step_update(_updates_before(run, start_epoch) + updates_within)
    return start_epoch


# ------------------------------------------------------------------------------------------------ training
def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, aux_logits: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Cross-entropy over the labelled pixels: logits (N, K, H, W), masks (N, H, W) with 255 ignored; plus
    ``AUX_LOSS_WEIGHT`` times the auxiliary head's (``aux_logits``, the same shape) where given. A batch with no
    labelled pixel gives 0 (not NaN)."""
    labelled = (masks != IGNORE_INDEX).sum().clamp(min=1)
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
    if aux_logits is not None:
        aux = F.cross_entropy(aux_logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
        total = total + AUX_LOSS_WEIGHT * aux
    return total


def _train_one_epoch(run: _Run, epoch: int, stop: StopRequest, start: EpochProgress | None = None) -> EpochResult:
    """The epoch's ``loop.EpochResult``: the mean training loss over ranks, the lr of its last update, and what the
    updates covered; ``stopped_at`` the step where a stop request ended it (the loss nan). ``start``: what a recovery
    checkpoint's updates already covered
    of this epoch (its batches are not loaded); every batch is one update, and ``EpochProgress.seen`` counts batches
    (the loss is a mean over batches). Under DDP a step makes one all-reduce of its own (`loop.must_stop`: the stop
    request and the loss's finiteness together), as classification's."""
    cfg, info = run.cfg, run.info
    start = start or EpochProgress()
    run.train_loader.set_epoch(epoch, start.batches)
    run.train_model.train()
    epoch_updates = _updates_before(run, epoch)
    steps = min(run.updates_per_epoch, run.total_updates - epoch_updates)
    updates = epoch_updates + start.batches
    loss_sum, seen, started, lr = start.loss_sum, start.seen, time.time(), current_lr(run.optimizer)
    buffers = buffer_names(run.model)  # once: an update copies them only where there are any
    done = dataclasses.replace(start, rng=get_rng_state(), buffers=state_buffers(run.model, buffers))
    for step, (images, masks) in enumerate(run.train_loader, start=start.batches):
        if step >= steps:
            break
        with autocast(info.device.type, run.amp_dtype):
            logits, aux_logits = run.train_model(images, aux=True)  # the auxiliary head in every training step
            loss = segmentation_loss(logits, masks, aux_logits)
        value = loss.item()
        # one all-reduce for any rank's stop request or non-finite loss; a stop keeps this forward's move of
        # BatchNorm's statistics out of the recovery checkpoint (``done`` holds the last update's)
        if must_stop(run, stop, value, epoch, step, last=step == steps - 1):
            return EpochResult(float("nan"), lr, started, stopped_at=step, done=done)
        run.scaler.scale(loss).backward()
        lr = current_lr(run.optimizer)  # what this update uses (the log line showed the next update's)
        if cfg.clip_grad is not None:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        updates += 1
        run.scheduler.step_update(updates)
        loss_sum, seen = loss_sum + value, seen + 1
        # before the next batch draws and goes forward
        done = EpochProgress(step + 1, loss_sum, seen, get_rng_state(), state_buffers(run.model, buffers))
        if info.is_primary and (step % cfg.log_interval == 0 or step == steps - 1):
            _logger.info("segment train: epoch %d [%d/%d] loss %.4f (%.4f) lr %.2e %.1f img/s", epoch, step + 1,
                         steps, value, loss_sum / seen, lr,
                         (seen - start.seen) * cfg.batch_size * info.world_size / max(time.time() - started, 1e-9))
    return EpochResult(dist_utils.all_reduce_mean([loss_sum / max(seen, 1)], info)[0], lr, started, done=done)


# -------------------------------------------------------------------------------------------------- saving
def _checkpoint_state(run: _Run, epoch: int, complete: bool, step: int, metric, rng_states) -> dict:
    return training_checkpoint(run.model, run.optimizer, run.scaler, run.cfg, epoch, complete, step, metric,
                               rng_states, segmenter=plain(run.model.config), class_names=list(run.class_names),
                               data_config=plain(run.data_config),
                               updates=_updates_before(run, epoch + complete),  # before a resume's start epoch
                               summary_rows=[{k: str(v) for k, v in r.items()} for r in run.out.rows])


def _save_epoch(run: _Run, epoch: int, result: EpochResult, metrics: dict | None) -> dict:
    """Append the epoch's summary row (its ``lr``: the one the epoch's last update used, as train's), then write the
    checkpoints (best by mIoU) and summary.csv (rank 0). Returns the row as numbers, every column (nan where nothing
    was evaluated): what callbacks get."""
    train_loss = result.train_loss
    row = dict(epoch=epoch, train_loss=f"{train_loss:.6f}", lr=f"{result.lr:.6e}",
               epoch_seconds=f"{time.time() - result.started:.2f}")
    if metrics is not None:
        row.update(metrics_row(metrics))
    run.out.rows.append(row)
    numbers = summary_numbers({name: row.get(name, "") for name in run.fields})
    rng_states = dist_utils.all_gather_object(get_rng_state(), run.info)
    if not run.info.is_primary:
        return numbers
    metric = float(row["eval_miou"]) if metrics is not None and math.isfinite(train_loss) else None
    state = _checkpoint_state(run, epoch, True, 0, metric, rng_states)
    is_best = run.out.manager.save_epoch(state, epoch, metric)
    write_summary(run.out.summary_path, run.out.rows, run.fields)
    shown = (f" mIoU {row['eval_miou']} pixel acc {row['eval_pixel_acc']}" if metrics is not None else "")
    _logger.info("segment train: epoch %d train_loss %.4f%s%s", epoch, train_loss, shown,
                 " *best*" if is_best else "")
    return numbers


def _save_recovery(run: _Run, epoch: int, step: int, done: EpochProgress, signum: int) -> int:
    """``recovery.pth.tar`` (a resume goes on after the epoch's last update, ``done``); the exit status
    128 + signal."""
    rng_states, progress = recovery_progress(done, run.info, _batch_split(run))
    if run.info.is_primary:
        state = _checkpoint_state(run, epoch, False, step, None, rng_states)
        path = run.out.manager.save_recovery(recovery_state(state, done, progress))
        _logger.warning("stopped by %s at epoch %d step %d; recovery checkpoint %s (`resume=auto` goes on %s)",
                        signal.Signals(signum).name, epoch, step, path, resume_point(done.batches))
    dist_utils.barrier(run.info)
    return 128 + signum


def _result(info: dist_utils.DistInfo, folder: Path, manager, exit_code: int, interrupted: bool = False,
            best_epoch: int | None = None) -> SegmentResult:
    """The run's :class:`SegmentResult`, rank 0's on every rank (``outputs.primary_result``; every rank calls), read
    back from what it wrote (``outputs.read_back``). ``best_epoch``: without a ``manager`` (a finished run resumed),
    the one its checkpoint records; where it records none, its best row."""
    def read() -> SegmentResult:
        got = read_back(folder, manager, "eval_miou", "eval_miou", True, best_epoch)
        return SegmentResult(got.best_row["eval_miou"] if got.best_row else None, got.best_epoch, got.checkpoint,
                             folder, got.rows, exit_code, interrupted)
    return primary_result(info, read)


def _log_start(run: _Run, train_split, start_epoch: int, updates_within: int = 0) -> None:
    """``updates_within``: what a recovery file had made of the start epoch."""
    cfg, info = run.cfg, run.info
    n_params = sum(p.numel() for p in run.model.parameters())
    where = f"{info.world_size} processes, " if info.distributed else ""
    # a resume's epochs make only the updates left: "epochs 2..3 (8 updates)" named the whole run's 8 for its last 4
    made = _updates_before(run, start_epoch) + updates_within
    updates = f"{run.total_updates - made} of the run's {run.total_updates} updates" if made else \
        f"{run.total_updates} updates"
    _logger.info("segment train: %s+%s%s (%.2fM params) on %d images of %s, %d classes, crop %dpx, %s%s; epochs "
                 "%d..%d (%s), batch %d; output %s", cfg.backbone, cfg.head,
                 "+aux" if run.model.config.get("aux_head") else "", n_params / 1e6, len(train_split),
                 train_split.description, train_split.num_classes, cfg.img_size, where, info.device, start_epoch,
                 run.num_epochs - 1, updates, cfg.batch_size, run.out.folder)
