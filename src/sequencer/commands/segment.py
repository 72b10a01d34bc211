"""`sequencer segment train | validate | predict`: semantic segmentation (UperNet or semantic FPN on a Sequencer
backbone) on Pascal VOC or ADE20K folders. The work is :mod:`sequencer.engine.segmentation`'s and
:mod:`sequencer.engine.segmentation_eval`'s; see docs/segmentation.md for the recipes.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..choices import EVAL_MODES, HEADS
from ..data.class_folders import find_images
from ..engine.segmentation_config import SegmentConfig
from .common import (KeyValues, add_torchcompile_argument, add_workers_argument, check_device, check_results_file,
                     check_workers, data_workers, failure_reported_to_launcher, key_value, positive_int,
                     speaks_for_the_launch)

_DEFAULTS = SegmentConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_train(sub.add_parser("train", help="train a segmenter (torchrun for DDP)",
                              description="train a segmenter; under torchrun each process trains on its share"))
    _add_validate(sub.add_parser("validate", help="mIoU, per-class IoU and pixel accuracy of a checkpoint"))
    _add_predict(sub.add_parser("predict", help="write palette PNG masks (and overlays) for images"))


def _default(name: str) -> str:
    return f" (default: {getattr(_DEFAULTS, name)})"


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="dataset folder (Pascal VOC or ADE20K layout)")
    g = p.add_argument_group("data")
    g.add_argument("--layout", choices=("voc", "ade20k"), help="dataset layout (default: found from the folders)")
    g.add_argument("--train-split", default=_DEFAULTS.train_split, help="training split" + _default("train_split"))
    g.add_argument("--val-split", default=_DEFAULTS.val_split, help="validation split" + _default("val_split"))
    g.add_argument("--num-classes", type=positive_int, help="classes (default: 21 for VOC, 150 for ADE20K)")
    g.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="label 0 is 'other' and ignored, k becomes k-1 (default: on for ADE20K only)")
    # the architecture flags default to "not given", so that a resume takes its checkpoint's (engine/segmentation.py)
    g = p.add_argument_group("model", "a resume builds its checkpoint's model: leave these out (or give its values)")
    g.add_argument("--backbone", help="Sequencer model name" + _default("backbone"))
    g.add_argument("--backbone-kwargs", nargs="*", type=key_value, action=KeyValues,
                   metavar="KEY=VALUE", help="backbone architecture overrides, e.g. layers='(1,1)'")
    g.add_argument("--backbone-checkpoint", default="", metavar="PATH",
                   help="ImageNet classification weights for the backbone (ours, timm's or the release)")
    g.add_argument("--pretrained", action="store_true", help="start the backbone from the released weights")
    g.add_argument("--head", choices=HEADS, help="decode head" + _default("head"))
    g.add_argument("--aux-head", action=argparse.BooleanOptionalAction, default=None,
                   help="train with the auxiliary FCN head on the stride-16 map (loss weight 0.4; not used in "
                        "evaluation), as mmsegmentation's UperNet configs (default: on for upernet only)")
    g.add_argument("--head-channels", type=positive_int, help="head width" + _default("head_channels"))
    g.add_argument("--out-channels", type=positive_int,
                   help="channels of each backbone pyramid level" + _default("out_channels"))
    g = p.add_argument_group("schedule")
    length = g.add_mutually_exclusive_group(required=True)
    length.add_argument("--iters", type=positive_int, help="length in updates (the peers' 160k)")
    length.add_argument("--epochs", type=positive_int, help="length in passes over the training split")
    g.add_argument("--img-size", type=positive_int, default=_DEFAULTS.img_size,
                   help="training crop (square)" + _default("img_size"))
    g.add_argument("-b", "--batch-size", type=positive_int, default=_DEFAULTS.batch_size,
                   help="batch size per process" + _default("batch_size"))
    g.add_argument("--opt", default=_DEFAULTS.opt, help="timm optimizer" + _default("opt"))
    g.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate" + _default("lr"))
    g.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay,
                   help="weight decay" + _default("weight_decay"))
    g.add_argument("--warmup-iters", type=int, default=_DEFAULTS.warmup_iters,
                   help="linear warmup updates" + _default("warmup_iters"))
    g.add_argument("--poly-power", type=float, default=_DEFAULTS.poly_power,
                   help="poly decay power" + _default("poly_power"))
    g.add_argument("--min-lr", type=float, default=_DEFAULTS.min_lr, help="final learning rate" + _default("min_lr"))
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=_DEFAULTS.amp_dtype,
                   help="autocast dtype (float16 needs a GPU; the CPU uses bfloat16)")
    add_torchcompile_argument(g)
    g.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed" + _default("seed"))
    g = p.add_argument_group("evaluation")
    _add_eval_flags(g)
    g.add_argument("--eval-size", type=positive_int,
                   help="evaluation short side, the long side at most 4x (default: --img-size)")
    g.add_argument("--eval-interval", type=positive_int, default=_DEFAULTS.eval_interval,
                   help="evaluate every N epochs (and after the last)" + _default("eval_interval"))
    g.add_argument("--dist-bn", choices=("reduce", "broadcast"), default=_DEFAULTS.dist_bn,
                   help="BatchNorm statistics before each evaluation under DDP: the ranks' mean (reduce) or rank "
                        "0's, as `sequencer train --dist-bn`" + _default("dist_bn"))
    g = p.add_argument_group("run")
    g.add_argument("--output", default=_DEFAULTS.output, help="root of experiment folders" + _default("output"))
    g.add_argument("--experiment", default="", help="experiment folder name (default: date-head-backbone-size)")
    g.add_argument("--resume", default="", metavar="PATH|auto",
                   help="continue a run from its checkpoint; auto: the experiment's recovery/last one if any")
    g.add_argument("--checkpoint-hist", type=int, default=_DEFAULTS.checkpoint_hist,
                   help="best checkpoints kept" + _default("checkpoint_hist"))
    g.add_argument("--log-interval", type=positive_int, default=_DEFAULTS.log_interval,
                   help="log every N steps" + _default("log_interval"))
    _add_run_flags(g, training=True)


def _add_eval_flags(g) -> None:
    g.add_argument("--eval-mode", choices=EVAL_MODES, default=None,
                   help="whole image, or sliding windows of the crop size (default: whole; a checkpoint's own)")
    g.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (default: 2/3 crop)")


def _add_run_flags(g, training: bool) -> None:
    if training:
        g.add_argument("-j", "--workers", type=int, default=_DEFAULTS.workers,
                       help="data loading processes" + _default("workers"))
    else:
        add_workers_argument(g)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def _add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="dataset folder (the layout the checkpoint was trained on)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a `segment train` checkpoint")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    _add_eval_flags(p)
    p.add_argument("--results-file", default="", metavar="FILE.json", help="also write the metrics here")
    _add_run_flags(p, training=False)


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a `segment train` checkpoint")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for <name>.png masks")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.jpg: the classes over the image")
    _add_eval_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    with failure_reported_to_launcher():
        check_device(args.device)
        if args.action == "train":
            return _train(args)
        if args.action == "validate":
            return _validate(args)
        return _predict(args)


def _train(args) -> int:
    from ..engine.segmentation import run_segmentation

    check_workers(args.workers)
    names = {f.name for f in dataclasses.fields(SegmentConfig)}
    settings = {k: v for k, v in vars(args).items() if k in names and v is not None}  # None: SegmentConfig's default
    result = run_segmentation(SegmentConfig(**settings))
    if result.best_miou is not None and speaks_for_the_launch():
        print(f"best mIoU {result.best_miou:.4f} at epoch {result.best_epoch}: {result.checkpoint}")
    return result.exit_code


def _validate(args) -> int:
    from ..engine.segmentation_eval import validate_segmenter

    workers = data_workers(args.workers)
    check_results_file(args.results_file)
    m = validate_segmenter(args.checkpoint, args.data, args.split, eval_mode=args.eval_mode, stride=args.stride,
                           workers=workers, device=args.device, results_file=args.results_file)
    if not speaks_for_the_launch():
        return 0
    print(f"mIoU {m.miou:.4f} pixel acc {m.pixel_acc:.4f} mAcc {m.macc:.4f} on {m.images} images ({m.eval_mode})")
    for name, iou in m.per_class_iou.items():
        print(f"  {name}: IoU {iou:.4f}")
    return 0


def _predict(args) -> int:
    from ..engine.segmentation_eval import predict_files

    files = find_images(args.images)
    written = predict_files(args.checkpoint, files, args.output, overlay=args.overlay, eval_mode=args.eval_mode,
                            stride=args.stride, device=args.device)
    print(f"wrote {len(written)} mask{'s' if len(written) != 1 else ''}"
          f"{' and overlays' if args.overlay else ''} to {args.output}")
    return 0
