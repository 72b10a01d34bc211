"""The data a training run evaluated on, as its checkpoints record it, so that ``validate`` without DATA evaluates
the same split (and never a dataset the model was not trained on).

A checkpoint's ``data`` entry (one of the model-config keys, so ``checkpoint clean`` and safetensors files keep it)::

    {"dataset": "" | "digits" | "torch/NAME" | ...,  # train's --dataset ("" = image folders or a tar)
     "root": "/abs/path" | None,                     # train's DATA, made absolute (None for the digits)
     "split": "val",                                 # the held-out split training evaluated on
     "train_split": "train"}                         # the split it trained on (absent in older checkpoints)

A held-out split carved from the training images (``--val-fraction``) has ``"split"`` the training split it was
carved from, and adds ``"files"``: its images' keys (`sequencer.data.splits`), relative to ``"files_in"`` (the
split's folder or tar, absolute). A run without a held-out split records ``"split": None``: it evaluated nothing.
Checkpoints written before the entry existed are read from their ``args`` (train's flags) instead. Beside it a
checkpoint records ``evaluated_weights``: whether its metrics are the EMA weights' (`evaluated_weights`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.class_folders import find_split_folder, has_split, split_aliases
from ..data.datasets import reads_files
from ..data.splits import split_by_keys
from ..errors import SequencerError
from ..models.loading import checkpoint_metadata, recorded_training_data


@dataclass
class RecordedData:
    dataset: str  # "" (image folders or a tar), "digits", "torch/NAME", ...
    root: str | None
    split: str
    files: list[str] | None = None  # a carved held-out split's images, as keys relative to files_in
    files_in: str | None = None


def data_record(cfg, held_out=None) -> dict:
    """The ``data`` entry of a run's checkpoints, from its TrainConfig (``val_split`` as resolved for the run) and
    its held-out dataset ``held_out`` (None: the run had no held-out split)."""
    record = {"dataset": cfg.dataset or ("" if cfg.data else "digits"),
              "root": os.path.abspath(cfg.data) if cfg.data else None,
              "split": cfg.val_split if held_out is not None else None, "train_split": cfg.train_split}
    files = getattr(held_out, "held_out_files", None)
    if files:
        record.update(split=cfg.train_split, files=list(files), files_in=os.path.abspath(held_out.root))
    return record


# the data record of a run on the caller's Datasets: nothing to find again, so validate asks for DATA
CALLERS_DATA = {"dataset": "the Datasets given to sequencer.train", "root": None, "split": "val"}


def evaluated_weights(opt, device: torch.device) -> str:
    """Whose held-out metrics the run's are (the best epoch is picked by them): "ema", the EMA weights' with
    ``model_ema``, else "model". An EMA kept on the CPU (``model_ema_force_cpu``) while training on a GPU is not
    evaluated, as in timm: the batches and the ranks' reductions live on the GPU."""
    ema = opt.model_ema
    return "ema" if ema is not None and next(ema.module.parameters()).device == device else "model"


def evaluated_data(cfg, state, eval_loader) -> dict:
    """The ``data`` record of the run's checkpoints (``data_record``): the held-out split it evaluates on; on the
    caller's Datasets, :data:`CALLERS_DATA` with ``images``, the validation Dataset's length (all a resume can tell
    another Dataset by: ``resume.evaluation_change``)."""
    if state.datasets is None:
        return data_record(cfg, getattr(eval_loader, "dataset", None))
    return {**CALLERS_DATA, "images": len(eval_loader.dataset)}


def recorded_data(checkpoint: dict | None, source: str, evaluated: str = "the `checkpoint`") -> RecordedData:
    """The data ``checkpoint`` (named ``source`` in messages) was trained and evaluated on; SequencerError (one
    line) when it does not say, or when its folder no longer exists; its hint names what is ``evaluated`` as the
    caller gave it ("the `checkpoint`"; "it": ``source``, an ONNX file or a model by name)."""
    record = recorded_training_data(checkpoint)
    on_data = f"pass `data`, the images to evaluate {evaluated} on"
    if not record:
        raise SequencerError(f"{source} does not record the data it was trained on: `data` is needed", hint=on_data)
    if "split" in record and record["split"] is None:
        raise SequencerError(f"{source} was trained on all of {record.get('root')} (no held-out split): `data` is "
                             f"needed", hint=f"pass `data`: images {evaluated} did not train on")
    found = RecordedData(str(record.get("dataset") or ""), record.get("root"), str(record.get("split") or
                                                                                   "validation"),
                         list(record["files"]) if record.get("files") else None, record.get("files_in"))
    if found.dataset != "digits" and (not found.root or not os.path.exists(found.root)):
        raise SequencerError(f"{source} was trained on {found.root or 'a dataset'!s}, which no longer exists "
                             f"here: `data` is needed", hint=on_data)
    return found


def recorded_held_out(checkpoint: dict | None) -> RecordedData | None:
    """The held-out files a checkpoint's run carved from its training images (``--val-fraction``), or None."""
    record = checkpoint_metadata(checkpoint).get("data") or {}
    if not record.get("files"):
        return None
    return RecordedData(str(record.get("dataset") or ""), record.get("root"), str(record.get("split")),
                        list(record["files"]), record.get("files_in"))


def _same_folder(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    return bool(a and b and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def trained_on_all_of(dataset, checkpoint: dict | None) -> bool:
    """True when ``checkpoint``'s run trained on all of ``dataset`` (its DATA had no held-out split)."""
    record = checkpoint_metadata(checkpoint).get("data") or {}
    return "split" in record and record["split"] is None and _same_folder(getattr(dataset, "root", None),
                                                                           record.get("root"))


def _read_as_the_run_did(record: dict, data, dataset: str) -> bool:
    """Whether ``data`` (a --dataset ``dataset``'s DATA) is the run's DATA (its ``data`` ``record``) read as it read
    it: as files by both (``dataset`` "" or "tar"), or as the same dataset (never the torchvision dataset a download
    folder beside its image folders holds, whose split of the same name is other images)."""
    ran_on = str(record.get("dataset") or "")
    if ran_on.lower() == "digits" or (dataset or "").lower() == "digits":
        return ran_on.lower() == (dataset or "").lower()
    same_reader = _both_read_files(record, dataset) or (dataset or "").lower() == ran_on.lower()
    return same_reader and _same_folder(data, record.get("root"))


def _both_read_files(record: dict, dataset: str) -> bool:
    """Whether the run (its ``data`` ``record``) and a --dataset ``dataset`` both read DATA's own files."""
    return reads_files(dataset) and reads_files(record.get("dataset"))


def _names_split(split: str, name: str) -> bool:
    """Whether ``split`` names the split ``name`` (one of its synonyms, in any case)."""
    return split.lower() in {alias.lower() for alias in split_aliases(name)}


def evaluated_split_of(checkpoint: dict | None, data, dataset: str = "") -> str | None:
    """The split of ``data`` that ``checkpoint``'s run evaluated on when ``data`` is its DATA read as it read it (a
    carved held-out split (`val_fraction`): the training split it was carved from); None otherwise, and where the
    run evaluated nothing or records nothing."""
    record = recorded_training_data(checkpoint)
    if not record or not record.get("split") or not _read_as_the_run_did(record, data, dataset):
        return None
    return str(record["split"])


def training_split_evaluated(checkpoint: dict | None, data, dataset: str, split: str) -> str | None:
    """What names the images, for a warning, where ``split`` of ``data`` ("split 'train' of DATA"), or ``data``
    itself (the folder of that split given as DATA: "DATA/train"), is the split ``checkpoint``'s run trained on, as
    far as it records it: its ``data`` record's ``train_split``, else its ``args``' (a training checkpoint from
    before). None otherwise, and where the run carved its held-out files from it (they alone are evaluated) or
    trained on all of DATA (`trained_on_all_of` says so)."""
    record = recorded_training_data(checkpoint)
    if not record or not record.get("split") or record.get("files"):
        return None
    args = checkpoint_metadata(checkpoint).get("args")
    trained = record.get("train_split") or (args.get("train_split") if isinstance(args, dict) else None)
    if not trained:
        return None
    if _names_split(split, str(trained)) and _read_as_the_run_did(record, data, dataset):
        return f"split {split!r} of {data or dataset}"
    folder = _split_folder(record.get("root"), str(trained))
    return str(data) if _both_read_files(record, dataset) and _same_folder(data, folder) else None


def split_evaluated_elsewhere(checkpoint: dict | None, data, dataset: str, split: str) -> tuple[str, str] | None:
    """(the split, its DATA) ``checkpoint``'s run evaluated on, where ``data`` is not that DATA but holds a split
    of that name other than ``split`` (a copy of the run's DATA, say, whose ``split`` is not what the run logged);
    None otherwise, and for held-out files carved by `val_fraction` (no other folder holds them)."""
    record = recorded_training_data(checkpoint)
    if not record or not record.get("split") or record.get("files") or not _both_read_files(record, dataset):
        return None
    ran = str(record["split"])
    if _names_split(split, ran) or _same_folder(data, record.get("root")) or \
            not has_split(data, ran):
        return None
    return ran, str(record.get("root"))


def _split_folder(root: str | None, split: str) -> str | None:
    """The folder (or .tar) of ``split`` in the folder ``root``; None where it has none or ``root`` is no folder."""
    if not root or not os.path.isdir(root):
        return None
    try:
        folder = find_split_folder(root, split)
    except SequencerError:
        return None
    return folder if folder != root else None


def keep_held_out_files(dataset, checkpoint: dict | None) -> tuple:
    """(``dataset`` restricted to the held-out files ``checkpoint`` records, how many it records) when it is the
    split they were carved from (the run's DATA, or its training split); otherwise (``dataset``, 0). SequencerError
    where none of them is in it any more (moved or renamed: its top-1 was 0.000 on 0 images)."""
    held_out = recorded_held_out(checkpoint)
    root = getattr(dataset, "root", None)
    if held_out is None or not _same_folder(root, held_out.files_in):
        return dataset, 0
    kept = split_by_keys(dataset, held_out.files)[1]
    if not len(kept):
        raise SequencerError(f"none of the {len(held_out.files)} images the checkpoint's run held out of {root} "
                             f"(`val_fraction`) is there any more (moved or renamed?)",
                             hint="put them back, or pass `data`: images the run did not train on")
    return kept, len(held_out.files)
