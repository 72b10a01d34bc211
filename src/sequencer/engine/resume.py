"""The resume contract of ``sequencer train`` (docs/training.md, "What a resume keeps"):

- **From the checkpoint, never changed by a flag:** the model (``--model``, ``--model-kwargs``, ``--in-chans``,
  the head size ``--num-classes``), the classes and their names (the training split must hold the same classes),
  the optimizer and scheduler kind (``--opt``, ``--sched``; both may change with ``--no-resume-opt``), the
  ``--eval-metric`` that picks the best epoch, the held-out share ``--val-fraction`` (a resume holds out the files
  its checkpoint lists, so such a run's ``--val-split`` is fixed too). A flag that names another value is refused
  with one line naming both.
- **From the checkpoint unless a flag (or ``--config``) says otherwise:** every other training setting (epochs,
  lr and schedule shape, batch size, augmentation, EMA, drop rates, seed, the image size the model is rebuilt at
  (``train_model``), ...), checked together with the flags given (``config_checks``). A larger ``--epochs`` extends the
  run: the schedule is rebuilt for the new length and continues from the checkpoint's position. The lr kept is the
  one the run derived; a new ``--lr-base*`` without ``--lr`` derives it again. The optimizer's state is resumed
  with this start's hyperparameters (``checkpoint.load_optimizer_state``).
- **A recovery checkpoint's interrupted epoch goes on after its last update** (``loop.resumed_progress``): the rest
  of its batches, once each, when the data is split as before; otherwise the epoch re-runs from its beginning.
- **A resume that evaluates otherwise** (other weights: ``--model-ema`` switched; another held-out split) picks
  its best epoch again from the resumed epoch on, with a warning naming both (``evaluation_change``,
  ``outputs.prepare_outputs``). Another autocast (``--amp`` switched) does not count: bf16 and float32 validation
  differ by an image or two, in no direction (measured: docs/training.md, "What a resume keeps").
- **Never from the checkpoint (this machine's and this start's business):** the data (not its split names: a
  resume evaluates on the split its best epoch was picked on), the output folder and experiment name, the device,
  ``--workers``, ``--log-interval``, ``--start-epoch``, ``--pretrained`` and ``--initial-checkpoint``.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ..data.class_folders import class_name, split_aliases
from ..errors import SequencerError
from ..models.loading import evaluated_weights_of, read_checkpoint
from . import distributed as dist_utils
from .checkpoint import find_auto_resume, set_rng_state
from .config import LR_SCALING, TrainConfig
from .config_checks import check_experiment_name
from .data_record import CALLERS_DATA, recorded_held_out
from .guest import warn
from .inference import refuse_segmentation_checkpoint

_logger = logging.getLogger(__name__)

# settings (args keys) a resume keeps from its checkpoint; KEPT_WITH_STATE only with the optimizer state
KEPT_WITH_STATE = ("opt", "sched")
KEPT = ("model_kwargs", "in_chans", "eval_metric", "val_fraction")
# (``input_size`` is read as ``in_chans`` and ``img_size``, which are kept: a resume's own ``img_size`` then wins;
# the split names are kept: DATA may move, but a resume evaluating on another split would mix its best epoch's)
_KEPT_HINTS = {**dict.fromkeys(KEPT_WITH_STATE, " or pass `no_resume_opt` to start a fresh optimizer"),
               "val_split": " (its run evaluates on the files it held out by `val_fraction`)"}
NOT_INHERITED = {"data", "data_dir", "dataset", "class_map", "dataset_download", "config",
                 "resume", "experiment", "output", "device", "workers", "log_interval", "start_epoch", "local_rank",
                 "pretrained", "initial_checkpoint", "initial_checkpoint_ema", "no_resume_opt",
                 "input_size"}


def experiment_folder(cfg: TrainConfig) -> Path:
    """``OUTPUT/EXPERIMENT`` for a run with ``--experiment`` (a folder name, never a path out of OUTPUT)."""
    check_experiment_name(cfg.experiment)
    return Path(cfg.output or "./output/train") / cfg.experiment


def locate_resume(cfg: TrainConfig, info: dist_utils.DistInfo) -> str:
    """The checkpoint to resume ("" for none), found without creating anything; rank 0 decides for ``auto``."""
    if cfg.resume != "auto":
        return cfg.resume or ""
    found = None
    if info.is_primary:
        folder = experiment_folder(cfg)
        found = find_auto_resume(folder) if folder.is_dir() else None
        # "nothing to resume, starting" was said before a folder holding a run is refused (outputs.make_output_dir)
        _logger.info(f"`resume=auto`: {'continuing from ' + str(found) if found else f'nothing to resume in {folder}'}")
    found = dist_utils.broadcast_object(str(found) if found else "", info)
    return found


def resume_checkpoint(cfg: TrainConfig, info: dist_utils.DistInfo, command: str = "train"
                      ) -> tuple[str, dict | None]:
    """(the checkpoint to resume, "" for none; its contents) on every rank: the file rank 0 found
    (:func:`locate_resume`), as :func:`read_on_every_rank` reads it for ``command`` ("train" or "segment train")."""
    path = locate_resume(cfg, info)
    return path, read_on_every_rank(path, info, command) if path else None


def read_on_every_rank(path: str, info: dist_utils.DistInfo, command: str = "train") -> dict:
    """Rank 0's training checkpoint at ``path`` (:func:`read_resume_checkpoint`), on every rank.

    Where every rank sees rank 0's file (a shared filesystem: the same size and modification time), each reads it
    itself. Otherwise rank 0 reads it and sends it to the others: on nodes without a shared filesystem only rank
    0's node holds the run's checkpoints (it alone writes them), and another node has no file at that path (it
    failed: "does not exist"), or an older run's file of that name, which would resume another position.
    """
    if not info.distributed:
        return read_resume_checkpoint(path, command)
    stamps = dist_utils.all_gather_object(_file_stamp(path), info)
    if stamps[0] is not None and all(stamp == stamps[0] for stamp in stamps):
        return read_resume_checkpoint(path, command)
    checkpoint = read_resume_checkpoint(path, command) if info.is_primary else None  # an error on rank 0 stops every rank
    return dist_utils.broadcast_object(checkpoint, info)


def _file_stamp(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of the file at ``path``; None where there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_size, found.st_mtime_ns) if stat.S_ISREG(found.st_mode) else None


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (", ..." if len(names) > 5 else "")


def apply_resume_contract(cfg: TrainConfig, given: frozenset[str], checkpoint: dict, path: str,
                          train_classes: list[str]) -> list[str]:
    """Check the flags against the checkpoint, take the settings it keeps, and return the run's class names.
    ``given``: the settings the user chose (the others come from the checkpoint).

    Raises SequencerError (one line naming both values) for a flag or training split that contradicts it.
    """
    saved = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    arch = checkpoint.get("arch") or saved.get("model")
    if cfg.model and "model" in given and arch and cfg.model != arch:
        raise SequencerError(f"`resume={path}`: `model={cfg.model}` vs the checkpoint's {arch}",
                             hint="drop `model` when resuming (a resume keeps its model)")
    # a run that held out files of its training images (`val_fraction`) evaluates on them: no split name applies
    carved = ("val_split",) if recorded_held_out(checkpoint) is not None else ()
    kept = KEPT + (() if cfg.no_resume_opt else KEPT_WITH_STATE) + carved
    for key in kept:
        recorded = _recorded(key, saved, checkpoint)  # None given (an args.yaml's `in_chans: null`) asks for nothing
        if key in given and None not in (getattr(cfg, key), recorded) and _differs(getattr(cfg, key), recorded):
            extra = _KEPT_HINTS.get(key, "")
            raise SequencerError(f"`resume={path}`: `{key}={_show(getattr(cfg, key))}` vs the checkpoint's "
                                 f"{_show(recorded)}", hint=f"drop `{key}` when resuming{extra}")
    head = (checkpoint.get("model_kwargs") or {}).get("num_classes")
    if "num_classes" in given and cfg.num_classes is not None and head is not None and cfg.num_classes != head:
        raise SequencerError(f"`resume={path}`: `num_classes={cfg.num_classes}` vs the checkpoint's {head}-class "
                             f"head", hint="drop `num_classes` when resuming")
    class_names = [class_name(c) for c in checkpoint.get("class_names") or train_classes]
    if set(class_names) != set(train_classes):
        raise SequencerError(
            f"`resume={path}`: the checkpoint's {len(class_names)} classes ({_names(class_names)}) vs the training "
            f"split's {len(train_classes)} ({_names(train_classes)})",
            hint="resume on the data the run was trained on, or start a new run with `initial_checkpoint`")
    # the checkpoint's lr is the one its run derived from `lr_base`; a new `lr_base*` without `lr` derives it again
    rederive_lr = "lr" not in given and any(key in given for key in LR_SCALING)
    for key, value in saved.items():
        if key not in given and key not in NOT_INHERITED and not key.startswith("_") and hasattr(cfg, key) and \
                not (key == "lr" and rederive_lr):
            setattr(cfg, key, value)
    if arch:
        cfg.model = arch
    return class_names


def _recorded(key: str, saved: dict, checkpoint: dict):
    """The checkpoint's value of a kept setting: its args', else (``in_chans`` not given to that run) its model's."""
    if saved.get(key) is None and key == "in_chans":
        return (checkpoint.get("model_kwargs") or {}).get("in_chans")
    return saved.get(key)


def _differs(a, b) -> bool:
    return _normal(a) != _normal(b)


def _normal(value):
    """Compare flags as YAML stores them: tuples as lists, names case-insensitively."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    return value.lower() if isinstance(value, str) else value


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def evaluation_change(checkpoint: dict | None, weights: str, record: dict) -> tuple[str, str] | None:
    """(what the resumed run's epochs were evaluated on, what this run evaluates) where the two differ, so that their
    metrics cannot be compared: the EMA's weights or the model's own (``model_ema`` turned on or off), another
    held-out split (``val_split``), a held-out split where there was none (or the reverse), the caller's validation
    Dataset where a split was evaluated (or the reverse), or one of another length. ``weights``:
    ``data_record.evaluated_weights``; ``record``: this run's ``data`` record (``data_record.evaluated_data``). None
    when they are the same, when nothing was or is evaluated, and for the split of a checkpoint that records no
    ``data``."""
    if checkpoint is None:
        return None
    weights_before = evaluated_weights_of(checkpoint)
    record_before = checkpoint.get("data") if isinstance(checkpoint.get("data"), dict) else record
    if _held_out(record_before, record) == _held_out(record, record_before) and \
            (weights_before == weights or record.get("split") is None):
        return None
    return _evaluated(weights_before, record_before), _evaluated(weights, record)


def _held_out(record: dict, other: dict) -> tuple:
    """The held-out split of a ``data`` record, as compared with ``other``'s: its name (None: nothing evaluated; its
    synonyms count as one: "validation" finds val/ as "val" does), whether it was carved, and whether it is the
    caller's validation Dataset, with its length where both records have one (older checkpoints have none)."""
    split = record.get("split")
    callers = record.get("dataset") == CALLERS_DATA["dataset"]
    images = record.get("images") if callers and "images" in other else None
    return (split and frozenset(name.lower() for name in split_aliases(split)), bool(record.get("files")), callers,
            images)


def _evaluated(weights: str, record: dict) -> str:
    split, carved = record.get("split"), bool(record.get("files"))
    if split is None:
        return "nothing (no held-out split)"
    if record.get("dataset") == CALLERS_DATA["dataset"]:
        count = f" of {record['images']} images" if record.get("images") is not None else ""
        images = f"the validation Dataset{count} given to sequencer.train"
    else:
        images = f"the {len(record['files'])} images held out of {split!r}" if carved else f"split {split!r}"
    return f"the {'EMA' if weights == 'ema' else 'raw model'} weights on {images}"


# the setting that starts a new run of each command from weights a resume cannot take
_STARTS_FROM_WEIGHTS = {"train": "initial_checkpoint", "segment train": "backbone_checkpoint"}


def read_resume_checkpoint(path: str, command: str = "train") -> dict:
    """The checkpoint to resume; SequencerError for a file that is not a training checkpoint of ``command``'s
    ("train" or "segment train": `segment train` named `sequencer train` and its `initial_checkpoint`, a setting it
    does not have), the other command's one included."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "epoch" not in checkpoint:
        raise SequencerError(f"`resume={path}`: not a training checkpoint written by `sequencer {command}`",
                             hint=f"use `{_STARTS_FROM_WEIGHTS[command]}` to start a new run from these weights")
    _check_command(checkpoint, path, command)
    return checkpoint


def _check_command(checkpoint: dict, path: str, command: str) -> None:
    """SequencerError (one line) where the training ``checkpoint`` at ``path`` is the other command's: a segmenter
    (``segmenter`` config) to resume with `sequencer train`, a classifier to resume with `segment train`."""
    if command == "train":
        # it was refused for its classes, or for its weights' keys, a page of names
        refuse_segmentation_checkpoint(checkpoint, f"`resume={path}`",
                                       hint="resume it with `sequencer segment train` (train_segmenter)")
    elif not isinstance(checkpoint.get("segmenter"), dict):  # `resume=auto` said "`resume=auto`: ...", no file
        classifier = isinstance(checkpoint.get("arch"), str)
        raise SequencerError(f"`resume={path}`: not a segmentation checkpoint written by `sequencer segment "
                             f"train`{' but a classifier of `sequencer train`' if classifier else ''}",
                             hint="resume it with `sequencer train`; `backbone_checkpoint` starts a new segmenter "
                                  "from its backbone" if classifier else "")


def reseed_unless_resumed(checkpoint: dict, seed: int, info: dist_utils.DistInfo) -> None:
    """This rank's random state from a resumed ``checkpoint`` (one per rank), or seeded with ``seed`` and the rank
    where it holds none or another number of ranks' (said once, by rank 0: every rank resumes rank 0's checkpoint,
    so all of them reseed; each rank said so, 8 lines on 8 GPUs)."""
    from timm.utils import random_seed

    rng = checkpoint.get("rng_state")
    if isinstance(rng, list) and len(rng) == info.world_size:
        set_rng_state(rng[info.rank])
        return
    if info.is_primary:
        warn("`resume`: RNG state missing or from another number of processes; reseeding")
    random_seed(seed, info.rank)
