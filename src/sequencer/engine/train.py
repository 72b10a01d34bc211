"""``sequencer train``: timm-compatible training, fine-tuning and transfer of Sequencer models.

Flags keep the names and meaning of timm's ``train.py`` (the paper's recipes run unchanged); the library pieces
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

import argparse
import ast
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..cli_common import add_torchcompile_argument, check_device
from ..data.datasets import held_out_split, map_classes_by_name
from ..errors import SequencerError
from ..models import create_model, get_model_entry
from ..models.loading import extract_state_dict, load_state_dict_into, read_checkpoint
from . import distributed as dist_utils
from . import timm_habits
from .checkpoint import resume_position, set_rng_state
from .library_flags import check_library_flags
from .loop import (Loaders, Optimization, StopRequest, TrainingRun, current_lr, evaluate_epoch, save_epoch,
                   save_recovery, train_one_epoch)
from .outputs import plural, prepare_outputs, release_claim, remove_if_empty, run_args
from .resume import apply_resume_contract, locate_resume, read_resume_checkpoint

SUMMARY_FIELDS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "epoch_seconds"]

# Used when no DATA is given (or --dataset digits): sequencer2d_nano on the 8x8 scikit-learn digits, upscaled.
# Tuned to pass 96% top-1 on the held-out split in well under 2 minutes on 2 CPU cores.
DIGITS_DEFAULTS = dict(
    dataset="digits", model="sequencer2d_nano", img_size=16, epochs=15, batch_size=32, opt="adamw", lr=2e-3,
    weight_decay=0.05, sched="cosine", sched_on_updates=True, warmup_epochs=0, min_lr=1e-5, hflip=0.0,
    scale=[0.75, 1.0], ratio=[0.9, 1.1], color_jitter=0.0, smoothing=0.1, workers=0,
    train_interpolation="bilinear", interpolation="bilinear", log_interval=30, checkpoint_hist=2, val_split="val",
)


def _float_list(n):
    return dict(type=float, nargs=n, metavar="F")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="dataset root (image folders, a .tar, or the torchvision download folder); "
                             "none = the embedded digits demo")
    parser.add_argument("-c", "--config", default="", metavar="FILE",
                        help="YAML of flag values (e.g. a run's args.yaml); command-line flags override it")

    g = parser.add_argument_group("dataset")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="same as DATA")
    g.add_argument("--dataset", "-d", default="", metavar="NAME",
                   help='"" image folders, "tar", "torch/cifar10", "torch/flowers102", ..., "digits"')
    g.add_argument("--train-split", default="train", help="training split (folder name)")
    g.add_argument("--val-split", default="validation", help="validation split (val/validation/test found by name)")
    g.add_argument("--dataset-download", action="store_true", help="let torchvision datasets download")
    g.add_argument("--class-map", default="", metavar="FILE", help="class name -> index map file")

    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, metavar="NAME",
                   help="model name (default: sequencer2d_s; sequencer2d_nano for the demo; a resumed or "
                        "initial checkpoint's own)")
    g.add_argument("--model-kwargs", nargs="*", default={}, type=_key_value, action=_KeyValues, metavar="KEY=VALUE",
                   help="architecture overrides, e.g. layers='(1,1,1)' union=add")
    g.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH", help="start from these weights")
    g.add_argument("--resume", default="", metavar="PATH|auto",
                   help="resume model, optimizer, scheduler, EMA, scaler, epoch and RNG state; 'auto' = the "
                        "experiment folder's recovery/last checkpoint if any (needs --experiment)")
    g.add_argument("--no-resume-opt", action="store_true", help="do not restore optimizer/scheduler/scaler state")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the dataset's)")
    g.add_argument("--img-size", type=int, default=None, help="square image size (default: the model's)")
    g.add_argument("--in-chans", type=int, default=None, help="input channels")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input size C H W (overrides --img-size)")
    g.add_argument("--crop-pct", type=float, default=None, help="validation centre-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M", help="normalisation mean")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S", help="normalisation std")
    g.add_argument("--interpolation", default="", help="validation resize interpolation")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, help="validation batch size")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    add_torchcompile_argument(g)
    g.add_argument("--torchcompile-mode", default=None, metavar="MODE",
                   help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (adamw, sgd, lamb, ...)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="B", help="optimizer betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping value (off by default)")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay")

    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", help="cosine, tanh, step, multistep, plateau, poly or none")
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: --lr-base scaled by the global batch size)")
    g.add_argument("--lr-base", type=float, default=0.1, help="lr for a global batch of --lr-base-size")
    g.add_argument("--lr-base-size", type=int, default=256, help="batch size --lr-base refers to")
    g.add_argument("--lr-base-scale", default="", help="linear or sqrt (default: sqrt for ada*/lamb)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT", help="lr noise on/off epochs")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="lr noise limit")
    g.add_argument("--lr-noise-std", type=float, default=1.0, help="lr noise std")
    g.add_argument("--lr-cycle-mul", type=float, default=1.0, help="cycle length multiplier")
    g.add_argument("--lr-cycle-decay", type=float, default=0.5, help="lr decay per cycle")
    g.add_argument("--lr-cycle-limit", type=int, default=1, help="number of cycles")
    g.add_argument("--lr-k-decay", type=float, default=1.0, help="k-decay for cosine/poly")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="warmup start lr")
    g.add_argument("--min-lr", type=float, default=0.0, help="lower lr bound of cyclic schedules")
    g.add_argument("--epochs", type=int, default=300, help="epochs to train")
    g.add_argument("--start-epoch", type=int, default=None, help="override the start epoch")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="E",
                   help="multistep milestones")
    g.add_argument("--decay-epochs", type=float, default=90, help="epochs between step decays")
    g.add_argument("--warmup-epochs", type=int, default=5, help="warmup epochs")
    g.add_argument("--warmup-prefix", action="store_true", help="warmup is not part of the decay length")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau patience")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step/plateau decay factor")

    g = parser.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--scale", **_float_list(2), default=[0.08, 1.0], help="random-resized-crop area range")
    g.add_argument("--ratio", **_float_list(2), default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter factor")
    g.add_argument("--aa", default=None, metavar="POLICY", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode (const, rand, pixel)")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (on when > 0)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (on when > 0)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar="F",
                   help="cutmix box ratio range (overrides alpha)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"), help="mixup granularity")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0 = never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy loss")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="BCE target binarisation threshold")
    g.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    g.add_argument("--drop", type=float, default=0.0, help="dropout before the head")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")

    g = parser.add_argument_group("model EMA")
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    g.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--log-interval", type=int, default=50, help="batches between log lines")
    g.add_argument("--checkpoint-hist", type=int, default=10, help="best epochs to keep as checkpoint-<E>.pth.tar")
    g.add_argument("-j", "--workers", type=int, default=4, help="data loading processes per training process")
    g.add_argument("--amp", "--native-amp", dest="amp", action="store_true", help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="AMP dtype (on the CPU bfloat16 is used)")
    g.add_argument("--output", default="", metavar="DIR", help="output root (default ./output/train)")
    g.add_argument("--experiment", default="", help="experiment folder name (default: timestamp-model-imgsize)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"), help="best-checkpoint metric")
    g.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    timm_habits.add_arguments(parser)

    # Every flag defaults to "absent" so that run() can tell explicit flags from defaults: explicit flags beat
    # --config, which beats the digits-demo defaults, which beat timm's defaults (shown in --help).
    defaults = {}
    for action in parser._actions:
        if action.dest in ("help",) or action.default is argparse.SUPPRESS:
            continue
        defaults[action.dest] = action.default
        if action.help and action.help is not argparse.SUPPRESS and action.default not in (None, "", False, {}):
            action.help += f" (default: {action.default})"
        action.default = argparse.SUPPRESS
    parser.set_defaults(_train_defaults=defaults)


def _key_value(text: str) -> tuple[str, object]:
    """'depth=3' -> ('depth', 3): the value as a Python literal where it reads as one, else as text."""
    key, equals, raw = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


class _KeyValues(argparse.Action):
    """Collects the (key, value) pairs of :func:`_key_value` into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


# ------------------------------------------------------------------------------------------- configuration
def resolve_config(args: argparse.Namespace) -> argparse.Namespace:
    """timm defaults < digits-demo defaults < ``--config`` YAML < explicit flags, as one namespace."""
    explicit = {k: v for k, v in vars(args).items() if k not in ("_train_defaults", "_module", "command")}
    defaults = dict(getattr(args, "_train_defaults", None) or _parser_defaults())
    from_yaml = {}
    config_path = explicit.get("config") or ""
    if config_path:
        try:
            with open(config_path) as f:
                from_yaml = yaml.safe_load(f) or {}
        except OSError as e:
            raise SequencerError(f"--config {config_path!r}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise SequencerError(f"--config {config_path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(from_yaml, dict):
            raise SequencerError(f"--config {config_path!r} must hold a mapping of flag names to values")
        # keys may be spelled as the flags are (drop-path) or as args.yaml writes them (drop_path)
        from_yaml = {str(k).lstrip("-").replace("-", "_"): v for k, v in from_yaml.items()}
        unknown = sorted(set(from_yaml) - set(defaults))
        if unknown:
            raise SequencerError(f"--config {config_path!r}: unknown key(s) {', '.join(unknown)}",
                                 hint="keys are train's flag names, e.g. drop-path or drop_path")
        from_yaml.pop("config", None)
    merged = {**defaults, **from_yaml, **explicit}
    data = merged.get("data") or merged.get("data_dir")
    if (not data and not merged.get("dataset")) or merged.get("dataset") == "digits":
        merged = {**defaults, **DIGITS_DEFAULTS, **from_yaml, **explicit}
    merged["data"] = merged.get("data") or merged.get("data_dir")
    # which settings the user chose (flags or --config): a resume takes every other one from its checkpoint
    merged["_given"] = sorted(set(explicit) | set(from_yaml))
    return argparse.Namespace(**merged)


def _parser_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.get_default("_train_defaults")


def check_config(cfg: argparse.Namespace) -> None:
    """Refuse values that cannot work, naming the flag."""
    def bad(flag, value, need):
        raise SequencerError(f"{flag} {value}: {need}")

    check_device(cfg.device)

    if cfg.epochs <= 0:
        bad("--epochs", cfg.epochs, "must be at least 1")
    if cfg.batch_size <= 0:
        bad("--batch-size", cfg.batch_size, "must be at least 1")
    if cfg.validation_batch_size is not None and cfg.validation_batch_size <= 0:
        bad("--validation-batch-size", cfg.validation_batch_size, "must be at least 1")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("--lr", cfg.lr, "must be a positive number")
    for flag, value in (("--lr-base", cfg.lr_base), ("--warmup-lr", cfg.warmup_lr), ("--min-lr", cfg.min_lr),
                        ("--weight-decay", cfg.weight_decay), ("--momentum", cfg.momentum),
                        ("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix), ("--color-jitter", cfg.color_jitter),
                        ("--warmup-epochs", cfg.warmup_epochs), ("--cooldown-epochs", cfg.cooldown_epochs),
                        ("--workers", cfg.workers), ("--checkpoint-hist", cfg.checkpoint_hist),
                        ("--recovery-interval", cfg.recovery_interval)):
        if not value >= 0:
            bad(flag, value, "must not be negative")
    for flag, value in (("--reprob", cfg.reprob), ("--hflip", cfg.hflip), ("--mixup-prob", cfg.mixup_prob),
                        ("--mixup-switch-prob", cfg.mixup_switch_prob)):
        if not 0 <= value <= 1:
            bad(flag, value, "must be a probability in [0, 1]")
    for flag, value in (("--smoothing", cfg.smoothing), ("--drop", cfg.drop), ("--drop-path", cfg.drop_path or 0)):
        if not 0 <= value < 1:
            bad(flag, value, "must be in [0, 1)")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        bad("--clip-grad", cfg.clip_grad, "must be positive")
    if not 0 < cfg.model_ema_decay < 1:
        bad("--model-ema-decay", cfg.model_ema_decay, "must be in (0, 1)")
    if cfg.grad_accum_steps < 1:
        bad("--grad-accum-steps", cfg.grad_accum_steps, "must be at least 1")
    if cfg.log_interval < 1:
        bad("--log-interval", cfg.log_interval, "must be at least 1")
    if cfg.recount < 1:
        bad("--recount", cfg.recount, "must be at least 1")
    for flag, value in (("--img-size", cfg.img_size), ("--num-classes", cfg.num_classes),
                        ("--in-chans", cfg.in_chans)):
        if value is not None and value <= 0:
            bad(flag, value, "must be positive")
    if cfg.input_size is not None and (min(cfg.input_size) <= 0 or cfg.input_size[1] != cfg.input_size[2]):
        bad("--input-size", " ".join(map(str, cfg.input_size)), "needs positive sides and a square image")
    if cfg.scale[0] > cfg.scale[1] or not 0 < cfg.scale[1] <= 1 or cfg.scale[0] <= 0:
        bad("--scale", " ".join(map(str, cfg.scale)), "needs 0 < MIN <= MAX <= 1")
    if cfg.ratio[0] > cfg.ratio[1] or cfg.ratio[0] <= 0:
        bad("--ratio", " ".join(map(str, cfg.ratio)), "needs 0 < MIN <= MAX")
    mixup_on = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    if mixup_on and cfg.batch_size % 2:
        bad("--batch-size", cfg.batch_size, "must be even with --mixup/--cutmix (images are mixed in pairs)")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).is_file():
        raise SequencerError(f"--resume {cfg.resume!r}: no such file",
                             hint="pass a checkpoint written by `sequencer train`, or --resume auto")
    if cfg.resume == "auto" and not cfg.experiment:
        raise SequencerError("--resume auto needs --experiment NAME to know which folder to continue",
                             hint="use the same --output/--experiment for every (re)start")
    if cfg.model:
        get_model_entry(cfg.model)  # unknown names fail before any data is read, with suggestions
    check_library_flags(cfg)
    if cfg.initial_checkpoint and not Path(cfg.initial_checkpoint).is_file():
        raise SequencerError(f"--initial-checkpoint {cfg.initial_checkpoint!r}: no such file")
    if not cfg.resume:  # a resume checks it once the checkpoint's settings are known
        shorten_warmup(cfg)


def shorten_warmup(cfg: argparse.Namespace) -> None:
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        # timm's default 5 warmup epochs would keep a short run below --lr for its whole length. A quarter of the
        # run instead; but stepped per epoch, warmup spends its whole first epoch at --warmup-lr, so a 1-epoch
        # warmup would only waste an epoch (measured: 50% instead of 76% top-1 after 4 epochs, docs/training.md)
        shortened = cfg.epochs // 4
        if shortened < 2 and not cfg.sched_on_updates:
            shortened = 0
        # said once the run starts: a later one-line error must stay the only line (issue 19)
        cfg._start_warnings = [*getattr(cfg, "_start_warnings", []),
                               f"--warmup-epochs {cfg.warmup_epochs} is not below --epochs {cfg.epochs}: the lr would "
                               f"never leave warmup; using --warmup-epochs {shortened}"]
        cfg.warmup_epochs = shortened


# ------------------------------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    check_config(cfg)
    try:
        with dist_utils.process_group(cfg.device) as info:
            return _train(cfg, info)
    except BaseException:
        release_claim(cfg)
        remove_if_empty(cfg)
        raise
    finally:
        release_claim(cfg)
        if getattr(cfg, "_wandb", None) is not None:
            cfg._wandb.finish()


def _train(cfg, info: dist_utils.DistInfo) -> int:
    """The run, step by step. Data, model and settings are all checked before a file or folder is written."""
    from timm.utils import random_seed

    started = time.time()
    random_seed(cfg.seed, info.rank)
    if cfg.input_size:
        cfg.in_chans, cfg.img_size = cfg.input_size[0], cfg.input_size[1]
    data = build_data(cfg, info)
    model = build_model(cfg, data, info.device)
    loaders = build_loaders(cfg, info, model, data)
    opt = build_optimization(cfg, info, model, loaders, data.num_classes)
    start_epoch = restore(cfg, info, data.resume_ckpt, opt, loaders.updates_per_epoch)
    if start_epoch >= opt.num_epochs:
        _log(info, f"--resume {data.resume_path}: the run already finished its {opt.num_epochs} epochs; nothing to "
                   f"do (pass a larger --epochs to extend it)")
        return 0
    out = prepare_outputs(cfg, info, data.resume_path, data.resume_ckpt, start_epoch, loaders.img_size)
    for message in [*getattr(cfg, "_start_warnings", []), *timm_habits.notes(cfg, info.device)]:
        if info.is_primary:
            warnings.warn(message)
    cfg._wandb = timm_habits.start_wandb(cfg, run_args(cfg)) if info.is_primary else None
    train_model, eval_model = wrap_model(cfg, info, model)
    training = TrainingRun(cfg, info, model, train_model, eval_model, data.class_names, loaders, opt, out)
    _log_start(training, data, start_epoch)

    metrics = None
    with StopRequest() as stop:
        for epoch in range(start_epoch, opt.num_epochs):
            result = train_one_epoch(training, epoch, stop)
            if result.stopped_at is not None:
                return save_recovery(training, epoch, result.stopped_at, stop.signum)
            metrics, raw_top1 = evaluate_epoch(training)
            metric = float(metrics[cfg.eval_metric])
            if opt.scheduler is not None:
                opt.scheduler.step(epoch + 1, metric)
            save_epoch(training, epoch, result, metrics, metric, raw_top1)
            if stop.signum:  # the signal arrived during evaluation: the epoch is saved, stop here
                _log(info, f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch}; resume with "
                           f"--resume {out.folder / 'last.pth.tar'}")
                return 128 + stop.signum
    if metrics is not None:
        _log_finish(training, metrics, started)
    return 0


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    train_set: Any
    eval_set: Any
    class_names: list[str]
    num_classes: int  # the head's size: --num-classes, else the number of classes (a resumed model's own)
    resume_path: str = ""
    resume_ckpt: dict | None = None


def build_data(cfg, info: dist_utils.DistInfo) -> TrainData:
    """The training and held-out splits, labelled by the class names (a resumed run's own), and the checkpoint
    to resume, if any."""
    from ..data import create_dataset

    dataset_kw = dict(class_map=cfg.class_map or None, download=cfg.dataset_download)
    train_set = create_dataset(cfg.dataset, root=cfg.data, split=cfg.train_split, is_training=True, **dataset_kw)
    resume_path = locate_resume(cfg, info)
    resume_ckpt = read_resume_checkpoint(resume_path) if resume_path else None
    class_names = list(train_set.class_names)
    if resume_ckpt is not None:
        class_names = apply_resume_contract(cfg, resume_ckpt, resume_path, class_names)
        shorten_warmup(cfg)
        map_classes_by_name(train_set, class_names, "the training split")
    eval_set = _eval_split(cfg, info, dataset_kw, class_names)
    num_classes = cfg.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise SequencerError(f"--num-classes {num_classes} is smaller than the {len(class_names)} classes of the "
                             f"training data", hint=f"use --num-classes {len(class_names)} or drop it")
    check_classes(cfg, info, train_set, class_names, num_classes)
    # the class folders a --class-map left out: checkpoints keep them, so validate leaves them out too
    cfg._ignored_classes = sorted(set(train_set.ignored_classes) | set(eval_set.ignored_classes))
    if len(train_set) < cfg.batch_size * info.world_size:
        raise SequencerError(
            f"--batch-size {cfg.batch_size} is larger than the training split ({len(train_set)} images"
            f"{f' over {info.world_size} processes' if info.distributed else ''})",
            hint=f"use --batch-size {max(1, len(train_set) // info.world_size // 2 * 2)} or less")
    return TrainData(train_set, eval_set, class_names, num_classes, resume_path, resume_ckpt)


def check_classes(cfg, info, train_set, class_names: list[str], num_classes: int) -> None:
    """Refuse a one-class training set; warn about head outputs no image trains (a map naming classes without a
    folder, --num-classes above the class count)."""
    if len(class_names) < 2 and num_classes < 2:
        raise SequencerError(f"the training split ({train_set.description}) has a single class "
                             f"({', '.join(class_names)}): every image would be right",
                             hint="point DATA at the folder holding one sub-folder per class")
    if not info.is_primary:
        return
    present = {class_names[t] for t in _targets(train_set)} if hasattr(train_set, "samples") else set(class_names)
    empty = [n for n in class_names if n not in present]
    if empty:
        source = "the class map names" if cfg.class_map else "the model has"
        warnings.warn(f"the training split has no images of {len(empty)} class(es) {source} "
                      f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): their outputs never train")
    if num_classes > len(class_names):
        warnings.warn(f"--num-classes {num_classes} is larger than the {len(class_names)} classes of the training "
                      f"data: outputs {len(class_names)}..{num_classes - 1} never train")


def _targets(dataset) -> list[int]:
    transform = dataset.target_transform or (lambda t: t)
    return [transform(t) for _, t in dataset.samples]


def _eval_split(cfg, info, dataset_kw: dict, class_names: list[str]):
    """The held-out split, its labels mapped by name onto the training classes (a missing class is reported)."""
    from ..data import create_dataset
    if "val_split" not in getattr(cfg, "_given", ()) and cfg.dataset.lower() in ("", "folder", "image_folder"):
        found = held_out_split(cfg.data, cfg.val_split)
        if found != cfg.val_split:
            _log(info, f"note: {cfg.data} has no {cfg.val_split!r} split: evaluating on {found!r}")
        cfg.val_split = found
    eval_set = create_dataset(cfg.dataset, root=cfg.data, split=cfg.val_split, is_training=False, **dataset_kw)
    missing = map_classes_by_name(eval_set, class_names, f"split {cfg.val_split!r}")
    if missing:
        _log(info, f"note: split {cfg.val_split!r} has no images of {len(missing)} of the {len(class_names)} "
                   f"training classes ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return eval_set


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
        load_state_dict_into(model, state, source=f"--initial-checkpoint {cfg.initial_checkpoint!r}")
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
        message = str(e)[:-len(f" (hint: {e.hint})")]
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
    eval_loader = create_loader(data.eval_set, data_config["input_size"], cfg.validation_batch_size or cfg.batch_size,
                                False, interpolation=data_config["interpolation"], **loader_kw)
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
    amp_dtype, scaler = _amp_setup(cfg, info.device)
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


def _amp_setup(cfg, device: torch.device):
    """(autocast dtype or None, GradScaler) for the flags; float16 scaling only happens on CUDA."""
    if not cfg.amp:
        return None, torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # CPU autocast is a bfloat16 feature; float16 needs a GPU
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
def _log(info: dist_utils.DistInfo, *msg) -> None:
    if info.is_primary:
        print(*msg, flush=True)


def _log_start(training: TrainingRun, data: TrainData, start_epoch: int) -> None:
    cfg, info = training.cfg, training.info
    n_params = sum(p.numel() for p in training.model.parameters())
    where = f"{info.world_size} processes, " if info.distributed else ""
    _log(info, f"train: {cfg.model} ({n_params / 1e6:.2f}M params) on {len(data.train_set)} images of "
               f"{cfg.dataset or cfg.data}, {plural(data.num_classes, 'class', 'classes')}, {training.loaders.img_size}px, "
               f"{where}{info.device}; epochs {start_epoch}..{training.opt.num_epochs - 1}, "
               f"lr {current_lr(training.opt.optimizer):.3g}, batch {cfg.batch_size}; output {training.out.folder}")


def _log_finish(training: TrainingRun, metrics: dict, started: float) -> None:
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
    print(f"{what}: eval top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% on {metrics['count']} held-out "
          f"images{unreadable} after {plural(training.opt.num_epochs, 'epoch')} in {elapsed:.0f}s{best}; "
          f"checkpoints in {training.out.folder}", flush=True)
