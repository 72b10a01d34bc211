"""The checks of a training run's settings (:class:`~sequencer.engine.config.TrainConfig`) that refuse values which
cannot work, each with one line naming the flag (:func:`check_config`), run before anything is read or written, and
again on a resume once its checkpoint's settings are known (a kept `mixup` with a new odd `batch_size`)."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..errors import SequencerError
from ..models import get_model_entry
from .config import RunState, TrainConfig
from .distributed import rank_before_joining
from .inference import resolve_device
from .library_flags import check_library_flags


def check_config(cfg: TrainConfig, state: RunState) -> TrainConfig:
    """Refuse values that cannot work, naming the flag; returns the settings to run: ``cfg``, or a copy with
    ``input_size`` spelled as ``in_chans`` and ``img_size`` and a warmup that would fill the run shortened (said at the
    start, through ``state``). A resume runs it again on the checkpoint's settings merged with this start's."""
    resolve_device(cfg.device)
    _check_numbers(cfg)
    _check_sizes_and_files(cfg)
    cfg = _input_size_as_img_size(cfg, state)
    if not cfg.resume:  # a resume checks it once the checkpoint's settings are known
        cfg = shorten_warmup(cfg, state)
    return cfg


def _input_size_as_img_size(cfg: TrainConfig, state: RunState) -> TrainConfig:
    """``input_size C H W`` (timm's flag) is ``in_chans C`` and ``img_size H``, which the model, the loaders and a
    resume read: a copy with them set and counted as given (a resume then runs them, not its checkpoint's). An
    ``img_size`` or ``in_chans`` given beside it with another value is refused (timm silently used ``input_size``)."""
    if cfg.input_size is None:
        return cfg
    in_chans, side = cfg.input_size[0], cfg.input_size[1]
    for name, value in (("img_size", side), ("in_chans", in_chans)):
        if name in state.given and getattr(cfg, name) is not None and getattr(cfg, name) != value:
            raise SequencerError(f"`{name}={getattr(cfg, name)}` vs `input_size={' '.join(map(str, cfg.input_size))}`",
                                 hint="give one of them (`input_size C H W` sets `in_chans` C and `img_size` H)")
    state.given = state.given | {"img_size", "in_chans"}
    return dataclasses.replace(cfg, img_size=side, in_chans=in_chans)


def _bad(name, value, need):
    raise SequencerError(f"`{name}={value}`: {need}")


def _check_numbers(cfg: TrainConfig) -> None:
    bad = _bad
    if cfg.epochs <= 0:
        bad("epochs", cfg.epochs, "must be at least 1")
    if cfg.batch_size <= 0:
        bad("batch_size", cfg.batch_size, "must be at least 1")
    if cfg.validation_batch_size is not None and cfg.validation_batch_size <= 0:
        bad("validation_batch_size", cfg.validation_batch_size, "must be at least 1")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr", cfg.lr, "must be a positive number")
    for flag, value in (("lr_base", cfg.lr_base), ("warmup_lr", cfg.warmup_lr), ("min_lr", cfg.min_lr),
                        ("weight_decay", cfg.weight_decay), ("momentum", cfg.momentum),
                        ("mixup", cfg.mixup), ("cutmix", cfg.cutmix), ("color_jitter", cfg.color_jitter),
                        ("warmup_epochs", cfg.warmup_epochs), ("cooldown_epochs", cfg.cooldown_epochs),
                        ("workers", cfg.workers), ("checkpoint_hist", cfg.checkpoint_hist),
                        ("recovery_interval", cfg.recovery_interval)):
        if not value >= 0:
            bad(flag, value, "must not be negative")
    for flag, value in (("reprob", cfg.reprob), ("hflip", cfg.hflip), ("mixup_prob", cfg.mixup_prob),
                        ("mixup_switch_prob", cfg.mixup_switch_prob)):
        if not 0 <= value <= 1:
            bad(flag, value, "must be a probability in [0, 1]")
    for flag, value in (("smoothing", cfg.smoothing), ("drop", cfg.drop), ("drop_path", cfg.drop_path or 0)):
        if not 0 <= value < 1:
            bad(flag, value, "must be in [0, 1)")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        bad("clip_grad", cfg.clip_grad, "must be positive")
    if not 0 < cfg.model_ema_decay < 1:
        bad("model_ema_decay", cfg.model_ema_decay, "must be in (0, 1)")
    if cfg.grad_accum_steps < 1:
        bad("grad_accum_steps", cfg.grad_accum_steps, "must be at least 1")
    if cfg.log_interval < 1:
        bad("log_interval", cfg.log_interval, "must be at least 1")
    if cfg.recount < 1:
        bad("recount", cfg.recount, "must be at least 1")
    if cfg.dist_bn not in ("", "reduce", "broadcast"):
        bad("dist_bn", cfg.dist_bn, "is 'reduce' (the mean of the ranks' BatchNorm statistics), 'broadcast' or ''")
    if cfg.lr_base_scale not in ("", "linear", "sqrt"):  # anything else used to scale linearly
        bad("lr_base_scale", cfg.lr_base_scale, "is 'linear' or 'sqrt' ('' picks sqrt for ada*/lamb, else linear)")
    if not 0 <= cfg.val_fraction < 1:
        bad("val_fraction", cfg.val_fraction, "must be in [0, 1) (e.g. 0.1 holds out a tenth of each class)")


def _check_sizes_and_files(cfg: TrainConfig) -> None:
    bad = _bad
    for flag, value in (("img_size", cfg.img_size), ("num_classes", cfg.num_classes),
                        ("in_chans", cfg.in_chans)):
        if value is not None and value <= 0:
            bad(flag, value, "must be positive")
    if cfg.input_size is not None and (min(cfg.input_size) <= 0 or cfg.input_size[1] != cfg.input_size[2]):
        bad("input_size", " ".join(map(str, cfg.input_size)), "needs positive sides and a square image")
    if cfg.scale[0] > cfg.scale[1] or not 0 < cfg.scale[1] <= 1 or cfg.scale[0] <= 0:
        bad("scale", " ".join(map(str, cfg.scale)), "needs 0 < MIN <= MAX <= 1")
    if cfg.ratio[0] > cfg.ratio[1] or cfg.ratio[0] <= 0:
        bad("ratio", " ".join(map(str, cfg.ratio)), "needs 0 < MIN <= MAX")
    minmax = cfg.cutmix_minmax
    if minmax is not None and (len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1):
        # timm draws the box side between the two (numpy's randint): MIN >= MAX failed at the first batch; MIN 0
        # (boxes down to none) is timm's to draw
        bad("cutmix_minmax", " ".join(map(str, minmax)), "needs two values, 0 <= MIN < MAX <= 1")
    mixup_on = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    if mixup_on and cfg.batch_size % 2:
        bad("batch_size", cfg.batch_size, "must be even with `mixup`/`cutmix` (images are mixed in pairs)")
    # rank 0's file: another node (no shared filesystem) gets the checkpoint from rank 0 (`resume.read_on_every_rank`)
    if cfg.resume and cfg.resume != "auto" and rank_before_joining() == 0 and not Path(cfg.resume).is_file():
        raise SequencerError(f"`resume={cfg.resume!r}`: no such file",
                             hint="pass a checkpoint written by `sequencer train`, or `resume=auto`")
    if cfg.resume == "auto" and not cfg.experiment:
        raise SequencerError("`resume=auto` needs `experiment=NAME` to know which folder to continue",
                             hint="use the same `output`/`experiment` for every (re)start")
    check_experiment_name(cfg.experiment)
    if cfg.model:
        get_model_entry(cfg.model)  # unknown names fail before any data is read, with suggestions
    check_library_flags(cfg)
    if cfg.initial_checkpoint and not Path(cfg.initial_checkpoint).is_file():
        raise SequencerError(f"`initial_checkpoint={cfg.initial_checkpoint!r}`: no such file")


def check_experiment_name(name: str) -> None:
    """Refuse an ``experiment`` that is not one folder name inside ``output`` (``../escaped``, ``a/b``)."""
    if name and (name in (".", "..") or any(s in name for s in ("/", "\\", os.sep))):
        raise SequencerError(f"`experiment={name!r}`: a folder name inside `output`, without a path separator or "
                             f"'..'", hint="pass `output=DIR` for where runs go, `experiment=NAME`")


def shorten_warmup(cfg: TrainConfig, state: RunState) -> TrainConfig:
    """``cfg``, or a copy whose warmup ends before the run does."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        # timm's default 5 warmup epochs would keep a short run below --lr for its whole length. A quarter of the
        # run instead; but stepped per epoch, warmup spends its whole first epoch at --warmup-lr, so a 1-epoch
        # warmup would only waste an epoch (measured: 50% instead of 76% top-1 after 4 epochs, docs/training.md)
        shortened = cfg.epochs // 4
        if shortened < 2 and not cfg.sched_on_updates:
            shortened = 0
        # said once the run starts: a later one-line error must stay the only line (issue 19)
        state.start_warnings.append(f"`warmup_epochs={cfg.warmup_epochs}` is not below `epochs={cfg.epochs}`: the "
                                    f"lr would never leave warmup; using `warmup_epochs={shortened}`")
        return dataclasses.replace(cfg, warmup_epochs=shortened)
    return cfg
