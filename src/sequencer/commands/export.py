"""`sequencer export`: ONNX (fp32 or int8), TorchScript, torch.export (.pt2) or safetensors files, checked against the
eager model (:mod:`sequencer.tools.export`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import EXPORT_FORMATS, MIN_OPSET
from ..data.class_folders import find_images
from ..errors import SequencerError
from .common import (add_model_args, check_not_an_input, check_output_file, load_model_from_args, positive_int,
                     warn_if_random_weights)


def check_output_format(args: argparse.Namespace) -> str:
    """The export format; the --output suffix must be one of its suffixes (checked before anything is written)."""
    suffix = Path(args.output).suffix.lower()
    inferred = next((name for name, suffixes in EXPORT_FORMATS.items() if suffix in suffixes), None)
    if args.format and inferred != args.format:
        raise SequencerError(f"--output {args.output!r} does not end in {' or '.join(EXPORT_FORMATS[args.format])}, "
                             f"the suffix of --format {args.format}", hint="name the file after its format")
    if not args.format and inferred is None:
        raise SequencerError(f"cannot tell the export format from {args.output!r}",
                             hint="end --output in .onnx, .pt or .safetensors")
    return args.format or inferred


def check_export_options(args: argparse.Namespace, fmt: str) -> None:
    """One-line errors for option combinations that cannot work, before the model is loaded."""
    from ..tools.export import MAX_OPSET, int8_settings, onnx_packages

    if fmt == "onnx":
        onnx_packages()  # installed (the `export` extra)? asked before a model is loaded or downloaded
    if fmt == "onnx" and not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise SequencerError(f"--opset {args.opset} is not supported: the exporter writes opsets {MIN_OPSET} to "
                             f"{MAX_OPSET} (LayerNormalization needs {MIN_OPSET})")
    if args.quantize and fmt != "onnx":
        raise SequencerError(f"--quantize {args.quantize} is for ONNX exports, not {fmt}",
                             hint="use --format onnx and an .onnx --output")
    if args.dtype != "float32" and fmt != "onnx":
        raise SequencerError(f"--dtype {args.dtype} is for ONNX exports; a {fmt} file holds the float32 weights",
                             hint="drop --dtype, or use --format onnx and an .onnx --output")
    if args.dtype != "float32" and args.quantize:
        raise SequencerError(f"--dtype {args.dtype} and --quantize {args.quantize}: int8 quantisation starts from "
                             "the float32 graph", hint="drop one of them")
    int8_only = [flag for flag, given in (("--verify", args.verify), ("--min-agreement", args.min_agreement is not None),
                                          ("--target-cpu", args.target_cpu), ("--calibration", args.calibration))
                 if given]
    if int8_only and not args.quantize:
        raise SequencerError(f"{', '.join(int8_only)}: for an int8 export only", hint="add --quantize int8")
    if args.target_cpu:
        int8_settings(args.target_cpu)  # one line naming the classes when it is not one
    if args.calibration:
        _check_image_folder("--calibration", args.calibration)
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise SequencerError(f"--min-agreement {args.min_agreement:g} is not a fraction between 0 and 1")
    if args.verify and not Path(args.verify).is_dir():
        raise SequencerError(f"--verify {args.verify!r} is not a folder of images")


def _check_image_folder(flag: str, folder: str) -> None:
    if not Path(folder).is_dir():
        raise SequencerError(f"{flag} {folder!r} is not a folder of images")
    try:
        find_images([folder])
    except SequencerError as e:
        raise SequencerError(f"{flag} {folder!r}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--format", "-f", choices=sorted(EXPORT_FORMATS), default=None,
                        help="export format (default: from the --output suffix: .onnx, .pt/.ts, .pt2, .safetensors); "
                             "the suffix must match it")
    parser.add_argument("--output", "-o", required=True, metavar="PATH", help="file to write")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="ONNX/TorchScript/exported program: variable batch size")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the example input")
    parser.add_argument("--opset", type=positive_int, default=17,
                        help=f"ONNX opset ({MIN_OPSET} up to the newest the installed torch exports)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="allowed max |exported - PyTorch| / max |PyTorch| of the logits (default 1e-4; 5e-3 "
                             "with --dtype float16)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="ONNX: float16 writes a graph whose weights, input, computation and logits are float16 "
                             "(for GPU runtimes), checked against the float32 model under onnxruntime's CPU provider")
    g = parser.add_argument_group("int8 (ONNX)")
    g.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8 quantisation through onnxruntime, with settings for the CPU it will run on (dynamic: "
                        "activations scaled at run time, unless --calibration)")
    g.add_argument("--target-cpu", default=None, metavar="CLASS",
                   help="quantise for this CPU class instead of this machine's: avx2, avx512, avx512-vnni, "
                        "avx512-bf16 or amx (see `sequencer env`)")
    g.add_argument("--calibration", default=None, metavar="DIR",
                   help="static int8 (QDQ): fixed activation scales measured on the images under DIR")
    g.add_argument("--verify", default=None, metavar="DIR",
                   help="run fp32 and int8 on the images under DIR; report top-1 agreement (and top-1 where DIR "
                        "has class subfolders, on the images the checkpoint's run did not train on)")
    g.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="with --verify: write nothing unless int8 agrees with fp32 on this fraction (default 0.99)")


def _report_int8(result: dict, verify: str | None) -> str:
    from ..tools.export import describe_int8

    settings = describe_int8(result["settings"], result["float_ops"])
    if not verify:
        print("warning: int8 accuracy not checked; pass --verify DIR (a folder of images) to measure it",
              file=sys.stderr)
        return f"fp32 graph matches PyTorch (relative error {result['rel_error']:.1e}), quantised: {settings}"
    text = f"{settings}; int8 agrees with fp32 on {100 * result['agreement']:.2f}% of {result['count']} images"
    if result["fp32_top1"] is not None:
        text += (f" (top-1 on {result['scored']} of them: fp32 {100 * result['fp32_top1']:.2f}%, "
                 f"int8 {100 * result['int8_top1']:.2f}%)")
    return text


def run(args: argparse.Namespace) -> int:
    fmt = check_output_format(args)
    check_output_file("--output", args.output, example=f"model{Path(args.output).suffix}")
    check_not_an_input("--output", args.output, [args.checkpoint] if args.checkpoint else [], "the --checkpoint file")
    check_export_options(args, fmt)
    warn_if_random_weights(args)
    from ..engine.inference import check_input_size

    loaded = load_model_from_args(args, "cpu")
    check_input_size(loaded, *loaded.input_size[1:])
    config, meta = _file_records(loaded)
    written, how = _write_export(args, fmt, loaded, config, meta)
    out = Path(args.output)
    print(f"exported {loaded.name} ({loaded.num_params / 1e6:.2f}M params, input "
          f"{'x'.join(map(str, loaded.input_size))}) to {written}: {out} ({out.stat().st_size / 2**20:.1f} MiB); "
          f"{how}")
    return 0


def _file_records(loaded) -> tuple[dict, dict]:
    """(the safetensors file's config, the other formats' metadata): what rebuilds and describes the model without
    its checkpoint. Both carry the registered architecture (an hf-hub: name's too: the file rebuilds its model
    without the Hub), its ``model_kwargs`` (what ``benchmark --onnx`` builds the file's model with, beside it), the
    class names, the preprocessing at the file's size (``img_size``: its graph's; ``trained_size``: its weights'
    training size) and the checkpoint's record of its training data (``data``, ``ignored_classes``), so that
    ``validate`` of the file needs no DATA and leaves out what ``validate --checkpoint`` leaves out (the images a
    --val-fraction run trained on, the folders its class map left out)."""
    from ..models.loading import model_config

    model, input_size = loaded.model, loaded.input_size
    data_config = dict(loaded.data_config, img_size=input_size[-1])
    arch = getattr(model, "model_name", None) or loaded.name
    config = {**model_config(loaded.checkpoint), "arch": arch,
              "model_kwargs": dict(getattr(model, "model_kwargs", {}) or {}),
              "class_names": loaded.class_names, "data_config": data_config, "trained_size": loaded.trained_size}
    meta = {"arch": arch, "model_kwargs": config["model_kwargs"], "class_names": loaded.class_names or [],
            "data_config": data_config, "input_size": list(input_size), "trained_size": loaded.trained_size,
            **{k: config[k] for k in ("data", "ignored_classes") if config.get(k)}}
    if loaded.probabilities:  # predict --onnx turns the logits into probabilities as predict --checkpoint does
        meta["probabilities"] = config["probabilities"] = loaded.probabilities
    return config, meta


def _write_export(args: argparse.Namespace, fmt: str, loaded, config: dict, meta: dict) -> tuple[str, str]:
    """Writes ``args.output`` in ``fmt``, checked against the eager model; (the format written, how it was checked)."""
    import torch

    from ..tools.export import (ONNX_DTYPES, export_onnx, export_onnx_int8, export_program, export_safetensors,
                                export_torchscript, int8_settings)

    model, input_size, out = loaded.model, loaded.input_size, Path(args.output)
    dtype = getattr(torch, args.dtype)
    rtol = ONNX_DTYPES[dtype] if args.rtol is None else args.rtol
    onnx_kwargs = dict(batch_size=args.batch_size, dynamic_batch=args.dynamic_batch, opset=args.opset,
                       rtol=rtol, metadata=meta)
    if fmt == "onnx" and args.quantize:
        result = export_onnx_int8(model, out, input_size, verify=args.verify,
                                  min_agreement=0.99 if args.min_agreement is None else args.min_agreement,
                                  settings=int8_settings(args.target_cpu, static=args.calibration is not None),
                                  calibration=args.calibration, **onnx_kwargs)
        return "onnx int8", _report_int8(result, args.verify)
    if fmt == "onnx":
        err = export_onnx(model, out, input_size, dtype=dtype, **onnx_kwargs)
        return ("onnx float16" if dtype == torch.float16 else fmt,
                f"onnxruntime logits match PyTorch's float32 ones (relative error {err:.1e})")
    if fmt == "torchscript":
        err = export_torchscript(model, out, input_size, batch_size=args.batch_size,
                                 dynamic_batch=args.dynamic_batch, rtol=rtol, metadata=meta)
        return fmt, f"reloaded trace matches PyTorch (relative error {err:.1e})"
    if fmt == "exported-program":
        err = export_program(model, out, input_size, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                             rtol=rtol, metadata=meta)
        return fmt, f"torch.export.load's program matches PyTorch (relative error {err:.1e})"
    err = export_safetensors(model, out, config, weights=loaded.weights)
    return fmt, f"model rebuilt from the file matches (relative error {err:.1e})"
