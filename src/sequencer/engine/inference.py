"""Inference plumbing that validation, the tools and the commands share: loading a model with its class names and
preprocessing, devices, input checks, image files and evaluation loaders, and the relative error exports and
benchmarks report.

A checkpoint written by ``sequencer train`` stores the model name (``arch``), its constructor arguments
(``model_kwargs``), the class names and the data config, so ``--checkpoint PATH`` alone rebuilds the model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import create_dataset, create_loader, create_transform, load_image, resolve_data_config
from ..data.class_folders import class_name
from ..data.datasets import READ_ERRORS, drop_classes, held_out_split, map_classes_by_name
from ..errors import SequencerError
from ..models import create_model, get_model_entry, has_pretrained_weights
from ..models.loading import checkpoint_metadata, picked_weights, read_checkpoint, recorded_probabilities
from ..models.registry import ReadCheckpoint
from .data_record import (evaluated_split_of, keep_held_out_files, split_evaluated_elsewhere, trained_on_all_of,
                          training_split_evaluated)
from .guest import cpu_default_device, warn

_logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    class_names: list[str] | None
    input_size: tuple[int, int, int]
    data_config: dict = field(default_factory=dict)  # mean, std, crop_pct, interpolation
    checkpoint: dict | None = None
    # a module in memory: the names its pretrained_cfg gives its outputs (`label_names`, e.g. a checkpoint's class
    # names that create_model(checkpoint_path=...) put there); a dataset sharing names with them is mapped by name
    output_names: list[str] | None = None
    # which of the checkpoint's weights it holds: "ema", "model", or None where the file does not say
    # (models.loading.picked_weights)
    weights: str | None = None
    # the input size its weights were trained and evaluated at (`input_size` is the one it runs at); None for a
    # model that does not say (an ONNX file from before `sequencer export` recorded it, a module in memory)
    trained_size: int | None = None
    # how its logits become probabilities: "softmax", or "sigmoid" for a run trained with a binary cross-entropy loss
    # (`bce_loss`); None for a file of ours that does not say (cleaned, averaged or exported before it was recorded)
    probabilities: str | None = "softmax"
    # how messages name the file it was read from where that is not a `checkpoint` (an ONNX file's "ONNX file
    # 'm.onnx'"); None otherwise
    source: str | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def refuse_segmentation_checkpoint(checkpoint: dict | None, source: str, hint: str = "") -> None:
    """SequencerError (one line) when ``checkpoint`` was written by ``sequencer segment train``, where a classifier's
    checkpoint is expected; ``source`` names the file as the caller's message would, ``hint`` what to do instead
    (by default: the segment commands that evaluate it)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint_metadata(checkpoint).get("segmenter"), dict):
        raise SequencerError(f"{source} is a segmentation model (written by `sequencer segment train`), not a "
                             "classifier", hint=hint or "evaluate it with `sequencer segment validate` or `segment "
                             "predict` (sequencer.engine.segmentation_eval); a classifier starts from a "
                             "classification checkpoint")


def load_model(checkpoint: str = "", model: str | None = None, pretrained: bool = False,
               num_classes: int | None = None, img_size: int | None = None,
               input_size: tuple[int, int, int] | None = None, use_ema: bool | None = None,
               device: torch.device | str = "cpu", model_kwargs: dict | None = None) -> LoadedModel:
    """The model a checkpoint (ours, the release's, timm's or .safetensors) and/or a model name describe, in eval
    mode on ``device``, with its class names and preprocessing; SequencerError (one line) on bad input. The
    arguments are the model flags of ``sequencer validate``, ``predict``, ``export``... (``--use-ema`` /
    ``--no-ema`` are ``use_ema=True`` / ``False``; by default a checkpoint's weights are those its run evaluated:
    ``models.loading.picked_weights``). ``model_kwargs``: the architecture arguments of a model built by name
    without a checkpoint (what an ONNX file of ours records, for ``benchmark --onnx``)."""
    path = str(checkpoint or "")
    if pretrained and path:  # one of them would be ignored
        raise SequencerError(f"`pretrained=True` and `checkpoint={path}` name two sets of weights",
                             hint="pass one: `pretrained=True` loads the released weights, `checkpoint` a file")
    checkpoint = read_checkpoint(path) if path else None
    meta = checkpoint_metadata(checkpoint)
    name = _model_name(model, checkpoint, meta, path)
    if pretrained and checkpoint is None and num_classes:
        _check_released_head(name, num_classes)
    if checkpoint is None:
        kwargs = dict(model_kwargs or {})
    else:
        kwargs = dict(meta.get("model_kwargs") or {}) if meta.get("arch") == name else {}
    for k in ("drop_rate", "drop_path_rate"):
        kwargs.pop(k, None)
    class_names = [class_name(n) for n in meta["class_names"]] if meta.get("class_names") else None
    if num_classes:
        kwargs["num_classes"] = num_classes
    elif class_names and "num_classes" not in kwargs:
        kwargs["num_classes"] = len(class_names)
    img_size = input_size[1] if input_size else img_size
    # the size the weights' run trained and evaluated at: an export's `trained_size`, else the file's data config's
    # (a training checkpoint's, or an export's from before `trained_size`), else the one its model was built at,
    # else the registry's
    recorded_size = (meta.get("data_config") or {}).get("img_size")
    trained_size = int(meta.get("trained_size") or recorded_size or kwargs.get("img_size")
                       or get_model_entry(name).pretrained_cfg["input_size"][-1])
    if input_size and input_size[1] != input_size[2]:
        raise SequencerError(f"`input_size={' '.join(map(str, input_size))}`: only square inputs are supported")
    if input_size:
        kwargs["in_chans"] = input_size[0]
    if img_size is not None:  # 0 too: create_model refuses it, not taken for 'not given'
        kwargs["img_size"] = img_size
    # one flow with create_model(checkpoint_path=...): the file (read once, above) is the model
    read = ReadCheckpoint(checkpoint, f"checkpoint {path!r}") if checkpoint is not None else None
    with cpu_default_device():  # then moved to `device`: a caller's default device (meta: no weights) is not it
        model = create_model(name, pretrained=bool(pretrained and checkpoint is None), checkpoint_path=read,
                             use_ema=use_ema, **kwargs)
    weights = picked_weights(checkpoint, use_ema) if checkpoint is not None else None
    cfg = dict(model.pretrained_cfg)
    data_config = dict(mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                       interpolation=cfg["interpolation"])
    data_config.update(meta.get("data_config") or {})
    size = img_size or int(recorded_size or trained_size)  # by default the size the file's preprocessing is for
    # one value per input channel, as validate resolves them (a 1-channel run of an RGB checkpoint averages its
    # recorded statistics), so every user of the config (predict, erf, robustness, resolution-sweep) normalises alike
    channels = resolve_data_config(dict(input_size=(model.in_chans, size, size)), model, recorded=data_config)
    data_config.update(mean=channels["mean"], std=channels["std"])
    if class_names is None:
        class_names = _cfg_class_names(cfg, getattr(model, "num_classes", None))
    if class_names is None and getattr(model, "num_classes", 0) == 1000:
        from ..data.imagenet_classes import IMAGENET_CLASSES
        class_names = list(IMAGENET_CLASSES)
    model.eval().to(device)
    # a file that records no model config (the authors' release, timm's weights) is cross-entropy trained
    probabilities = recorded_probabilities(checkpoint) or (None if meta.get("arch") else "softmax")
    return LoadedModel(model, name, class_names, (model.in_chans, size, size), data_config, checkpoint,
                       weights=weights, trained_size=trained_size, probabilities=probabilities)


def _check_released_head(name: str, num_classes: int) -> None:
    """SequencerError where the released weights' head has another class count than ``num_classes``: the model
    would get a new, untrained head (a warning meant for fine-tuning), and validate scored its all-equal logits
    (every image its first class: 66.667% top-1 where two thirds of the images were of it)."""
    cfg = get_model_entry(name).pretrained_cfg
    released = cfg.get("num_classes") if has_pretrained_weights(cfg) else None
    if released and num_classes != released:
        raise SequencerError(f"`pretrained=True` with `num_classes={num_classes}`: {name}'s released weights have a "
                             f"{released}-class head, so a {num_classes}-class one would be untrained",
                             hint=f"fine-tune one first (train with `pretrained=True` and `num_classes={num_classes}`) "
                                  f"and pass its checkpoint, or drop `num_classes`")


def _model_name(model: str | None, checkpoint: dict | None, meta: dict, path: str) -> str:
    """The registered model ``load_model`` builds: ``model``, else the one the checkpoint (read from ``path``) names;
    SequencerError (one line) where there is none or it is not one of ours."""
    name = model or meta.get("arch")
    if not name and checkpoint is not None and meta.get("architecture"):
        raise SequencerError(f"checkpoint {path!r} holds {meta['architecture']}",
                             hint="torch.load it (weights_only=True) and call your_module.load_state_dict(ckpt['state_dict'])")
    if not name:
        refuse_segmentation_checkpoint(checkpoint, f"checkpoint {path!r}")
        if checkpoint is not None:
            raise SequencerError(f"checkpoint {path!r} does not name its model (no `arch` entry, as ours have, nor "
                                 f"timm train.py's `args.model`)", hint="pass `model=NAME`")
        raise SequencerError("no model given", hint="pass `model=NAME`, or a `checkpoint` written by `sequencer train`")
    try:
        get_model_entry(name)  # unknown names fail here with suggestions
    except SequencerError as e:
        if model or not e.message.startswith("unknown model"):
            raise
        raise SequencerError(f"checkpoint {path!r} names the model {name!r}, which is not one of ours "
                             f"({e.hint or e.message})", hint="pass `model=NAME`") from None
    return name


def _cfg_class_names(cfg: dict, num_classes: int | None) -> list[str] | None:
    """The class names a Hugging Face Hub repository's config.json gives its outputs (timm's ``label_names``: a list,
    or {index: name}), each as ``label_descriptions`` describes it where it does; None when it gives none for
    exactly these outputs."""
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i)) for i in range(len(names))]
    if not isinstance(names, (list, tuple)) or len(names) != num_classes or any(n is None for n in names):
        return None
    descriptions = cfg.get("label_descriptions") if isinstance(cfg.get("label_descriptions"), dict) else {}
    return [str(descriptions.get(n, n)) for n in names]


def check_input_size(loaded: LoadedModel, height: int, width: int) -> None:
    """SequencerError (one line) when the model cannot take a ``height`` x ``width`` input."""
    check = getattr(loaded.model, "check_input_size", None)
    if check is not None:
        try:
            check(height, width)
        except ValueError as e:
            raise SequencerError(f"model {loaded.name!r}: {e}",
                                 hint=f"use a multiple of {getattr(loaded.model, 'reduction', '?')}") from None


def resolve_device(text: str | None) -> torch.device:
    """The device a ``--device`` names (None or "": CUDA when available, else the CPU); SequencerError (one line)
    when it is not a device or names CUDA where there is none."""
    if not text:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SequencerError(f"`device={text!r}` is not a device", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SequencerError(f"`device={text}`: CUDA is not available on this machine", hint="use `device=cpu`")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SequencerError(f"`device={text}`: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def default_workers() -> int:
    """Data-loading processes when ``--workers`` is not given: up to 4, no more than the CPUs this process may run
    on (its affinity, as torch's DataLoader counts them: more workers than that drew its "suggested max number of
    worker" warning)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, usable or 1)


def label_with_model_classes(dataset, loaded) -> None:
    """Label ``dataset`` with the model's output indices; raises SequencerError when they cannot agree.

    A checkpoint's own class names map the split by name (a class it was not trained on is an error, a missing
    class is reported), exactly as training labelled its held-out split; ImageNet synset folders (n01440764, ...)
    map onto a 1000-class model's outputs; otherwise the class counts must match.
    """
    num_outputs = getattr(loaded.model, "num_classes", None)
    ckpt_names = [class_name(n) for n in checkpoint_metadata(loaded.checkpoint).get("class_names") or []]
    leave_out_ignored_classes(dataset, loaded)
    names = list(dataset.class_names)
    # a module's own output names count only where the data shares some (a Dataset's "0", "1", ... name nothing)
    known = ckpt_names or [class_name(n) for n in loaded.output_names or []]
    # ImageNet's readable names in index order (what an export of a 1000-class model without names of its own
    # records) name the same outputs as ImageNet's synset folders: those go by index below, not by name
    by_index = len(known) == 1000 and _imagenet_readable(known)
    if known and (set(names) & set(known) or (len(names) == len(ckpt_names) and not by_index)):
        missing = map_classes_by_name(dataset, known, "the evaluated split")
        if missing:
            _logger.info(f"note: {dataset.description} has no images of {len(missing)} of the model's "
                        f"{len(known)} classes ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        return
    if num_outputs == 1000 and len(names) < 1000 and all(n.startswith("n") and n[1:].isdigit() for n in names):
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        synsets = {info.index_to_label_name(i): i for i in range(1000)}
        if all(n in synsets for n in names):
            dataset.target_transform = [synsets[n] for n in names].__getitem__
            return
    if num_outputs is not None and num_outputs != len(names):
        raise SequencerError(
            f"model {loaded.name} has a {num_outputs}-class head but {dataset.description} has {len(names)} classes",
            hint="validate a checkpoint trained on this data, or pass `class_map` / `num_classes` to match")


def _imagenet_readable(names: list[str]) -> bool:
    """Whether ``names`` are ImageNet-1k's readable class names in class-index order: ours (``IMAGENET_CLASSES``,
    what predict labels a 1000-class model with) or timm's descriptions (a Hub config's ``label_descriptions``)."""
    from timm.data import ImageNetInfo

    from ..data.imagenet_classes import IMAGENET_CLASSES
    info = ImageNetInfo()
    return names == list(IMAGENET_CLASSES) or names == [info.index_to_description(i) for i in range(1000)]


def leave_out_ignored_classes(dataset, loaded) -> None:
    """Drop the class folders the checkpoint's training left out (its --class-map), as training did."""
    ignored = set(checkpoint_metadata(loaded.checkpoint).get("ignored_classes") or [])
    removed = drop_classes(dataset, ignored) if ignored else 0
    if removed:
        left_out = sorted(ignored & set(dataset.ignored_classes))
        _logger.info(f"note: leaving out {removed} image(s) of {', '.join(left_out[:5])}"
                    f"{', ...' if len(left_out) > 5 else ''}: the checkpoint's training left these classes out "
                    f"(its `class_map`)")


# ------------------------------------------------------------------------------------- images and evaluation data
def eval_transform(loaded: LoadedModel, input_size=None):
    """The model's eval preprocessing (resize to size/crop_pct, centre crop, normalise) as a PIL -> tensor callable."""
    cfg = loaded.data_config
    return create_transform(tuple(input_size or loaded.input_size), False, mean=cfg["mean"], std=cfg["std"],
                            crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])


def read_images(files: list[Path], transform) -> tuple[list[Path], list[torch.Tensor], list[Path]]:
    """(readable files, their tensors (C, H, W), unreadable files); each unreadable one is logged as a warning."""
    ok, tensors, failed = [], [], []
    for f in files:
        try:
            tensors.append(transform(load_image(f)))
            ok.append(f)
        except READ_ERRORS as e:
            _logger.warning(f"warning: skipped unreadable image {f} ({type(e).__name__}: {e})")
            failed.append(f)
    return ok, tensors, failed


def eval_loader(root: str, split: str, loaded: LoadedModel, input_size, batch_size: int, workers: int, device,
                crop_pct: float | None = None, notes: bool = True, dataset: str = ""):
    """Eval loader over ``root``'s ``split`` (or its class folders; ``dataset``: what ``root`` holds, as
    ``create_dataset``'s ``name``, e.g. "torch/cifar10") with the model's preprocessing at ``input_size``
    (``crop_pct`` replaces the model's); the split is labelled with the model's classes (by name where the checkpoint
    has names), and only its held-out files are kept where the checkpoint's run carved them from it
    (:func:`held_out_files_only`, which says so unless ``notes=False``), as validate keeps them."""
    dataset = held_out_files_only(create_dataset(dataset, root=root, split=split), loaded, notes)
    label_with_model_classes(dataset, loaded)
    cfg = loaded.data_config
    return create_loader(dataset, tuple(input_size), batch_size, is_training=False, mean=cfg["mean"], std=cfg["std"],
                         crop_pct=cfg["crop_pct"] if crop_pct is None else crop_pct,
                         interpolation=cfg["interpolation"], num_workers=workers,
                         device=device)


def split_to_evaluate(checkpoint: dict | None, root, split: str | None, dataset: str = "",
                      notes: bool = True) -> str:
    """The split of ``root`` (a --dataset ``dataset``'s DATA) that validate, resolution-sweep, robustness and
    export --verify evaluate: ``split``, or where none is given and ``root`` is the DATA ``checkpoint``'s run
    trained on, the split it evaluated on (so its logged top-1 is reproduced; for held-out files carved by
    `val_fraction`, the training split they were carved from), else "validation". Image folders (no ``dataset``)
    find it as training does: a validation split that ``root`` lacks is its test split where it has one (train/ and
    test/ only), with a note; a note too where ``root`` is another folder (a copy of the run's DATA, say) holding
    the split the run evaluated on under its name. A warning where it is the split the run trained on.
    ``notes=False``: none of them."""
    given, split = split, split or evaluated_split_of(checkpoint, root, dataset) or "validation"
    if not dataset:
        found = held_out_split(root, split)
        if found != split and notes:
            _logger.info(f"note: {root} has no {split!r} split: evaluating on {found!r}")
        split = found
    elsewhere = split_evaluated_elsewhere(checkpoint, root, dataset, split) if notes and not given else None
    if elsewhere:
        _logger.info(f"note: the checkpoint's run evaluated on split {elsewhere[0]!r} of {elsewhere[1]}, not "
                     f"{root}: evaluating its {split!r} (--split {elsewhere[0]} for that split of it)")
    training_images = training_split_evaluated(checkpoint, root, dataset, split) if notes else None
    if training_images:
        warn(f"{training_images} is the split the checkpoint's run trained on: these are its training images, "
             f"not held-out ones")
    return split


def held_out_files_only(split_set, loaded: LoadedModel, notes: bool = True):
    """The split, or only the held-out files of it when the checkpoint's run carved them from it (`val_fraction`),
    with a note; a warning where its run trained on all of it (no held-out split). ``notes=False`` (a rank other
    than the first) says nothing."""
    split_set, held_out = keep_held_out_files(split_set, loaded.checkpoint)
    if held_out and notes:
        _logger.info(f"note: evaluating the {len(split_set)} images the checkpoint's run held out of "
                     f"{split_set.root} (`val_fraction`), not the ones it trained on")
    if len(split_set) < held_out and notes:
        warn(f"{held_out - len(split_set)} of the {held_out} images the checkpoint's run held out of "
             f"{split_set.root} are not there any more: its top-1 is on the {len(split_set)} left")
    if trained_on_all_of(split_set, loaded.checkpoint) and notes:
        warn(f"the checkpoint was trained on all of {split_set.root}: these are its training images, "
             f"not held-out ones")
    return split_set


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| (0 when both are all-zero), in float64."""
    diff = (actual.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return diff / scale if scale > 0 else diff
