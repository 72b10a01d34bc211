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
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch import nn

from ..cli_common import check_device
from ..data.datasets import held_out_split, map_classes_by_name
from ..errors import SequencerError
from ..fileio import remove_stale_temporaries, temp_path, write_atomically
from ..models import create_model, get_model_entry
from ..models.loading import load_state_dict_into, read_checkpoint, extract_state_dict
from . import distributed as dist_utils
from .checkpoint import CHECKPOINT_VERSION, CheckpointManager, get_rng_state, resume_position, set_rng_state
from .resume import apply_resume_contract, experiment_folder, locate_resume, read_resume_checkpoint

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
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend, default inductor)")
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
                        ("--workers", cfg.workers), ("--checkpoint-hist", cfg.checkpoint_hist)):
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
        warnings.warn(f"--warmup-epochs {cfg.warmup_epochs} is not below --epochs {cfg.epochs}: the lr would never "
                      f"leave warmup; using --warmup-epochs {shortened}")
        cfg.warmup_epochs = shortened


# ----------------------------------------------------------------------------------------------- outputs
def _run_args(cfg) -> dict:
    """The run's settings as written to args.yaml and into checkpoints (without private bookkeeping)."""
    return _plain({k: v for k, v in vars(cfg).items() if not k.startswith("_")})


def _plain(value):
    """A YAML/weights_only-safe copy of an argument value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_summary(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_summary(path: Path, rows: list[dict]) -> None:
    """Rewrite summary.csv in full (atomically), so a kill never leaves a partial row."""
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomically(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot_summary(rows: list[dict], path: Path) -> None:
    """Loss, top-1 and lr per epoch as a PNG beside summary.csv."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name):
        return [float(r[name]) if r.get(name) not in (None, "", "nan") else float("nan") for r in rows]

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, col("train_loss"), "o-", label="train")
    axes[0].plot(epochs, col("eval_loss"), "o-", label="eval")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, col("eval_top1"), "o-", color="C2")
    axes[1].set_title("eval top-1 (%)")
    axes[2].plot(epochs, col("lr"), "o-", color="C3")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = temp_path(path)
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _holds_a_run(folder: Path) -> bool:
    """A folder with a checkpoint or a summary row of a run (a header-only summary.csv is not a run)."""
    if any((folder / name).exists() for name in ("last.pth.tar", "recovery.pth.tar")):
        return True
    return bool(read_summary(folder / "summary.csv"))


def _make_output_dir(cfg, info: dist_utils.DistInfo, model_name: str, img_size: int) -> Path:
    """Pick (rank 0) and create the experiment folder; every rank gets the same path.

    ``cfg._created_dirs`` lists the folders this call created (innermost first), so that a start that fails later
    can remove them again while they are empty.
    """
    folder = None
    if info.is_primary:
        root = Path(cfg.output or "./output/train")
        if cfg.experiment:
            folder = experiment_folder(cfg)
            if not cfg.resume and _holds_a_run(folder):
                raise SequencerError(f"experiment folder {str(folder)!r} already holds a run",
                                     hint="pass --resume auto to continue it, or another --experiment")
        elif cfg.resume and cfg.resume != "auto":
            folder = Path(cfg.resume).parent  # continue the resumed run's own folder (docs/training.md)
        else:
            stem = "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), model_name, str(img_size)])
            folder, n = root / stem, 1
            while folder.exists():
                folder, n = root / f"{stem}-{n}", n + 1
        created = [folder, *folder.parents]
        cfg._created_dirs = [str(f) for f in created[:next(i for i, f in enumerate(created) if f.exists())]]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
            remove_stale_temporaries(folder)  # of a run that was killed mid-write
        except OSError as e:
            _remove_if_empty(cfg)
            raise SequencerError(f"output folder {str(folder)!r} is not writable ({e.strerror or e})",
                                 hint="pass --output DIR somewhere you can write") from None
        folder = str(folder)
    return Path(dist_utils.broadcast_object(folder, info))


def _remove_if_empty(cfg) -> None:
    """Remove the folders this start created when a failure left them empty (no debris)."""
    for folder in getattr(cfg, "_created_dirs", None) or []:
        try:
            os.rmdir(folder)  # fails, as it should, when anything was written there
        except OSError:
            return


# ------------------------------------------------------------------------------------------ stop requests
class StopRequest:
    """SIGTERM/SIGINT set a flag; the training loop saves a recovery checkpoint at the next step and exits.

    A second SIGINT while stopping raises KeyboardInterrupt as usual (atomic writes keep files intact).
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: stopping at the next step with a recovery checkpoint",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- training
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


def _build_model(cfg, resume_ckpt: dict | None, init_ckpt_meta: dict | None, num_classes: int):
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


def _checkpoint_state(cfg, model, model_ema, optimizer, scheduler, scaler, class_names, data_config,
                      epoch: int, complete: bool, step: int, metric, rng_states) -> dict:
    state = {
        "version": CHECKPOINT_VERSION,
        "arch": model.model_name,
        "model_kwargs": _plain(model.model_kwargs),
        "class_names": list(class_names),
        "data_config": _plain(data_config),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "epoch_complete": complete,
        "step": step,
        "metric": metric,
        "args": _run_args(cfg),
        "rng_state": rng_states,
    }
    if model_ema is not None:
        state["state_dict_ema"] = model_ema.module.state_dict()
    return state


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


def _skipped_note(loader) -> str:
    """Unreadable training images of the epoch, for the end of its log line ("" when none)."""
    skipped = len(getattr(loader, "skipped", None) or [])
    return f"; skipped {skipped} unreadable training image{'s' if skipped != 1 else ''}" if skipped else ""


def _unreadable_note(loader) -> str:
    skipped = len(getattr(loader, "skipped", None) or [])
    return f" ({skipped} unreadable skipped)" if skipped else ""


def _current_lr(optimizer) -> float:
    return sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)


def _load_optimizer_state(optimizer, state: dict, cfg) -> None:
    """Load a resumed optimizer state; another optimizer kind's state is refused instead of failing later."""
    saved_keys = {k for g in state.get("param_groups", []) for k in g if k != "params"}
    own_keys = {k for g in optimizer.param_groups for k in g if k != "params"}
    if len(state.get("param_groups", [])) != len(optimizer.param_groups) or not own_keys <= saved_keys:
        raise SequencerError(f"--resume: the checkpoint's optimizer state is not one of --opt {cfg.opt}",
                             hint="pass the run's --opt, or --no-resume-opt to start a fresh optimizer")
    optimizer.load_state_dict(state)


def _restore_training_state(cfg, info, checkpoint, optimizer, scaler, scheduler, model_ema, updates_per_epoch: int,
                            random_seed) -> int:
    """Restore optimizer, scaler, EMA and RNG from ``checkpoint`` (if any); step the schedule to the start epoch.

    The schedule itself is rebuilt from the (possibly new) settings, never restored: a longer ``--epochs`` or a
    new ``--lr`` then continues from the current position instead of replaying the old length (which ends at
    ``--min-lr``). Only the plateau scheduler keeps state (its best metric and patience), which is restored.
    Returns the epoch to start at.
    """
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


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    check_config(cfg)
    try:
        with dist_utils.process_group(cfg.device) as info:
            return _train(cfg, info)
    except BaseException:
        _remove_if_empty(cfg)
        raise


def _log(info, *msg):
    if info.is_primary:
        print(*msg, flush=True)


def _train(cfg, info: dist_utils.DistInfo) -> int:
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed

    from ..data import create_dataset, create_loader, resolve_data_config
    from .evaluate import evaluate

    device = info.device
    t_start = time.time()
    random_seed(cfg.seed, info.rank)
    if cfg.input_size:
        cfg.in_chans, cfg.img_size = cfg.input_size[0], cfg.input_size[1]

    # ---- data and resume: everything is checked before a file or folder is written
    root = cfg.data
    dataset_kw = dict(class_map=cfg.class_map or None, download=cfg.dataset_download)
    train_set = create_dataset(cfg.dataset, root=root, split=cfg.train_split, is_training=True, **dataset_kw)
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
    if len(train_set) < cfg.batch_size * info.world_size:
        raise SequencerError(
            f"--batch-size {cfg.batch_size} is larger than the training split ({len(train_set)} images"
            f"{f' over {info.world_size} processes' if info.distributed else ''})",
            hint=f"use --batch-size {max(1, len(train_set) // info.world_size // 2 * 2)} or less")

    # ---- model
    init_meta = read_checkpoint(cfg.initial_checkpoint) if cfg.initial_checkpoint else None
    model = _build_model(cfg, resume_ckpt, init_meta if init_meta and init_meta.get("arch") else None, num_classes)
    if init_meta is not None and resume_ckpt is None:
        state = extract_state_dict(init_meta)
        if not state:
            raise SequencerError(f"--initial-checkpoint {cfg.initial_checkpoint!r} holds no weights")
        load_state_dict_into(model, state, source=f"--initial-checkpoint {cfg.initial_checkpoint!r}")
    if resume_ckpt is not None:
        load_state_dict_into(model, extract_state_dict(resume_ckpt, use_ema=False), source=f"--resume {resume_path!r}")
        num_classes = model.num_classes
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
    n_params = sum(p.numel() for p in model.parameters())

    data_config = resolve_data_config(
        dict(input_size=(model.in_chans, cfg.img_size, cfg.img_size), mean=cfg.mean, std=cfg.std,
             crop_pct=cfg.crop_pct, interpolation=cfg.interpolation or None), model)
    img_size = int(data_config["input_size"][-1])
    ckpt_data_config = dict(mean=list(data_config["mean"]), std=list(data_config["std"]),
                            crop_pct=float(data_config["crop_pct"]), interpolation=data_config["interpolation"],
                            img_size=img_size)

    # ---- optimisation
    _resolve_lr(cfg, info.world_size)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg))
    except (ValueError, AssertionError, KeyError) as e:
        raise SequencerError(f"--opt {cfg.opt}: {e}", hint="see timm.optim.list_optimizers()") from None
    amp_dtype, scaler = _amp_setup(cfg, device)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup,
                               device="cpu" if cfg.model_ema_force_cpu else None)

    loader_kw = dict(mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                     num_workers=cfg.workers, distributed=info.distributed, device=device, seed=cfg.seed)
    train_loader = create_loader(
        train_set, data_config["input_size"], cfg.batch_size, True,
        interpolation=cfg.train_interpolation, auto_augment=None if cfg.no_aug else cfg.aa,
        re_prob=0.0 if cfg.no_aug else cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        hflip=0.0 if cfg.no_aug else cfg.hflip, scale=[1.0, 1.0] if cfg.no_aug else cfg.scale,
        ratio=[1.0, 1.0] if cfg.no_aug else cfg.ratio, color_jitter=0.0 if cfg.no_aug else cfg.color_jitter,
        drop_last=True, **loader_kw)
    eval_loader = create_loader(eval_set, data_config["input_size"], cfg.validation_batch_size or cfg.batch_size,
                                False, interpolation=data_config["interpolation"], **loader_kw)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SequencerError(f"--batch-size {cfg.batch_size} leaves no full batch of training data")
    updates_per_epoch = (steps_per_epoch + cfg.grad_accum_steps - 1) // cfg.grad_accum_steps

    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(cfg, decreasing_metric=cfg.eval_metric == "loss"),
            updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise SequencerError(f"--sched {cfg.sched}: {e}") from None

    mixup_fn = None
    mixup_on = not cfg.no_aug and (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None)
    if mixup_on:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    if cfg.bce_loss:
        train_loss_fn = BinaryCrossEntropy(smoothing=0.0 if mixup_on else cfg.smoothing,
                                           target_threshold=cfg.bce_target_thresh)
    elif mixup_on:
        train_loss_fn = SoftTargetCrossEntropy()
    elif cfg.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device)

    # ---- resume state, then the output folder (nothing is written before this point)
    start_epoch = _restore_training_state(cfg, info, resume_ckpt, optimizer, scaler, scheduler, model_ema,
                                          updates_per_epoch, random_seed)
    if start_epoch >= num_epochs:
        _log(info, f"--resume {resume_path}: the run already finished its {num_epochs} epochs; nothing to do "
                   f"(pass a larger --epochs to extend it)")
        return 0
    output_dir = _make_output_dir(cfg, info, cfg.model, img_size)
    manager = CheckpointManager(output_dir, max_history=cfg.checkpoint_hist, decreasing=cfg.eval_metric == "loss")
    if resume_ckpt is not None and Path(resume_path).resolve().parent == output_dir.resolve():
        # best metric and history belong to this folder's files; a resume into a new folder starts its own
        manager.restore(resume_ckpt)
        manager.history = [(e, m) for e, m in manager.history if e < start_epoch]
    summary_path = output_dir / "summary.csv"
    rows = [r for r in read_summary(summary_path) if int(r["epoch"]) < start_epoch] if resume_ckpt else []
    if info.is_primary:
        args_yaml = yaml.safe_dump(_run_args(cfg), sort_keys=False)
        write_atomically(output_dir / "args.yaml", lambda tmp: Path(tmp).write_text(args_yaml))

    # ---- DDP / compile
    model_raw = model
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    if cfg.torchcompile:
        model = torch.compile(model, backend=cfg.torchcompile)
    eval_model = torch.compile(model_raw, backend=cfg.torchcompile) if cfg.torchcompile else model_raw

    where = f"{info.world_size} processes, " if info.distributed else ""
    _log(info, f"train: {cfg.model} ({n_params / 1e6:.2f}M params) on {len(train_set)} images of "
               f"{cfg.dataset or root}, {num_classes} classes, {img_size}px, {where}{device}; "
               f"epochs {start_epoch}..{num_epochs - 1}, lr {_current_lr(optimizer):.3g}, batch {cfg.batch_size}; "
               f"output {output_dir}")

    use_tqdm = info.is_primary and sys.stderr.isatty()
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    eval_metrics = None
    epoch = start_epoch
    with StopRequest() as stop:
        for epoch in range(start_epoch, num_epochs):
            # shuffling and augmentation seeds depend on the epoch only, so a resumed epoch sees the same batches
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            elif hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            if mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            t_epoch = time.time()
            model.train()
            loss_sum, loss_count, seen = 0.0, 0, 0
            last_idx = steps_per_epoch - 1
            last_accum = steps_per_epoch % cfg.grad_accum_steps or cfg.grad_accum_steps
            last_accum_start = steps_per_epoch - last_accum
            num_updates = epoch * updates_per_epoch
            optimizer.zero_grad(set_to_none=True)
            bar = None
            if use_tqdm:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{num_epochs - 1}", leave=False,
                           dynamic_ncols=True)
            for step, (images, targets) in enumerate(train_loader):
                accum = last_accum if step >= last_accum_start else cfg.grad_accum_steps
                need_update = step == last_idx or (step + 1) % cfg.grad_accum_steps == 0
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = model.no_sync if info.distributed and not need_update else contextlib.nullcontext
                with sync():
                    with autocast():
                        loss = train_loss_fn(model(images), targets)
                    loss_value = loss.item()
                    # all ranks agree before any backward, so a stop never leaves DDP waiting on a peer
                    stop_flag, bad_flag = dist_utils.all_reduce_max(
                        [float(stop.signum), float(not math.isfinite(loss_value))], info)
                    if bad_flag:
                        last = output_dir / "last.pth.tar"
                        kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished"
                        raise SequencerError(
                            f"loss is not finite ({loss_value}) at epoch {epoch} step {step}; training stopped "
                            f"before that update and {kept}",
                            hint="lower --lr, add --clip-grad, or use --amp-dtype bfloat16")
                    if stop_flag:
                        stop.signum = stop.signum or int(stop_flag)
                        return _save_recovery_and_exit(cfg, info, manager, model_raw, model_ema, optimizer,
                                                       scheduler, scaler, class_names, ckpt_data_config, epoch,
                                                       step, stop.signum, bar)
                    scaler.scale(loss / accum).backward()
                if need_update:
                    if cfg.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        dispatch_clip_grad(model_raw.parameters(), value=cfg.clip_grad, mode=cfg.clip_mode)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    num_updates += 1
                    if model_ema is not None:
                        model_ema.update(model_raw, step=num_updates)
                    if scheduler is not None:
                        scheduler.step_update(num_updates=num_updates, metric=loss_sum / max(loss_count, 1))
                loss_sum += loss_value * images.shape[0]
                loss_count += images.shape[0]
                seen += images.shape[0]
                lr = sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)
                rate = seen * info.world_size / max(time.time() - t_epoch, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                elif info.is_primary and (step % cfg.log_interval == 0 or step == last_idx):
                    print(f"train: epoch {epoch} [{step + 1:>4d}/{steps_per_epoch} "
                          f"{100 * (step + 1) / steps_per_epoch:3.0f}%] loss {loss_value:.4f} "
                          f"({loss_sum / loss_count:.4f}) lr {lr:.2e} {rate:.0f} img/s", flush=True)
            if bar is not None:
                bar.close()
            train_loss = dist_utils.all_reduce_mean([loss_sum / max(loss_count, 1)], info)[0]

            eval_metrics = evaluate(eval_model, eval_loader, device, amp_dtype=amp_dtype,
                                    distributed=info.distributed)
            raw_top1 = eval_metrics["top1"]
            # an EMA kept on the CPU (--model-ema-force-cpu) while training on a GPU is not evaluated, as in timm:
            # the batches and the ranks' reductions live on the GPU
            ema_evaluated = model_ema is not None and next(model_ema.module.parameters()).device == device
            if ema_evaluated:
                eval_metrics = evaluate(model_ema.module, eval_loader, device, amp_dtype=amp_dtype,
                                        distributed=info.distributed)
            metric = float(eval_metrics[cfg.eval_metric])
            if scheduler is not None:
                scheduler.step(epoch + 1, metric)
            seconds = time.time() - t_epoch
            rows.append(dict(epoch=epoch, train_loss=f"{train_loss:.6f}", eval_loss=f"{eval_metrics['loss']:.6f}",
                             eval_top1=f"{eval_metrics['top1']:.4f}", eval_top5=f"{eval_metrics['top5']:.4f}",
                             lr=f"{lr:.6e}", epoch_seconds=f"{seconds:.2f}"))
            rng_states = dist_utils.all_gather_object(get_rng_state(), info)
            if info.is_primary:
                # summary first: a kill between the two writes re-runs this epoch and rewrites its row once
                write_summary(summary_path, rows)
                state = _checkpoint_state(cfg, model_raw, model_ema, optimizer, scheduler, scaler, class_names,
                                          ckpt_data_config, epoch, True, 0, metric, rng_states)
                is_best = manager.save_epoch(state, epoch, metric if math.isfinite(train_loss) else None)
                try:
                    plot_summary(rows, output_dir / "summary.png")
                except Exception as e:  # a plotting problem must never stop training
                    warnings.warn(f"could not draw summary.png: {e}")
                ema_note = f" (raw model {raw_top1:.2f})" if ema_evaluated else ""
                print(f"epoch {epoch}: train_loss {train_loss:.4f} eval_loss {eval_metrics['loss']:.4f} "
                      f"top1 {eval_metrics['top1']:.2f}{ema_note} top5 {eval_metrics['top5']:.2f} "
                      f"lr {lr:.2e} {seconds:.1f}s{' *best*' if is_best else ''}{_skipped_note(train_loader)}",
                      flush=True)
            if stop.signum:  # signal arrived during evaluation: the epoch is saved, stop here
                _log(info, f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch}; resume with "
                           f"--resume {output_dir / 'last.pth.tar'}")
                return 128 + stop.signum
    if info.is_primary and eval_metrics is not None:
        best = (f"; best {cfg.eval_metric} {manager.best_metric:.2f} at epoch {manager.best_epoch}"
                if manager.best_metric is not None else "")
        what = "digits demo" if cfg.dataset == "digits" else "done"
        print(f"{what}: eval top-1 {eval_metrics['top1']:.2f}% top-5 {eval_metrics['top5']:.2f}% on "
              f"{eval_metrics['count']} held-out images{_unreadable_note(eval_loader)} after {num_epochs} epochs in "
              f"{time.time() - t_start:.0f}s{best}; checkpoints in {output_dir}", flush=True)
    return 0


def _save_recovery_and_exit(cfg, info, manager, model, model_ema, optimizer, scheduler, scaler, class_names,
                            data_config, epoch, step, signum, bar) -> int:
    if bar is not None:
        bar.close()
    rng_states = dist_utils.all_gather_object(get_rng_state(), info)
    if info.is_primary:
        state = _checkpoint_state(cfg, model, model_ema, optimizer, scheduler, scaler, class_names, data_config,
                                  epoch, False, step, None, rng_states)
        path = manager.save_recovery(state)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        print(f"stopped by {name} at epoch {epoch} step {step}; recovery checkpoint {path} (the epoch re-runs "
              f"on resume: --resume {path} or --resume auto)", file=sys.stderr, flush=True)
    dist_utils.barrier(info)
    return 128 + signum
