"""`sequencer validate`: top-1/top-5 accuracy, loss and throughput of a model on a dataset split.

The paper's ``python validate.py /path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp`` is
``sequencer validate /path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp``; as in timm, a
model name without ``--checkpoint`` evaluates its released weights. With no DATA it
validates on the embedded digits val split. A checkpoint written by ``sequencer train`` carries its model name,
class names and preprocessing, and is evaluated with the same loader and loop as training's eval phase, so it
reproduces the eval_top1 training logged. Under ``torchrun`` each process evaluates a disjoint share. ``--onnx PATH``
evaluates an exported ONNX file (fp32 or int8) under onnxruntime with the preprocessing and class names it stores.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from ..cli_common import (add_model_args, check_device, check_input_size, check_results_file, check_workers,
                          label_with_model_classes, load_model_from_args, positive_int)
from ..data import create_dataset, create_loader, resolve_data_config
from ..data.datasets import held_out_split
from ..data.loader import INTERPOLATIONS
from ..errors import SequencerError
from ..fileio import write_atomically
from ..models import get_model_entry
from ..models.kernels.onednn import native_dtype
from ..tools.onnx_runtime import add_onnx_argument, load_model_or_onnx
from ..tools.optimize import FAST_HELP, optimize_for_inference
from .distributed import process_group
from .evaluate import evaluate

RESULT_FORMATS = (".json", ".csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="dataset folder (DATA/SPLIT/CLASS/IMAGE), .tar, or torchvision root "
                             "(default: the embedded digits)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="", metavar="NAME",
                   help="'' image folders or tar, 'digits', or torch/NAME (torch/cifar10, torch/flowers102, ...)")
    g.add_argument("--split", default="validation", help="split to evaluate (val/validation/test/train...)")
    g.add_argument("--class-map", default="", metavar="FILE", help="class names, one per line (or 'name index')")
    g.add_argument("--dataset-download", action="store_true", help="let torchvision datasets download themselves")
    g.add_argument("-b", "--batch-size", type=positive_int, default=256, metavar="N")
    g.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="data loading processes (default: 0 for digits, else min(4, CPUs))")
    g.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the model's)")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD")
    g.add_argument("--interpolation", default=None, choices=[i for i in INTERPOLATIONS if i != "random"])
    add_model_args(parser)
    add_onnx_argument(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--amp", "--native-amp", dest="amp", action="store_true",
                   help="mixed precision (float16 on CUDA, bfloat16 on CPU unless --amp-dtype)")
    g.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"), help="autocast dtype (implies --amp)")
    g.add_argument("--fast", action="store_true", help=FAST_HELP)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--results-file", default="", metavar="FILE", help="write the results as .json or .csv")


def write_results(path: str, results: dict) -> None:
    """Write ``results`` atomically as JSON (an object) or CSV (a header row and one value row)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            if path.lower().endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=list(results))
                writer.writeheader()
                writer.writerow(results)
            else:
                json.dump(results, f, indent=2)
                f.write("\n")

    write_atomically(path, write, what="--results-file")


def run(args: argparse.Namespace) -> int:
    check_results_file(args.results_file, RESULT_FORMATS)
    dataset_name = args.dataset or ("" if args.data else "digits")
    check_device(args.device)
    check_workers(args.workers)
    with process_group(args.device) as dist_info:
        return _run(args, dataset_name, dist_info)


def _run(args, dataset_name: str, dist_info) -> int:
    device = dist_info.device
    # the data first: a missing folder should not wait for (or download) the model's weights
    if not dataset_name:  # as train: a folder with only train/ and test/ is evaluated on test/
        found = held_out_split(args.data, args.split)
        if found != args.split and dist_info.is_primary:
            print(f"note: {args.data} has no {args.split!r} split: evaluating on {found!r}")
        args.split = found
    dataset = create_dataset(dataset_name, root=args.data, split=args.split, class_map=args.class_map or None,
                             download=args.dataset_download)
    if args.model and not args.checkpoint and not args.pretrained:
        # as timm's validate.py: a model name alone means its released weights (random ones prove nothing)
        if get_model_entry(args.model).pretrained_cfg.get("url"):
            args.pretrained = True
        elif dist_info.is_primary:
            print(f"note: {args.model} has no released weights and no --checkpoint was given: "
                  f"evaluating randomly initialised weights")
    if args.onnx and (args.amp or args.amp_dtype):
        raise SequencerError("--amp does not apply to --onnx: the file runs in the precision it was exported in")
    if args.fast and (args.onnx or args.amp or args.amp_dtype):
        raise SequencerError("--fast picks the precision itself: drop --amp/--amp-dtype (and it does not apply to "
                             "--onnx)")
    loaded = load_model_or_onnx(args, device) if args.onnx else load_model_from_args(args, device)
    # the checkpoint's preprocessing (what training evaluated with), then explicit flags
    overrides = dict(mean=args.mean, std=args.std, crop_pct=args.crop_pct, interpolation=args.interpolation)
    config = dict(loaded.data_config, input_size=loaded.input_size)
    config.update({k: v for k, v in overrides.items() if v is not None})
    config = resolve_data_config(config, loaded.model)
    height, width = config["input_size"][1:]
    check_input_size(loaded, height, width)
    label_with_model_classes(dataset, loaded)
    workers = args.workers
    if workers is None:
        workers = 0 if dataset_name == "digits" else min(4, os.cpu_count() or 1)
    loader = create_loader(dataset, config["input_size"], args.batch_size, is_training=False,
                           mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"],
                           interpolation=config["interpolation"], num_workers=workers,
                           distributed=dist_info.distributed, device=device)
    amp_dtype = None
    if args.amp or args.amp_dtype:
        amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[
            args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")]
        amp_dtype = native_dtype(amp_dtype, device, "--amp-dtype bfloat16")
        amp_dtype = None if amp_dtype == torch.float32 else amp_dtype
    if args.fast:
        loaded.model = optimize_for_inference(loaded.model, "auto")
    metrics = evaluate(loaded.model, loader, device, amp_dtype=amp_dtype, distributed=dist_info.distributed)

    results = dict(
        model=loaded.name,
        checkpoint=args.checkpoint or ("pretrained" if args.pretrained else ""),
        **({"onnx": args.onnx} if args.onnx else {}),
        dataset=dataset.description,
        top1=round(metrics["top1"], 3), top1_err=round(100 - metrics["top1"], 3),
        top5=round(metrics["top5"], 3), top5_err=round(100 - metrics["top5"], 3),
        loss=round(metrics["loss"], 5),
        images_per_sec=round(metrics["images_per_sec"], 1),
        param_count=loaded.num_params,
        img_size=config["input_size"][-1],
        crop_pct=config["crop_pct"],
        interpolation=config["interpolation"],
        count=metrics["count"],
        unreadable=len(loader.skipped),
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "",
        device=str(device),
    )
    if dist_info.is_primary:
        print(f" * Acc@1 {results['top1']:.3f} ({results['top1_err']:.3f}) "
              f"Acc@5 {results['top5']:.3f} ({results['top5_err']:.3f})")
        print(f"model {results['model']} ({results['param_count'] / 1e6:.2f}M params) at "
              f"{results['img_size']}px on {results['dataset']}: {results['count']} images, "
              f"loss {results['loss']:.4f}, {results['images_per_sec']:.1f} images/s"
              + (f", {results['unreadable']} unreadable skipped" if results["unreadable"] else ""))
        if args.results_file:
            write_results(args.results_file, results)
            print(f"results written to {args.results_file}")
    return 0
