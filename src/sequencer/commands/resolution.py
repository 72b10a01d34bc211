"""`sequencer resolution-sweep`: top-1/top-5 at several input sizes (:mod:`sequencer.tools.resolution`).
"""
from __future__ import annotations

import argparse
import os

from ..errors import SequencerError
from .common import (add_dataset_arguments, add_model_args, add_workers_argument, data_workers, load_model_from_args,
                     positive_int)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset folder (DATA/SPLIT/CLASS/IMAGE or DATA/CLASS/IMAGE), "
                                                     ".tar, or torchvision root (--dataset torch/NAME)")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default=None,
                        help="split folder to evaluate (default: the one validate evaluates: the split the "
                             "checkpoint's run evaluated on where DATA is its DATA (a --val-fraction run: its "
                             "held-out images), else val, or test where DATA has train/ and test/ only)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=None, metavar="PX",
                        help="input sizes to evaluate (default: half to twice the model's input size, --img-size or "
                             "else the size its file records (a checkpoint's training size, an export's export size), "
                             "in quarter steps, as multiples of its patch "
                             "reduction: 112 168 224 280 336 392 448 for Sequencer2D at 224); the plot marks the "
                             "native size, the one its weights were trained at, whatever --img-size says")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for resolution.csv/.png")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=64, metavar="N")
    add_workers_argument(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_model_args(parser)


def run(args: argparse.Namespace) -> int:
    if not args.dataset_download and not os.path.exists(args.data):
        raise SequencerError(f"data folder {args.data!r} does not exist")
    workers = data_workers(args.workers)
    from ..data import create_dataset
    from ..engine.inference import (check_input_size, label_with_model_classes, resolve_device,
                                    split_to_evaluate)
    from ..fileio import output_folder
    from ..tools.resolution import default_sizes, plot_resolution, resolution_sweep, write_resolution_csv

    device = resolve_device(args.device)
    loaded = load_model_from_args(args, device)
    sizes = sorted(set(args.sizes or default_sizes(loaded.input_size[-1], getattr(loaded.model, "reduction", 1))))
    for size in sizes:  # fail before any evaluation
        check_input_size(loaded, size, size)
    # the data is checked before the output folder is made
    split = split_to_evaluate(loaded.checkpoint, args.data, args.split, args.dataset)
    label_with_model_classes(create_dataset(args.dataset, root=args.data, split=split,
                                            download=args.dataset_download), loaded)  # what downloads, once
    with output_folder(args.output) as out:  # a sweep that fails leaves no empty folder behind
        rows = resolution_sweep(loaded, args.data, split, sizes, batch_size=args.batch_size, workers=workers,
                                device=device, dataset=args.dataset)
        write_resolution_csv(rows, out / "resolution.csv")
        plot_resolution(rows, out / "resolution.png", f"{loaded.name}: accuracy vs input resolution",
                        train_size=loaded.trained_size)
    print(f"wrote {out / 'resolution.csv'} and {out / 'resolution.png'} (native size {loaded.trained_size} px)")
    return 0
