"""`sequencer checkpoint average|clean`: the paper's checkpoint averaging and release-ready weight files (:mod:`sequencer.tools.checkpoints`).
"""
from __future__ import annotations

import argparse
import os

from ..errors import SequencerError
from .common import add_ema_arguments, as_flags, check_not_an_input


def _check_output(path: str, inputs: list[str], safetensors: bool) -> None:
    # the loaders tell safetensors from a pickle by the suffix, so the name must say what the file is
    if safetensors and not path.endswith(".safetensors"):
        raise SequencerError(f"--output {path!r}: a --safetensors file must end in .safetensors")
    check_not_an_input("--output", path, inputs)


# what a run records beside its model and may differ between the averaged files (another run's, or a resume's with
# other settings): kept where every file records the same, else none, with a note
_RECORDED_BY_RUN = (("probabilities", "losses (--bce-loss or not)", "predict gives softmax probabilities"),
                    ("eval_amp_dtype", "evaluation autocast", "validate notes none"))


def cmd_average(args: argparse.Namespace) -> int:
    _check_output(args.output, args.checkpoints, args.safetensors)
    from ..models.loading import model_config, save_weights
    from ..tools.checkpoints import (average_state_dicts, averaged_data_config, averaged_data_record,
                                     check_fits_its_model, check_same_model, read_weights, repeated_weights)

    paths, configs, states, used_emas = list(args.checkpoints), [], [], []
    for path in paths:
        checkpoint, state, used_ema = read_weights(path, args.use_ema)
        configs.append(model_config(checkpoint))
        states.append(state)
        used_emas.append(used_ema)
        print(f"{path}: {len(state)} tensors ({'EMA' if used_ema else 'model'} weights)")
    check_same_model(configs, paths)
    check_fits_its_model(configs[0], states[0], f"checkpoint {paths[0]!r}")  # the others have its keys and shapes
    repeats = repeated_weights(states)
    for i, j in repeats.items():
        print(f"note: {paths[i]} holds the same weights as {paths[j]}: counted once")
    paths, configs, states, used_emas = ([items[i] for i in range(len(items)) if i not in repeats]
                                         for items in (paths, configs, states, used_emas))
    ema_count = sum(used_emas)
    if 0 < ema_count < len(states):
        print(f"note: the average mixes the EMA weights of {ema_count} checkpoint(s) with the raw model weights of "
              f"{len(states) - ema_count} (the weights each run evaluated, or a file's only ones; --no-ema takes "
              f"raw model weights where a file has them)")
    averaged = average_state_dicts(states, paths)
    config = dict(configs[0])
    for key, what, then in _RECORDED_BY_RUN:
        if any(c.get(key) != config.get(key) for c in configs) and config.pop(key, None):
            print(f"note: the checkpoints record different {what}: the average records none ({then})")
    config.pop("data", None)
    data, note = averaged_data_record(configs)  # the held-out images validate finds for the average
    if data is not None:
        config["data"] = data
    if note:
        print(f"note: {as_flags(note)}")
    config["data_config"], differing = averaged_data_config(configs)  # a segmentation checkpoint's evaluation autocast
    if differing:
        print(f"note: the checkpoints record different evaluation autocast: the average records none (segment "
              f"validate evaluates it in float32)")
    weights = {len(states): {"weights": "ema"}, 0: {"weights": "model"}}.get(ema_count, {})  # none when mixed
    out = save_weights(averaged, args.output, config, safetensors=args.safetensors or None,
                       extra={"averaged_from": [str(p) for p in paths], **weights})
    print(f"averaged {len(states)} checkpoints -> {out}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _check_output(args.output, [args.checkpoint], args.safetensors)
    from ..models.loading import model_config, save_weights
    from ..tools.checkpoints import check_fits_its_model, read_weights

    checkpoint, state, used_ema = read_weights(args.checkpoint, args.use_ema)
    config = model_config(checkpoint)
    check_fits_its_model(config, state, f"checkpoint {args.checkpoint!r}")
    out = save_weights(state, args.output, config, safetensors=args.safetensors or None,
                       extra={"weights": "ema" if used_ema else "model"})
    size_in, size_out = os.path.getsize(args.checkpoint), os.path.getsize(out)
    print(f"{args.checkpoint} ({size_in / 2**20:.1f} MiB) -> {out} ({size_out / 2**20:.1f} MiB), "
          f"{'EMA' if used_ema else 'model'} weights, {len(state)} tensors")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    avg = sub.add_parser("average", help="average the weights of several checkpoints (the weights each run evaluated)",
                         description="Average the weights of several checkpoints (by default the ones each run "
                                     "evaluated).")
    avg.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (same architecture)")
    clean = sub.add_parser("clean", help="strip optimizer state, keep EMA or model weights",
                           description="Strip optimizer/scheduler state and keep only one set of weights.")
    clean.add_argument("checkpoint", metavar="CKPT", help="checkpoint file")
    for p in (avg, clean):
        p.add_argument("--output", "-o", required=True, metavar="PATH",
                       help="output file (.pth, or .safetensors)")
        p.add_argument("--safetensors", action="store_true",
                       help="write safetensors (the output must end in .safetensors)")
        add_ema_arguments(p)


def run(args: argparse.Namespace) -> int:
    return cmd_average(args) if args.action == "average" else cmd_clean(args)
