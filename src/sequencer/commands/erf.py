"""`sequencer erf`: effective receptive field heat maps; the method is :mod:`sequencer.tools.erf`'s.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path


from ..choices import ERF_MODES
from ..data.class_folders import find_images
from ..errors import SequencerError
from .common import add_model_args, check_not_an_input, check_output_file, load_model_from_args, positive_int


def _parse_stage(text: str) -> str | int:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a stage number (1, 2, ...) or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"stages are numbered from 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="folder of images (searched recursively) or image files")
    parser.add_argument("--num-images", "-n", type=positive_int, default=50, metavar="N",
                        help="images to average over (a seeded random sample of DATA)")
    parser.add_argument("--output", "-o", default="erf.png", metavar="PNG", help="heat map; the raw map goes to .npy")
    parser.add_argument("--stage", type=_parse_stage, default=None, metavar="K|all",
                        help="stage K (1-based) or 'all' (one panel each); default: the final features")
    parser.add_argument("--mode", choices=ERF_MODES, default="paper",
                        help="paper: the Sequencer paper's ERF (ReLU'd centre, positive gradient summed, log10(x+1) "
                             "min-max scaled); magnitude: |gradient| of the plain centre sum, averaged (not the "
                             "paper's)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=8, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_model_args(parser)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise SequencerError(f"--output {args.output!r} must be a .png file")
    check_output_file("--output", args.output, example="erf.png")
    npy = output.with_suffix(".npy")  # the raw map's file, written beside the picture
    if npy.is_dir():
        raise SequencerError(f"--output {args.output!r}: its raw map would be {str(npy)!r}, which is a folder",
                             hint="choose another --output name")
    files = find_images([args.data])
    check_not_an_input("--output", output, files, "one of the images it reads")
    from ..engine.inference import check_input_size, resolve_device
    from ..tools.erf import area_ratios, erf_map, plot_erf, save_raw_maps

    device = resolve_device(args.device)
    loaded = load_model_from_args(args, device)
    check_input_size(loaded, *loaded.input_size[1:])
    num_stages = len(getattr(loaded.model, "stages", [None]))
    if args.stage == "all":
        stages = list(range(num_stages))
    elif args.stage is not None:
        if args.stage > num_stages:
            raise SequencerError(f"--stage {args.stage}: model {loaded.name!r} has {num_stages} stages")
        stages = [args.stage - 1]
    else:
        stages = [num_stages - 1]
    if len(files) > args.num_images:
        files = sorted(random.Random(args.seed).sample(files, args.num_images))
    elif len(files) < args.num_images:
        print(f"note: {args.data} holds {len(files)} image(s), fewer than --num-images {args.num_images}")
    maps, count = erf_map(loaded, files, stages, device, mode=args.mode, batch_size=args.batch_size)
    if count == 0:
        raise SequencerError(f"none of the {len(files)} image(s) in {args.data!r} could be read")
    final = args.stage is None
    titles = ["final features" if final else f"stage {s + 1}" for s in stages]
    size = "x".join(map(str, loaded.input_size[1:]))
    plot_erf(maps, titles, output, f"ERF ({args.mode}) of {loaded.name} at {size} px, {count} images", args.mode)
    save_raw_maps(npy, maps)
    for title, m in zip(titles, maps):
        ratios = area_ratios(m)
        print(f"{title}: high-contribution area ratio " +
              "  ".join(f"{int(t * 100)}%: {r:.4f}" for t, r in ratios.items()))
    print(f"wrote {output} and {npy} ({count} images)")
    return 0
