"""The data a training run evaluated on, as its checkpoints record it, so that ``validate`` without DATA evaluates
the same split (and never a dataset the model was not trained on).

A checkpoint's ``data`` entry (one of the model-config keys, so ``checkpoint clean`` and safetensors files keep it)::

    {"dataset": "" | "digits" | "torch/NAME" | ...,  # train's --dataset ("" = image folders or a tar)
     "root": "/abs/path" | None,                     # train's DATA, made absolute (None for the digits)
     "split": "val"}                                 # the held-out split training evaluated on

A held-out split carved from the training images adds ``"files"``: its image paths relative to ``root``.
Checkpoints written before the entry existed are read from their ``args`` (train's flags) instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import SequencerError
from ..models.loading import checkpoint_metadata


@dataclass
class RecordedData:
    dataset: str  # "" (image folders or a tar), "digits", "torch/NAME", ...
    root: str | None
    split: str
    files: list[str] | None = None  # a carved held-out split's images, relative to root


def data_record(cfg) -> dict:
    """The ``data`` entry of a run's checkpoints, from its TrainConfig (``val_split`` as resolved for the run)."""
    return {"dataset": cfg.dataset or ("" if cfg.data else "digits"),
            "root": os.path.abspath(cfg.data) if cfg.data else None,
            "split": cfg.val_split}


def recorded_data(checkpoint: dict | None, source: str) -> RecordedData:
    """The data ``checkpoint`` (named ``source`` in messages) was trained and evaluated on; SequencerError (one
    line) when it does not say, or when its folder no longer exists."""
    meta = checkpoint_metadata(checkpoint)
    record = meta.get("data") or _record_from_args(meta.get("args"))
    if not record:
        raise SequencerError(f"{source} does not record the data it was trained on: DATA is needed",
                             hint="sequencer validate DATA --checkpoint ...")
    found = RecordedData(str(record.get("dataset") or ""), record.get("root"), str(record.get("split") or
                                                                                   "validation"),
                         list(record["files"]) if record.get("files") else None)
    if found.dataset != "digits" and (not found.root or not os.path.exists(found.root)):
        raise SequencerError(f"{source} was trained on {found.root or 'a dataset'!s}, which no longer exists "
                             f"here: DATA is needed", hint="sequencer validate DATA --checkpoint ...")
    return found


def _record_from_args(args) -> dict | None:
    """The record of a checkpoint written before checkpoints had one: its training flags (DATA as given)."""
    if not isinstance(args, dict) or not ("data" in args or "dataset" in args):
        return None
    dataset = args.get("dataset") or ("" if args.get("data") else "digits")
    return {"dataset": dataset, "root": args.get("data"), "split": args.get("val_split") or "validation"}
