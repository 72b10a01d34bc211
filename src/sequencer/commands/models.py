"""`sequencer models`: a table of the registered models with parameters, GMACs, input size and weights.

Models are built on the ``meta`` device (no memory, no weight init) and their multiply-adds counted from shapes
(:func:`sequencer.models.flops.count_macs`), so listing all of them takes a few seconds on a CPU.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import SequencerError, warnings_ignored
from .common import positive_int

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*",
                        help="shell-style name filter, e.g. 'sequencer2d_*' or '*392' (default: all)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=None, metavar="PX",
                        help="also give GMACs at these square input sizes (e.g. --sizes 160 392 448)")
    parser.add_argument("--pretrained", action="store_true", help="only models with released weights")


def model_summary(name: str, sizes: tuple[int, ...] = ()) -> dict:
    """Params, GMACs at the default input size (and at each of ``sizes`` px) of a registered model.

    The model is built on the meta device, so this is cheap even for the large models.
    """
    import torch

    from ..models.flops import count_macs
    from ..models.registry import create_model, get_model_entry, has_pretrained_weights

    entry = get_model_entry(name)
    with torch.device("meta"), warnings_ignored(categories=(Warning,)):  # init on meta tensors may warn
        model = create_model(name)
    input_size = tuple(model.pretrained_cfg["input_size"])
    # None at a size the model refuses elsewhere (validate, benchmark): its forward would crop the input silently
    gmacs_at = {px: count_macs(model, (input_size[0], px, px)) / 1e9 if _takes(model, px) else None for px in sizes}
    return dict(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        head_classes=getattr(model, "num_classes", None),  # the params include this classifier
        gmacs=count_macs(model, input_size) / 1e9,
        input_size=input_size,
        pretrained=has_pretrained_weights(entry.pretrained_cfg),
        gmacs_at=gmacs_at,
    )


def _takes(model: torch.nn.Module, px: int) -> bool:
    """Whether ``model`` takes a ``px`` x ``px`` input (a multiple of its patch reduction)."""
    try:
        getattr(model, "check_input_size", lambda h, w: None)(px, px)
    except ValueError:
        return False
    return True


def format_table(rows: list[dict], sizes: tuple[int, ...] = ()) -> str:
    heads = {r["head_classes"] for r in rows}
    one_head = heads.pop() if len(heads) == 1 else None  # the params include the classifier: name its size
    params = f"params (M, {one_head}-class head)" if one_head else "params (M, head classes)"
    header = ["model", params, "GMACs", "input size", "pretrained"] + [f"GMACs@{px}" for px in sizes]
    lines = [header]
    for r in rows:
        count = f"{r['params'] / 1e6:.2f}" + ("" if one_head else f" ({r['head_classes']})")
        lines.append([r["name"], count, f"{r['gmacs']:.2f}",
                      "x".join(str(s) for s in r["input_size"]), "yes" if r["pretrained"] else "no"]
                     + ["-" if r["gmacs_at"][px] is None else f"{r['gmacs_at'][px]:.2f}" for px in sizes])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # name left-aligned, numbers right-aligned
    out = ["  ".join(c.ljust(w) if i == 0 or i == 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           .rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if any(v is None for r in rows for v in r["gmacs_at"].values()):
        out += ["", "-: the model does not take that size (not a multiple of its patch reduction)"]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from ..models.registry import list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        raise SequencerError(f"no model matches {args.pattern!r}" + (" with released weights" if args.pretrained
                                                                      else ""),
                             hint="run `sequencer models` for the full list")
    sizes = tuple(args.sizes or ())
    rows = [model_summary(n, sizes) for n in names]
    print(format_table(rows, sizes))
    return 0
