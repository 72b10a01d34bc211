"""`sequencer validate`: top-1/top-5 accuracy, loss and throughput of a model on a dataset split
(:func:`sequencer.validate` underneath).

The paper's ``python validate.py /path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp`` is
``sequencer validate /path/to/imagenet --model sequencer2d_s -b 16 --input-size 3 224 224 --amp``; as in timm, a
model name without ``--checkpoint`` evaluates its released weights. With no DATA it
evaluates the held-out split the checkpoint records it was trained on (the digits for a digits run), and says in
one line that DATA is needed where the checkpoint records none or that data is gone. A checkpoint written by ``sequencer train`` carries its model name,
class names and preprocessing, and is evaluated with the same loader and loop as training's eval phase, so it
reproduces the eval_top1 training logged. Under ``torchrun`` each process evaluates a disjoint share. ``--onnx PATH``
evaluates an exported ONNX file (fp32 or int8) under onnxruntime with the preprocessing and class names it stores.
"""
from __future__ import annotations

import argparse
import csv
import json

from ..choices import INTERPOLATIONS
from ..errors import SequencerError
from ..fileio import write_atomically
from .common import (DEFAULT_WORKERS, add_dataset_arguments, add_fast_argument, add_model_args, add_onnx_argument,
                     add_torchcompile_argument, add_workers_argument, check_device, check_fast_flags,
                     check_not_an_input, check_results_file, check_workers, failure_reported_to_launcher,
                     load_model_or_onnx, positive_int, speaks_for_the_launch)

RESULT_FORMATS = (".json", ".csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="dataset folder (DATA/SPLIT/CLASS/IMAGE), .tar, or torchvision root "
                             "(default: the data the checkpoint was trained on)")
    g = parser.add_argument_group("data")
    add_dataset_arguments(g)
    g.add_argument("--split", default=None,
                   help="split to evaluate (val/validation/test/train...; always wins; default: where DATA is the "
                        "checkpoint's run's DATA, the split the run evaluated on (for a --val-fraction run, its "
                        "held-out images), so its logged top-1 is reproduced; else DATA's validation split, its test "
                        "split where it has train/ and test/ only). A warning names the run's training split")
    g.add_argument("--class-map", default="", metavar="FILE", help="class names, one per line (or 'name index')")
    g.add_argument("-b", "--batch-size", type=positive_int, default=256, metavar="N")
    add_workers_argument(g, default=f"0 for digits, else {DEFAULT_WORKERS}")  # the engine's choice, not data_workers
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
    add_fast_argument(g)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_torchcompile_argument(g)
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


def check_onnx_flags(args: argparse.Namespace) -> None:
    """Flags about running the PyTorch model, refused with ``--onnx`` (onnxruntime runs the file as exported)."""
    if args.onnx and (args.amp or args.amp_dtype):
        raise SequencerError("--amp does not apply to --onnx: the file runs in the precision it was exported in")
    if args.onnx and args.torchcompile:
        raise SequencerError("--torchcompile does not apply to --onnx: onnxruntime runs the file")
    check_fast_flags(args)
    if args.fast and (args.amp or args.amp_dtype):
        raise SequencerError("--fast picks the precision itself: drop --amp/--amp-dtype")


def run(args: argparse.Namespace) -> int:
    check_results_file(args.results_file, RESULT_FORMATS)
    check_not_an_input("--results-file", args.results_file, [args.class_map] if args.class_map else [],
                       "the --class-map file")
    check_device(args.device)
    check_workers(args.workers)
    check_onnx_flags(args)
    from ..engine.validation import validate
    from ..tools.optimize import optimize_for_inference

    with failure_reported_to_launcher():
        results = validate(
            args.checkpoint, args.data, model=args.model, pretrained=args.pretrained, dataset=args.dataset,
            split=args.split, class_map=args.class_map, dataset_download=args.dataset_download,
            batch_size=args.batch_size, workers=args.workers, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
            interpolation=args.interpolation, num_classes=args.num_classes, img_size=args.img_size,
            input_size=args.input_size, use_ema=args.use_ema, amp=args.amp, amp_dtype=args.amp_dtype,
            device=args.device, torchcompile=args.torchcompile,
            prepare=(lambda model: optimize_for_inference(model, "auto")) if args.fast else None,
            load=(lambda device: load_model_or_onnx(args, device)) if args.onnx else None).as_dict()
    if args.onnx:  # the file's path goes after the checkpoint entry
        results = {"model": results.pop("model"), "checkpoint": results.pop("checkpoint"), "onnx": args.onnx,
                   **results}
    if args.results_file and speaks_for_the_launch():
        write_results(args.results_file, results)
        print(f"results written to {args.results_file}")
    return 0
