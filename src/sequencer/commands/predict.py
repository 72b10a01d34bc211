"""`sequencer predict`: top-k classes and probabilities for image files and folders.

Labels are the checkpoint's own class names, ImageNet's readable names for a 1000-class model without them, else
the class index. Probabilities are the softmax of the logits, or each class's sigmoid for a model trained with
``--bce-loss`` (its checkpoint's ``probabilities``). ``--onnx PATH`` classifies with an exported ONNX file (fp32 or
int8) under onnxruntime instead, with the preprocessing and class names stored in the file. Folders are searched
recursively for image files. An unreadable image is reported on stderr (naming the file) and skipped; the command
then exits with status 1 after classifying the rest.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..data.class_folders import find_images
from .common import (add_fast_argument, check_fast_flags, add_model_args, add_onnx_argument, load_model_or_onnx, positive_int,
                     warn_if_random_weights)

if TYPE_CHECKING:
    import torch


def predict(model: torch.nn.Module, images: torch.Tensor, topk: int, probabilities: str = "softmax"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (probabilities (B, k), class indices (B, k)), most likely first. ``probabilities``: "softmax"
    (a model trained with cross-entropy) or "sigmoid" (with a binary cross-entropy loss: each class's own)."""
    import torch

    with torch.inference_mode():
        logits = model(images).float()
        probs = logits.sigmoid() if probabilities == "sigmoid" else logits.softmax(dim=-1)
        return probs.topk(min(topk, probs.shape[-1]), dim=-1)


def _probabilities(loaded, source: str) -> str:
    """How the loaded model's logits become probabilities, said on stderr where it is not the usual softmax or the
    file does not say."""
    if loaded.probabilities == "sigmoid":
        print(f"note: {source} was trained with a binary cross-entropy loss (--bce-loss): each probability is its "
              f"class's sigmoid (they need not sum to 1)", file=sys.stderr)
    elif loaded.probabilities is None:
        print(f"note: {source} does not record whether its run trained with --bce-loss (a file cleaned, averaged or "
              f"exported before it was recorded): probabilities are softmax, which is wrong for a --bce-loss model",
              file=sys.stderr)
    return loaded.probabilities or "softmax"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    parser.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"image", "predictions": [{"label", "index", "prob"}]}')
    parser.add_argument("-b", "--batch-size", type=positive_int, default=32, metavar="N")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_fast_argument(parser)
    add_model_args(parser)
    add_onnx_argument(parser)


def output_label(names: list[str] | None, index: int) -> str:
    """Output ``index``'s label: its class name; past the names (a head with more outputs than the classes it was
    trained on, e.g. --num-classes above them) it says so rather than pass the index for a class name."""
    if not names:
        return str(index)
    return names[index] if index < len(names) else f"(no class: output {index})"


def _warn_of_unnamed_outputs(names: list[str] | None, num_outputs: int | None) -> None:
    if names and num_outputs and num_outputs > len(names):
        print(f"warning: the model has {num_outputs} outputs but {len(names)} class names: outputs "
              f"{len(names)}..{num_outputs - 1} belong to no class (no image trained them); they are labelled "
              f"'(no class: output N)'", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    files = find_images(args.inputs)  # first: a missing file is named before the library loads
    import torch

    from ..engine.guest import printable
    from ..engine.inference import check_input_size, eval_transform, read_images, resolve_device
    from ..tools.optimize import optimize_for_inference

    device = resolve_device(args.device)
    warn_if_random_weights(args)
    check_fast_flags(args)
    loaded = load_model_or_onnx(args, device)
    check_input_size(loaded, *loaded.input_size[1:])
    if args.fast:
        loaded.model = optimize_for_inference(loaded.model, "auto")
    transform = eval_transform(loaded)
    names = loaded.class_names
    _warn_of_unnamed_outputs(names, getattr(loaded.model, "num_classes", None))
    probabilities = _probabilities(loaded, repr(args.onnx or args.checkpoint or loaded.name))
    failed_total = 0
    for start in range(0, len(files), args.batch_size):
        ok, tensors, failed = read_images(files[start:start + args.batch_size], transform)
        failed_total += len(failed)
        if not ok:
            continue
        probs, indices = predict(loaded.model, torch.stack(tensors).to(device), args.topk, probabilities)
        for f, p_row, i_row in zip(ok, probs.tolist(), indices.tolist()):
            preds = [{"label": output_label(names, i), "index": i, "prob": round(p, 6)}
                     for p, i in zip(p_row, i_row)]
            if args.json:
                print(json.dumps({"image": str(f), "predictions": preds}))
            else:
                print(printable(f"{f}:"))
                for rank, pred in enumerate(preds, 1):
                    print(f"  {rank}. {pred['label']} ({pred['index']})  {pred['prob']:.4f}")
        sys.stdout.flush()
    if failed_total:
        print(f"{failed_total} of {len(files)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0

