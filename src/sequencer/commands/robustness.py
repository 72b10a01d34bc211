"""`sequencer robustness`: ImageNet-C errors and mCE by the paper's protocol (:mod:`sequencer.tools.robustness`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..fileio import existing_folder, write_atomically
from .common import (add_model_args, add_workers_argument, check_results_file, data_workers, load_model_from_args,
                     positive_int)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA_C", help="ImageNet-C folder: CORRUPTION/SEVERITY/CLASS/IMAGE")
    parser.add_argument("--results-file", required=True, metavar="R.json", help="where to write the results (JSON)")
    parser.add_argument("--clean", default=None, metavar="DATA", help="clean dataset, for the relative mCE")
    parser.add_argument("--clean-split", default=None,
                        help="split of --clean to evaluate (default: the one validate evaluates: the split the "
                             "checkpoint's run evaluated on where --clean is its DATA (a --val-fraction run: its "
                             "held-out images), else val, or test where --clean has train/ and test/ only)")
    parser.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                        help="exactly these corruptions (default: the 15 standard ones present)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=64, metavar="N")
    add_workers_argument(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_model_args(parser)


def run(args: argparse.Namespace) -> int:
    check_results_file(args.results_file)  # first: it is cheap, the data scan is not
    workers = data_workers(args.workers)
    from ..engine.inference import check_input_size, resolve_device
    from ..tools.robustness import find_corruptions, mean_corruption_error, select_corruptions

    if args.clean:  # before the corruptions' scan, which may warn
        existing_folder(args.clean, "clean data folder")
    corruptions = select_corruptions(find_corruptions(args.data), args.corruptions, args.data)
    device = resolve_device(args.device)
    loaded = load_model_from_args(args, device)
    check_input_size(loaded, *loaded.input_size[1:])
    summary = mean_corruption_error(loaded, corruptions, batch_size=args.batch_size, workers=workers, device=device,
                                    clean=args.clean, clean_split=args.clean_split)
    results = dict(model=loaded.name, checkpoint=args.checkpoint or ("pretrained" if args.pretrained else ""),
                   img_size=loaded.input_size[-1], **summary)
    _print_summary(results, len(results["corruptions"]) - len(results["without_ce"]))
    text = json.dumps(results, indent=2) + "\n"
    write_atomically(args.results_file, lambda tmp: Path(tmp).write_text(text))
    print(f"results written to {args.results_file}")
    return 0


def _print_summary(results: dict, n_ce: int) -> None:
    """The mCE line; it says when the mCE is not the published kind (the 15 standard corruptions, each at all five
    severities: ``mCE_standard15``), which then is printed beside it where it exists."""
    if results["mCE"] is None:
        return
    relative = results.get("relative_mCE")
    standard15 = results.get("mCE_standard15")
    if standard15 is not None and n_ce == 15:
        caveat = " (the 15 standard corruptions, all five severities)"
    elif standard15 is not None:
        caveat = f"; over the 15 standard corruptions alone (the published mCE): {standard15:.4f}"
    else:
        from ..tools.robustness import STANDARD_CORRUPTIONS

        present = sum(n in STANDARD_CORRUPTIONS for n in results["corruptions"])
        short = sorted(results["protocol"]["missing_severities"])
        caveat = (f"; not comparable to a published mCE ({present} of the 15 standard corruptions"
                  + (f"; {', '.join(short)} lacking severities" if short else "") + ")")
    print(f"mCE {results['mCE']:.4f} ({100 * results['mCE']:.2f}%), unnormalized "
          f"{results['unnormalized_mCE']:.4f}, over {n_ce} corruption(s)"
          + (f", relative mCE {relative:.4f}" if relative is not None else "") + caveat)
