"""`sequencer predict`: top-k classes and probabilities for image files and folders.

Labels are the checkpoint's own class names, ImageNet's readable names for a 1000-class model without them, else
the class index. ``--onnx PATH`` classifies with an exported ONNX file (fp32 or int8) under onnxruntime instead,
with the preprocessing and class names stored in the file. Folders are searched recursively for image files. An unreadable image is reported on stderr
(naming the file) and skipped; the command then exits with status 1 after classifying the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli_common import add_model_args, positive_int, warn_if_random_weights
from ..data import create_transform, load_image
from ..data.datasets import IMAGE_EXTENSIONS, READ_ERRORS
from ..errors import SequencerError
from .onnx_runtime import add_onnx_argument, load_model_or_onnx


def find_images(paths: list[str]) -> list[Path]:
    """The files named plus the image files under the folders named (recursively, sorted); duplicates dropped.

    Raises SequencerError for a path that does not exist or when no image is found at all.
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file():
            found[p] = None
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    found[f] = None
        else:
            raise SequencerError(f"{str(p)!r} does not exist")
    if not found:
        raise SequencerError(f"no image files found in {', '.join(map(repr, paths))}",
                             hint=f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return list(found)


def resolve_device(name: str | None) -> torch.device:
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SequencerError(f"--device {name!r} is not a device", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SequencerError(f"--device {name}: CUDA is not available", hint="use --device cpu")
    return device


def check_input_size(loaded, height: int, width: int) -> None:
    """SequencerError when the model cannot take a ``height`` x ``width`` input."""
    check = getattr(loaded.model, "check_input_size", None)
    if check is not None:
        try:
            check(height, width)
        except ValueError as e:
            raise SequencerError(f"model {loaded.name!r}: {e}",
                                 hint=f"use a multiple of {getattr(loaded.model, 'reduction', '?')}") from None


def eval_transform(loaded, input_size=None):
    """The model's eval preprocessing (resize to size/crop_pct, centre crop, normalise) as a PIL -> tensor callable."""
    cfg = loaded.data_config
    return create_transform(tuple(input_size or loaded.input_size), False, mean=cfg["mean"], std=cfg["std"],
                            crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])


def read_images(files: list[Path], transform) -> tuple[list[Path], list[torch.Tensor], list[Path]]:
    """(readable files, their tensors (C, H, W), unreadable files); each unreadable one is warned about on stderr."""
    ok, tensors, failed = [], [], []
    for f in files:
        try:
            tensors.append(transform(load_image(f)))
            ok.append(f)
        except READ_ERRORS as e:
            print(f"warning: skipped unreadable image {f} ({type(e).__name__}: {e})", file=sys.stderr)
            failed.append(f)
    return ok, tensors, failed


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (probabilities (B, k), class indices (B, k)), most likely first."""
    probs = model(images).float().softmax(dim=-1)
    return probs.topk(min(topk, probs.shape[-1]), dim=-1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"image", "predictions": [{"label", "index", "prob"}]}')
    parser.add_argument("-b", "--batch-size", type=positive_int, default=32, metavar="N")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_model_args(parser)
    add_onnx_argument(parser)


def run(args: argparse.Namespace) -> int:
    files = find_images(args.inputs)
    device = resolve_device(args.device)
    warn_if_random_weights(args)
    loaded = load_model_or_onnx(args, device)
    check_input_size(loaded, *loaded.input_size[1:])
    transform = eval_transform(loaded)
    names = loaded.class_names
    failed_total = 0
    for start in range(0, len(files), args.batch_size):
        ok, tensors, failed = read_images(files[start:start + args.batch_size], transform)
        failed_total += len(failed)
        if not ok:
            continue
        probs, indices = predict(loaded.model, torch.stack(tensors).to(device), args.topk)
        for f, p_row, i_row in zip(ok, probs.tolist(), indices.tolist()):
            preds = [{"label": names[i] if names and i < len(names) else str(i), "index": i, "prob": round(p, 6)}
                     for p, i in zip(p_row, i_row)]
            if args.json:
                print(json.dumps({"image": str(f), "predictions": preds}))
            else:
                print(f"{f}:")
                for rank, pred in enumerate(preds, 1):
                    print(f"  {rank}. {pred['label']} ({pred['index']})  {pred['prob']:.4f}")
        sys.stdout.flush()
    if failed_total:
        print(f"{failed_total} of {len(files)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0

