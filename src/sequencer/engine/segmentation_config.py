"""A ``segment train`` run's settings (:class:`SegmentConfig`), what it leaves (:class:`SegmentResult`), and the
check of the settings before anything runs (:func:`check_segment_config`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..choices import EVAL_MODES, HEADS
from ..errors import SequencerError
from .config import records_given


@records_given
@dataclass
class SegmentConfig:
    """One ``segment train`` run's settings; each field is the flag of that name (``--img-size`` is ``img_size``).
    The defaults are the ADE20K UperNet recipe's (docs/segmentation.md) except the length, which has none.

    As with ``TrainConfig``, :func:`train_segmenter` takes only the fields set (passed to the constructor or
    assigned afterwards, other than None) and never changes the object it is given."""
    data: str = ""
    layout: str = ""  # "" = detected: voc or ade20k
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # default: the layout's (21 / 150)
    reduce_zero_label: bool | None = None  # default: on for ADE20K
    backbone: str = "sequencer2d_s"
    backbone_kwargs: dict = field(default_factory=dict)
    backbone_checkpoint: str = ""
    pretrained: bool = False
    head: str = "upernet"
    aux_head: bool | None = None  # the training-only auxiliary FCN head; default: on for upernet
    head_channels: int = 512
    out_channels: int = 256
    img_size: int = 512  # the training crop
    eval_size: int | None = None  # evaluation short side (the long side at most 4x); default img_size
    eval_mode: str = "whole"
    stride: int | None = None  # sliding-window stride; default 2/3 of the crop
    batch_size: int = 16  # per process
    epochs: int | None = None
    iters: int | None = None
    opt: str = "adamw"
    lr: float = 6e-5
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6  # the warmup starts at lr * warmup_ratio
    poly_power: float = 1.0
    min_lr: float = 0.0
    clip_grad: float | None = None
    eval_interval: int = 1  # epochs
    dist_bn: str = "reduce"  # BatchNorm statistics before each evaluation under DDP: the ranks' mean, or rank 0's
    amp: bool = False
    amp_dtype: str = "float16"
    torchcompile: str | None = None  # a torch.compile backend for the training steps; None or "": eager
    seed: int = 42
    workers: int = 4
    device: str | None = None
    output: str = "./output/segment"
    experiment: str = ""
    resume: str = ""
    checkpoint_hist: int = 3
    log_interval: int = 50
    eval_metric: str = "miou"  # the best checkpoint's metric: mIoU only (the engine's checkpoint manager reads it)

    @property
    def model(self) -> str:
        """The experiment folder's name part (outputs.make_output_dir)."""
        return f"{self.head}-{self.backbone}"


@dataclass
class SegmentResult:
    """What a run left: the best mIoU (percent) and its epoch, the path of ``model_best.pth.tar``, the experiment
    folder, the summary rows (one dict of numbers per epoch, summary.csv's columns: ``epoch`` (int),
    ``train_loss``, ``eval_miou``, ``eval_pixel_acc``, ``eval_macc``, ``iou_<class>`` per class, ``lr``,
    ``epoch_seconds``; the eval columns are nan on epochs not evaluated, a class's IoU is nan where it has none),
    whether a signal (SIGTERM, or SIGINT under the command) stopped the run early (with epochs left to resume: one
    after the last epoch's training steps leaves the run finished, not interrupted), and the command's exit status
    (0, or 128 + signal, also for a run that a signal ended once finished). Before any evaluation ``best_miou``, ``best_epoch`` and ``checkpoint`` are None."""
    best_miou: float | None
    best_epoch: int | None
    checkpoint: Path | None
    output_dir: Path | None
    summary: list[dict] = field(default_factory=list)
    exit_code: int = 0
    interrupted: bool = False


def check_segment_config(cfg: SegmentConfig) -> None:
    """SequencerError (one line naming the setting, `` `lr=0` ``) for settings that cannot work, before anything
    runs."""
    from ..models import get_model_entry  # here, not above: SegmentConfig is imported by the command line's tables
    from .inference import resolve_device
    from .library_flags import check_compile
    from .segmentation_eval import check_stride

    def bad(name, value, why):
        raise SequencerError(f"`{name}={value}`: {why}")

    if not cfg.data:
        raise SequencerError("no dataset folder given", hint="give `data`, the dataset folder")
    if (cfg.epochs is None) == (cfg.iters is None):
        raise SequencerError("give the run's length as `iters=N` (updates) or `epochs=N`, one of them")
    for name in ("epochs", "iters", "img_size", "batch_size", "eval_interval", "head_channels", "out_channels",
                 "log_interval", "eval_size", "stride"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            bad(name, getattr(cfg, name), "must be at least 1")
    for name in ("warmup_iters", "workers", "checkpoint_hist"):
        if getattr(cfg, name) < 0:
            bad(name, getattr(cfg, name), "must not be negative")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr", cfg.lr, "must be a positive number")
    _check_schedule_numbers(cfg, bad)
    if cfg.head not in HEADS:
        bad("head", cfg.head, f"use one of {', '.join(HEADS)}")
    if cfg.eval_mode not in EVAL_MODES:
        bad("eval_mode", cfg.eval_mode, f"use one of {', '.join(EVAL_MODES)}")
    check_stride(cfg.stride, cfg.img_size)
    if cfg.eval_metric != "miou":  # the checkpoint manager reads it: "loss" kept the lowest mIoU as the best
        bad("eval_metric", cfg.eval_metric, "segment train keeps the best checkpoint by mIoU; leave it unset")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        bad("amp_dtype", cfg.amp_dtype, "use float16 or bfloat16")
    check_compile(cfg.torchcompile, None)
    if cfg.dist_bn not in ("reduce", "broadcast"):
        bad("dist_bn", cfg.dist_bn, "use reduce (the ranks' mean BatchNorm statistics) or broadcast (rank 0's)")
    if cfg.resume == "auto" and not cfg.experiment:
        raise SequencerError("`resume=auto` needs `experiment=NAME` (the folder it looks in)")
    get_model_entry(cfg.backbone)
    resolve_device(cfg.device)


def _check_schedule_numbers(cfg: SegmentConfig, bad) -> None:
    """The optimiser's and the poly schedule's other numbers: a NaN or an out-of-range value would train on (a
    negative weight decay grows the weights, a min_lr above lr makes the "decay" climb) with no error."""
    if not (0 <= cfg.min_lr < cfg.lr):
        bad("min_lr", cfg.min_lr, f"must be at least 0 and below lr ({cfg.lr:g})")
    if not (cfg.poly_power > 0 and math.isfinite(cfg.poly_power)):
        bad("poly_power", cfg.poly_power, "must be a positive number")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        bad("weight_decay", cfg.weight_decay, "must be a number, at least 0")
    if not (0 <= cfg.warmup_ratio <= 1):
        bad("warmup_ratio", cfg.warmup_ratio, "must be between 0 and 1 (the warmup starts at lr * warmup_ratio)")
    if cfg.clip_grad is not None and not (cfg.clip_grad > 0 and math.isfinite(cfg.clip_grad)):
        bad("clip_grad", cfg.clip_grad, "must be a positive number")
