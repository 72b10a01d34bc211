"""The data of a training run: the training and held-out splits labelled by the training classes (a resumed run's
own), the head's size, and the checks that refuse or warn about class sets that cannot train as the user meant.

The held-out split is DATA's own (``val/``, ...), or carved from the training images by ``--val-fraction`` (a
resumed run holds out the files its checkpoint lists). DATA without split folders and no ``--val-fraction`` has
none: the run says so in one warning and trains without evaluation (never calling training images held-out)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..data.datasets import has_split, held_out_split, map_classes_by_name, reads_files
from ..data.splits import carve_held_out, split_by_keys
from ..errors import SequencerError
from . import distributed as dist_utils
from .config_checks import check_config, shorten_warmup
from .data_record import recorded_held_out
from .distributed import print_on_primary
from .guest import warn
from .resume import apply_resume_contract, resume_checkpoint
from .user_data import wrap_datasets


@dataclass
class TrainData:
    train_set: Any
    eval_set: Any  # None: no held-out split, nothing is evaluated
    class_names: list[str]
    num_classes: int  # the head's size: --num-classes, else the number of classes (a resumed model's own)
    resume_path: str = ""
    resume_ckpt: dict | None = None
    ignored_classes: list[str] = field(default_factory=list)  # class folders a --class-map left out
    tensors: bool = False  # the caller's Datasets yield tensors, used as given (no transforms)


def build_data(cfg, state, info: dist_utils.DistInfo) -> tuple[TrainData, object]:
    """The training and held-out splits (ours, or the caller's ``state.datasets``), labelled by the class names (a
    resumed run's own), and the checkpoint to resume, if any; with the run's settings (a copy of ``cfg`` with what
    a resume keeps from its checkpoint and the held-out split found)."""
    from ..data import create_dataset

    dataset_kw = dict(class_map=cfg.class_map or None, download=cfg.dataset_download)
    user_sets = wrap_datasets(state.datasets) if state.datasets is not None else None
    train_set = user_sets[0] if user_sets else create_dataset(cfg.dataset, root=cfg.data, split=cfg.train_split,
                                                              is_training=True, **dataset_kw)
    resume_path, resume_ckpt = resume_checkpoint(cfg, info)
    class_names = list(train_set.class_names)
    if resume_ckpt is not None:
        cfg = dataclasses.replace(cfg)  # the resume contract sets what it keeps on the run's own copy
        class_names = apply_resume_contract(cfg, state.given, resume_ckpt, resume_path, class_names)
        # the checkpoint's settings beside this start's are checked together (its `mixup` with a new odd `batch_size`)
        cfg = shorten_warmup(check_config(cfg, state), state)
        map_classes_by_name(train_set, class_names, "the training split")
    if user_sets:
        eval_set = user_sets[1]
        map_classes_by_name(eval_set, class_names, "the validation Dataset")
    else:
        train_set, eval_set, cfg = _held_out_split(cfg, state, info, dataset_kw, class_names, train_set,
                                                   resume_ckpt)
    dist_utils.check_same_data(info, len(train_set), len(eval_set) if eval_set is not None else None, class_names)
    num_classes = cfg.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise SequencerError(f"`num_classes={num_classes}` is smaller than the {len(class_names)} classes of the "
                             f"training data", hint=f"use `num_classes={len(class_names)}` or drop it")
    check_classes(cfg, info, train_set, class_names, num_classes)
    # the class folders a --class-map left out: checkpoints keep them, so validate leaves them out too
    ignored = sorted(set(train_set.ignored_classes) | set(getattr(eval_set, "ignored_classes", [])))
    if len(train_set) < cfg.batch_size * info.world_size:
        raise SequencerError(
            f"`batch_size={cfg.batch_size}` is larger than the training split ({len(train_set)} images"
            f"{f' over {info.world_size} processes' if info.distributed else ''})",
            hint=f"use `batch_size={max(1, len(train_set) // info.world_size // 2 * 2)}` or less")
    return TrainData(train_set, eval_set, class_names, num_classes, resume_path, resume_ckpt, ignored,
                     tensors=bool(user_sets and user_sets[0].tensors)), cfg


def check_classes(cfg, info, train_set, class_names: list[str], num_classes: int) -> None:
    """Refuse a one-class training set; warn about head outputs no image trains (a map naming classes without a
    folder, --num-classes above the class count)."""
    if len(class_names) < 2 and num_classes < 2:
        raise SequencerError(f"the training split ({train_set.description}) has a single class "
                             f"({', '.join(class_names)}): every image would be right",
                             hint="list two or more of its classes in `class_map`" if cfg.class_map
                             else "point `data` at the folder holding one sub-folder per class")
    if not info.is_primary:
        return
    present = {class_names[t] for t in _targets(train_set)} if hasattr(train_set, "samples") else set(class_names)
    empty = [n for n in class_names if n not in present]
    if empty:
        source = "the class map names" if cfg.class_map else "the model has"
        warn(f"the training split has no images of {len(empty)} class(es) {source} "
                      f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): their outputs never train")
    if num_classes > len(class_names):
        warn(f"`num_classes={num_classes}` is larger than the {len(class_names)} classes of the training "
                      f"data: outputs {len(class_names)}..{num_classes - 1} never train")


def _targets(dataset) -> list[int]:
    transform = dataset.target_transform or (lambda t: t)
    return [transform(t) for _, t in dataset.samples]


def _held_out_split(cfg, state, info, dataset_kw: dict, class_names: list[str], train_set,
                    resume_ckpt: dict | None) -> tuple:
    """(the training split, the held-out split or None, the settings with the held-out split found): DATA's own
    held-out split, one carved by --val-fraction
    (or the files a resumed checkpoint held out), or none where DATA has no split folders. Warnings wait in
    ``state.start_warnings`` for the run to start (a later one-line error stays the only line)."""
    carved = recorded_held_out(resume_ckpt)
    if cfg.val_fraction or carved is not None:
        return (*_carve(cfg, info, train_set, carved.files if carved is not None else None), cfg)
    if train_set.whole_root:
        if cfg.sched == "plateau":
            raise SequencerError(f"`sched=plateau` steps on the held-out metric, and {cfg.data} has no held-out split",
                                 hint="pass `val_fraction=0.1` to hold out a share, or another `sched`")
        state.start_warnings.append(f"{cfg.data} has no split folders, so no held-out split: training without "
                                    f"evaluation on all of it, checkpoints by epoch (pass `val_fraction=0.1` to "
                                    f"hold out a tenth)")
        return train_set, None, cfg
    return (train_set, *_eval_split(cfg, state, info, dataset_kw, class_names, train_set))


def _carve(cfg, info, train_set, files: list[str] | None) -> tuple:
    """(training split without the held-out files, the held-out files): ``files`` (a resumed run's), else a
    stratified ``--val-fraction`` share drawn with ``--seed``."""
    own = not reads_files(cfg.dataset) or \
        (not train_set.whole_root and has_split(cfg.data, held_out_split(cfg.data, cfg.val_split)))
    if own:
        raise SequencerError(f"`val_fraction={cfg.val_fraction}`: {cfg.dataset or cfg.data} has a held-out split of "
                             f"its own", hint="drop `val_fraction` (it is for data without a held-out split)")
    files = files if files is not None else carve_held_out(train_set, cfg.val_fraction, cfg.seed)
    train_set, eval_set = split_by_keys(train_set, files)
    eval_set.held_out_files = list(files)
    print_on_primary(info, f"note: holding out {len(eval_set)} of the {len(train_set) + len(eval_set)} training "
                           f"images (`val_fraction={cfg.val_fraction}`, seed {cfg.seed}; listed in val_files.txt)")
    return train_set, eval_set


def _eval_split(cfg, state, info, dataset_kw: dict, class_names: list[str], train_set):
    """(DATA's held-out split, its labels mapped by name onto the training classes (a missing class is reported);
    the settings with the split found); a warning where it shares files with the training split."""
    from ..data import create_dataset
    if "val_split" not in state.given and cfg.dataset.lower() in ("", "folder", "image_folder"):
        found = held_out_split(cfg.data, cfg.val_split)
        if found != cfg.val_split:
            print_on_primary(info, f"note: {cfg.data} has no {cfg.val_split!r} split: evaluating on {found!r}")
        cfg = dataclasses.replace(cfg, val_split=found)
    eval_set = create_dataset(cfg.dataset, root=cfg.data, split=cfg.val_split, is_training=False, **dataset_kw)
    shared = sorted(train_set.real_dirs & eval_set.real_dirs)
    if shared:  # e.g. val/dog -> ../train/dog
        state.start_warnings.append(f"the training split and split {cfg.val_split!r} share files (both read "
                                    f"{shared[0]}{f' and {len(shared) - 1} more folders' if len(shared) > 1 else ''}"
                                    f"): its top-1 is not held-out")
    missing = map_classes_by_name(eval_set, class_names, f"split {cfg.val_split!r}")
    if missing:
        print_on_primary(info, f"note: split {cfg.val_split!r} has no images of {len(missing)} of the {len(class_names)} "
                   f"training classes ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return eval_set, cfg
