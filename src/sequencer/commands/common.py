"""The one home of what several commands share: the model flags and the model they load, ``--onnx``, flag types
and the checks of ``--device``, ``--workers`` and ``--results-file``, and the library's parameter names as the
flags that set them (`as_flags`). Commands import these from here, never from one another; the work itself is the
library's (``engine``, ``tools``). Like every command module, it imports no torch at its top: ``sequencer COMMAND
--help`` and a bad flag are answered from the argument tables alone; the helpers that do the work import it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from typing import TYPE_CHECKING

from ..engine.config import config_defaults
from ..engine.segmentation_config import SegmentConfig
from ..errors import SequencerError

if TYPE_CHECKING:
    import torch

    from ..engine.inference import LoadedModel


# The library's parameters that messages name (in backticks, errors.py) -> the flag that sets them on the command line
PARAMETER_FLAGS = {
    # train's and segment train's settings are TrainConfig's and SegmentConfig's fields, each set by the flag of that
    # name (DATA: the positional argument)
    **{name: "--" + name.replace("_", "-")
       for name in [*config_defaults(), *(f.name for f in dataclasses.fields(SegmentConfig))]},
    "data": "DATA", "checkpoint": "--checkpoint", "batch_size": "--batch-size", "crop_pct": "--crop-pct",
    "class_map": "--class-map", "mean": "--mean", "std": "--std", "interpolation": "--interpolation",
    "download": "--dataset-download", "name": "--dataset", "root": "DATA", "checkpoint_path": "--checkpoint",
    "model": "--model", "onnx": "--onnx", "num_classes": "--num-classes", "img_size": "--img-size",
    "input_size": "--input-size", "resume": "--resume", "stages": "--stage", "target_cpu": "--target-cpu",
    "corruptions": "--corruptions", "amp_dtype": "--amp-dtype", "val_fraction": "--val-fraction",
    # benchmark's BenchmarkSettings (its `data` is its --data, not DATA: COMMAND_FLAGS)
    "compare_timm": "--compare-timm", "num_warmup": "--num-warmup", "memory_iter": "--memory-iter",
    "optimized": "--optimized", "reference_model": "--reference-model",
    # export's (export_onnx, export_onnx_int8; `quantize` is the command's own switch to export_onnx_int8)
    "dynamic_batch": "--dynamic-batch", "opset": "--opset", "calibration": "--calibration", "verify": "--verify",
    "min_agreement": "--min-agreement", "quantize": "--quantize",
    # the model flags' (add_model_args): `use_ema=True` is --use-ema
    "use_ema": "--use-ema",
}
# A command whose flag for a parameter is not PARAMETER_FLAGS' one: benchmark's `data` is its --data, not DATA;
# segment train loads the backbone's weights (create_model's `checkpoint_path`) from --backbone-checkpoint
COMMAND_FLAGS = {"benchmark": {"data": "--data"}, "segment": {"checkpoint_path": "--backbone-checkpoint"}}
# the flag that sets a parameter False where it is not PARAMETER_FLAGS' flag given a value (`use_ema=False`: --no-ema)
OFF_FLAGS = {"use_ema": "--no-ema"}
_PARAMETER = re.compile(r"`(\w+)(?:=([^`]*))?`")


def as_flags(text: str, command: str | None = None) -> str:
    """``text`` with each backticked library parameter (`` `batch_size=8` ``, `` `class_map` ``, `` `amp=True` ``)
    written as the flag that sets it in ``command`` (``--batch-size 8``, ``--class-map``, ``--amp``); other
    backticked text is left as it is."""
    flags = {**PARAMETER_FLAGS, **COMMAND_FLAGS.get(command, {})}

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in flags:
            return match.group(0)
        if value == "False" and name in OFF_FLAGS:
            return OFF_FLAGS[name]
        return flags[name] + ("" if value in (None, "True") else f" {value}")
    return _PARAMETER.sub(flag, text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, object]:
    """'depth=3' -> ('depth', 3): the value as a Python literal where it reads as one, else as text."""
    key, equals, raw = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


class KeyValues(argparse.Action):
    """Collects the (key, value) pairs of :func:`key_value` into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


class Switch(argparse.Action):
    """An on/off flag: its on spellings store True, its ``off`` spelling (``--no-amp``) False, so a resume can turn
    off what its checkpoint's run had on (a plain ``store_true`` flag has no way to say "off")."""

    def __init__(self, option_strings, dest, off: str, **kwargs):
        super().__init__([*option_strings, off], dest, nargs=0, **kwargs)
        self.off = off

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string != self.off)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="model name (default: the checkpoint's own)")
    g.add_argument("--checkpoint", default="", metavar="PATH", help="weights: ours, release, timm or .safetensors")
    g.add_argument("--pretrained", action="store_true", help="use the released ImageNet weights")
    g.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (default: checkpoint's)")
    g.add_argument("--img-size", type=positive_int, default=None, help="square input size")
    g.add_argument("--input-size", type=positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input size C H W (overrides --img-size)")
    add_ema_arguments(g)


def add_ema_arguments(group) -> None:
    """``--use-ema`` / ``--no-ema``: which weights of a checkpoint with both to take (default: the ones its run
    evaluated, ``models.loading.picked_weights``)."""
    ema = group.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                     help="take a checkpoint's EMA weights (default: the weights its run evaluated and logged)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false",
                     help="take a checkpoint's raw model weights even when its run evaluated its EMA weights")


def add_dataset_arguments(group) -> None:
    """``--dataset NAME`` and ``--dataset-download`` of the evaluating commands (validate, resolution-sweep): which
    kind of data DATA holds, as ``create_dataset``'s ``name`` and ``download``."""
    group.add_argument("--dataset", default="", metavar="NAME",
                       help="'' image folders or tar, 'digits', or torch/NAME (torch/cifar10, torch/flowers102, ...) "
                            "with DATA its torchvision root")
    group.add_argument("--dataset-download", action="store_true", help="let torchvision datasets download themselves")


def add_torchcompile_argument(group) -> None:
    """``--torchcompile [BACKEND]``, as timm's scripts have it (train and validate)."""
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model (backend, default inductor)")


def add_fast_argument(parser) -> None:
    """``--fast`` of predict and validate: :func:`sequencer.optimize_for_inference` with ``dtype="auto"``."""
    parser.add_argument("--fast", action="store_true",
                        help="inference on the fastest path that keeps fp32's top-1 answers on this CPU "
                             "(optimize_for_inference with dtype='auto': bf16 on AVX512-BF16/AMX CPUs, float32 "
                             "elsewhere)")


def check_fast_flags(args: argparse.Namespace) -> None:
    """``--fast`` runs a PyTorch model: refused beside ``--onnx`` (onnxruntime runs the file as exported)."""
    if args.fast and args.onnx:
        raise SequencerError("--fast does not apply to --onnx: the file runs in the precision it was exported in")


def warn_if_random_weights(args: argparse.Namespace) -> None:
    """One warning line when a model name alone (no --checkpoint, no --pretrained) means random weights."""
    if getattr(args, "model", None) and not args.checkpoint and not args.pretrained:
        from ..models import get_model_entry, has_pretrained_weights
        released = has_pretrained_weights(get_model_entry(args.model).pretrained_cfg)
        print(f"warning: {args.model} runs with randomly initialised weights (no --checkpoint given"
              + ("; --pretrained loads the released ones)" if released else ", and it has no released ones)"),
              file=sys.stderr)


def load_model_from_args(args: argparse.Namespace, device: torch.device | str = "cpu") -> LoadedModel:
    """The model the model flags (:func:`add_model_args`) describe, in eval mode on ``device``."""
    from ..engine.inference import load_model
    return load_model(args.checkpoint, model=args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                      img_size=getattr(args, "img_size", None), input_size=getattr(args, "input_size", None),
                      use_ema=getattr(args, "use_ema", None), device=device)


def check_device(text: str | None) -> None:
    """SequencerError for a ``--device`` that is not a device, or names CUDA where there is none."""
    from ..engine.inference import resolve_device
    resolve_device(text)


# what an evaluating command's -j/--workers is when not given (engine.inference.default_workers)
DEFAULT_WORKERS = "the CPUs this process may use, at most 4"


def add_workers_argument(group, default: str = DEFAULT_WORKERS) -> None:
    """``-j/--workers N`` of the evaluating commands: not given, it is :func:`data_workers`' default (``default``
    says it in --help where the command's own differs)."""
    group.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                       help=f"data loading processes (default: {default})")


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 0:
        raise SequencerError(f"-j/--workers {workers}: must not be negative", hint="0 loads data in the main process")


def data_workers(workers: int | None) -> int:
    """The data-loading processes ``-j/--workers`` asks for (refused when negative), or when not given as many as
    the CPUs this process may use, at most 4 (``engine.inference.default_workers``)."""
    check_workers(workers)
    from ..engine.inference import default_workers
    return default_workers() if workers is None else workers


def check_not_an_input(flag: str, path: str | os.PathLike, inputs, what: str = "an input") -> None:
    """Refuse an output ``path`` that is one of the files the command reads (``inputs``, by any name), before any
    work: writing it would replace what the user had."""
    from ..fileio import input_overwritten
    if input_overwritten([path], inputs):
        raise SequencerError(f"{flag} {os.fspath(path)!r} is also {what}; refusing to overwrite it")


def check_results_file(path: str, formats: tuple[str, ...] = (".json",)) -> None:
    """Refuse a ``--results-file`` that could not be written, before any work is done (one-line errors)."""
    if not path:
        return
    if os.path.splitext(path)[1].lower() not in formats:
        raise SequencerError(f"--results-file {path!r}: unknown format", hint=f"use a {' or '.join(formats)} file name")
    check_output_file("--results-file", path, example="results.json")


def check_output_file(flag: str, path: str, example: str) -> None:
    """Refuse an output file ``path`` that could not be written (a missing folder, a folder of that name, no
    permission), before any work is done; ``example`` names a file the hint suggests inside such a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SequencerError(f"{flag} {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise SequencerError(f"{flag} {path!r} is a folder", hint=f"name a file inside it, e.g. {example}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise SequencerError(f"{flag} {path!r} is not writable (no permission)")
    try:  # a real write probe: os.access cannot see read-only mounts, ACLs or quotas
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".results-probe-"):
            pass
    except OSError as e:
        raise SequencerError(f"{flag} {path!r}: cannot write in folder {folder!r} ({e.strerror or e})") from None


def add_onnx_argument(parser) -> None:
    parser.add_argument("--onnx", default=None, metavar="PATH",
                        help="run this `sequencer export` ONNX file (fp32 or int8) through onnxruntime instead of a "
                             "PyTorch model; preprocessing and class names come from the file")


def load_model_or_onnx(args, device: torch.device | str = "cpu") -> LoadedModel:
    """``--onnx PATH`` when given (no model options allowed beside it), else the PyTorch model the options name."""
    if not getattr(args, "onnx", None):
        return load_model_from_args(args, device)
    ema = getattr(args, "use_ema", None)
    given = [flag for flag, value in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                      ("--pretrained", args.pretrained), ("--num-classes", args.num_classes),
                                      ("--use-ema" if ema else "--no-ema", ema is not None))
             if value]
    if given:
        raise SequencerError(f"--onnx {args.onnx!r} carries its own model and weights; drop {', '.join(given)}")
    from ..tools.onnx_runtime import load_onnx, note_other_cpu
    loaded = load_onnx(args.onnx)
    if args.input_size and args.input_size[0] != loaded.input_size[0]:  # the file's stem is fixed: nothing adapts it
        raise SequencerError(f"--onnx {args.onnx!r} was exported for {loaded.input_size[0]}-channel inputs, not "
                             f"{args.input_size[0]}", hint=f"use --input-size {loaded.input_size[0]} H W, or export "
                             f"the checkpoint with --input-size {args.input_size[0]} H W")
    size = args.input_size[1:] if args.input_size else (args.img_size,) * 2 if args.img_size else None
    if size:
        try:
            loaded.model.check_input_size(*size)
        except ValueError as e:
            raise SequencerError(str(e), hint="drop --img-size/--input-size, or export at that size") from None
    note_other_cpu(loaded.model)
    return loaded


def speaks_for_the_launch() -> bool:
    """Whether this process prints a command's results: outside torchrun, or its rank 0 (every rank of a launch
    holds the same numbers, and only rank 0's console shows notes)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def failure_reported_to_launcher():
    """Under ``distributed_train.sh``, a user error tells the launcher this rank's exit status (2), so the launch
    ends with it; the commands that run under torchrun (train, validate) wrap their work in this. A rank that
    stopped because another failed exits without a traceback of its own (the other says why on its line)."""
    from ..engine.distributed import PeerGone, record_own_failure
    try:
        yield
    except SequencerError:
        record_own_failure(2)
        raise
    except PeerGone:
        raise SystemExit(PeerGone.exit_status) from None
