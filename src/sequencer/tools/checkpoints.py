"""`sequencer checkpoint average|clean`: the paper's checkpoint averaging and release-ready weight files.

``average`` takes the mean of the weights of N checkpoints (their EMA weights where present, as the paper's
``avg_checkpoints.py``); ``clean`` strips optimizer/scheduler/scaler state and keeps one set of weights. Both write
a file the loaders understand: a ``.pth`` holding ``{"version", "arch", "model_kwargs", "class_names",
"data_config", "state_dict"}`` or a ``.safetensors`` whose metadata carries the same model config as JSON strings.
Every file is written atomically (temporary file, fsync, rename), so an interrupted run leaves no partial output.
"""
from __future__ import annotations

import argparse
import os

import torch

from ..errors import SequencerError
from ..models.loading import extract_state_dict, model_config, read_checkpoint, save_weights

def _weights(path: str, use_ema: bool) -> tuple[dict, dict[str, torch.Tensor], bool]:
    checkpoint = read_checkpoint(path)
    has_ema = use_ema and any(isinstance(checkpoint.get(k), dict) and checkpoint[k]
                              for k in ("state_dict_ema", "model_ema"))
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    if not state:
        raise SequencerError(f"checkpoint {path!r} holds no weights")
    return checkpoint, state, has_ema


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]], names: list[str] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (accumulated in float64); other tensors come from the first.

    All state dicts must have the same keys and shapes; a mismatch raises SequencerError naming the file and key.
    """
    if not state_dicts:
        raise SequencerError("no checkpoints to average")
    names = names or [f"#{i}" for i in range(len(state_dicts))]
    first = state_dicts[0]
    for name, state in zip(names[1:], state_dicts[1:]):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            what = (f"lacks {', '.join(missing[:3])}" if missing else "") + \
                   ("; " if missing and extra else "") + (f"has extra {', '.join(extra[:3])}" if extra else "")
            raise SequencerError(f"cannot average: {name!r} does not have the same weights as {names[0]!r} "
                                 f"({what})", hint="average checkpoints of one training run / architecture")
        for k, v in first.items():
            if state[k].shape != v.shape:
                raise SequencerError(f"cannot average: {k} has shape {tuple(state[k].shape)} in {name!r} but "
                                     f"{tuple(v.shape)} in {names[0]!r}",
                                     hint="average checkpoints of one training run / architecture")
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            total = torch.zeros(v.shape, dtype=torch.float64)
            for state in state_dicts:
                total += state[k].to(torch.float64)
            out[k] = (total / len(state_dicts)).to(v.dtype)
        else:  # counters such as num_batches_tracked cannot be averaged meaningfully
            out[k] = v.clone()
    return out


def _check_output(path: str, inputs: list[str], safetensors: bool) -> None:
    # the loaders tell safetensors from a pickle by the suffix, so the name must say what the file is
    if safetensors and not path.endswith(".safetensors"):
        raise SequencerError(f"--output {path!r}: a --safetensors file must end in .safetensors")
    if any(os.path.abspath(path) == os.path.abspath(p) for p in inputs):
        raise SequencerError(f"--output {path!r} is also an input; refusing to overwrite it")


def cmd_average(args: argparse.Namespace) -> int:
    _check_output(args.output, args.checkpoints, args.safetensors)
    configs, states = [], []
    for path in args.checkpoints:
        checkpoint, state, used_ema = _weights(path, args.use_ema)
        configs.append(model_config(checkpoint))
        states.append(state)
        print(f"{path}: {len(state)} tensors ({'EMA' if used_ema else 'model'} weights)")
    archs = {c.get("arch") for c in configs if c.get("arch")}
    if len(archs) > 1:
        raise SequencerError(f"cannot average checkpoints of different architectures: {', '.join(sorted(archs))}")
    averaged = average_state_dicts(states, list(args.checkpoints))
    out = save_weights(averaged, args.output, configs[0], safetensors=args.safetensors or None,
                       extra={"averaged_from": [str(p) for p in args.checkpoints]})
    print(f"averaged {len(states)} checkpoints -> {out}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _check_output(args.output, [args.checkpoint], args.safetensors)
    checkpoint, state, used_ema = _weights(args.checkpoint, args.use_ema)
    out = save_weights(state, args.output, model_config(checkpoint), safetensors=args.safetensors or None)
    size_in, size_out = os.path.getsize(args.checkpoint), os.path.getsize(out)
    print(f"{args.checkpoint} ({size_in / 2**20:.1f} MiB) -> {out} ({size_out / 2**20:.1f} MiB), "
          f"{'EMA' if used_ema else 'model'} weights, {len(state)} tensors")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    avg = sub.add_parser("average", help="average the weights of several checkpoints (EMA weights where present)",
                         description="Average the weights of several checkpoints (EMA weights where present).")
    avg.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (same architecture)")
    clean = sub.add_parser("clean", help="strip optimizer state, keep EMA or model weights",
                           description="Strip optimizer/scheduler state and keep only one set of weights.")
    clean.add_argument("checkpoint", metavar="CKPT", help="checkpoint file")
    for p in (avg, clean):
        p.add_argument("--output", "-o", required=True, metavar="PATH",
                       help="output file (.pth, or .safetensors)")
        p.add_argument("--safetensors", action="store_true",
                       help="write safetensors (the output must end in .safetensors)")
        ema = p.add_mutually_exclusive_group()
        ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=True,
                         help="take the EMA weights where a checkpoint has them (default)")
        ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the raw model weights")


def run(args: argparse.Namespace) -> int:
    return cmd_average(args) if args.action == "average" else cmd_clean(args)
