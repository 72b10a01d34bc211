"""Validation as a library: :func:`validate`, what ``sequencer validate`` runs.

A checkpoint written by ``sequencer train`` carries its model name, class names and preprocessing, and is evaluated
with the same loader and loop as training's eval phase (:func:`~sequencer.engine.evaluate.evaluate`), so it
reproduces the ``eval_top1`` training logged. Under ``torchrun`` each process evaluates a disjoint share.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data import create_dataset, create_loader, resolve_data_config
from ..data.loader_workers import workers_stopped_on_exit
from ..errors import SequencerError
from ..models import get_model_entry, has_pretrained_weights
from ..models.caller_module import caller_module_kept
from ..models.loading import checkpoint_metadata
from .amp import autocast_dtype, dtype_name, say_notes
from .distributed import DistInfo, process_group
from .evaluate import evaluate
from .data_record import recorded_data
from .guest import caller_state_kept, console, own_modes
from .inference import (LoadedModel, check_input_size, default_workers, held_out_files_only, label_with_model_classes,
                        load_model, split_to_evaluate)
from .user_data import check_float32_weights, module_name, wrap_dataset

_logger = logging.getLogger(__name__)



@dataclass
class ValidationResult:
    """What :func:`validate` measured: top-1/top-5 accuracy and their errors (percent), the mean cross-entropy
    ``loss``, the ``images`` evaluated (``unreadable`` ones skipped; ``nonfinite``: those whose logits held a NaN
    or a +inf, which make the metrics NaN), throughput and how the model ran.
    ``result["top1"]`` reads a field too; :meth:`as_dict` is what ``--results-file`` holds."""
    model: str
    checkpoint: str
    dataset: str
    top1: float
    top1_err: float
    top5: float
    top5_err: float
    loss: float
    images_per_sec: float
    param_count: int | None  # None for an ONNX file: onnxruntime holds the weights
    img_size: int
    crop_pct: float
    interpolation: str
    images: int
    unreadable: int
    amp: str  # the reduced precision it ran in: autocast's, a bfloat16 `prepare`'s (--fast), an ONNX file's; "": fp32
    device: str
    # which of the checkpoint's weights were evaluated: "ema", "model", or None where the file does not say
    # (``use_ema``; by default the ones its run evaluated)
    weights: str | None = None
    nonfinite: int = 0  # images whose logits held a NaN or a +inf (top-1, top-5 and loss are then NaN)

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def as_dict(self) -> dict:
        """The results as ``sequencer validate --results-file`` writes them (``images`` is ``count`` there)."""
        return {("count" if k == "images" else k): v for k, v in dataclasses.asdict(self).items()}


def validate(checkpoint: str | os.PathLike = "", data=None, *, model: str | nn.Module | None = None,
             pretrained: bool = False, dataset: str = "", split: str | None = None, class_map: str = "",
             dataset_download: bool = False, batch_size: int = 256, workers: int | None = None,
             crop_pct: float | None = None, mean=None, std=None, interpolation: str | None = None,
             num_classes: int | None = None, img_size: int | None = None, input_size=None,
             use_ema: bool | None = None, amp: bool = False, amp_dtype: str | None = None, device: str | None = None,
             torchcompile: str | None = None, progress: bool = True,
             prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
             load: Callable[[torch.device], LoadedModel] | None = None) -> ValidationResult:
    """Top-1/top-5 accuracy (percent), errors, mean loss and throughput of a model on a dataset split, as
    ``sequencer validate`` computes and prints them, as a :class:`ValidationResult`.

    Arguments are the command's flags with underscores. ``model``: a registry name, or an ``nn.Module`` in memory
    (evaluated as it is, on ``device``, then given back as it was: on its own device, in the mode it was in, each
    submodule's too, also when evaluation raises; its ``img_size``/``pretrained_cfg`` give the preprocessing,
    else ``img_size`` or 224, and a dataset sharing class names with its ``pretrained_cfg["label_names"]`` is
    labelled by name, as a checkpoint's class names label it; its ``ignored_classes`` and ``training_data`` (the
    same call's record) leave out what the checkpoint's own path leaves out). ``data``: a folder or .tar, a
    map-style Dataset of ``(PIL image or (C, H, W) tensor, int)`` (tensors used as given), or None (and no ``dataset``): the held-out split the checkpoint records
    it was trained on (its ``data`` entry: the digits for a digits run; a one-line error when it records none or its
    folder is gone). A folder without ``split`` is evaluated on the split the checkpoint's run evaluated on when it
    is the run's own DATA, else on its held-out split found by name, as training does. A ``model`` name without a
    checkpoint evaluates its released weights (``pretrained``), as timm's validate.py. ``prepare`` transforms the
    loaded model before it runs (the command's ``--fast``: ``sequencer.optimize_for_inference``); ``torchcompile``
    names a torch.compile backend to run it with. ``progress=False`` prints nothing. ``load`` replaces how the model
    is built (the command's ``--onnx``). The caller's ``random``, ``numpy`` and torch random state is restored on
    return (building a model by name draws its initial weights from it).
    """
    in_memory = isinstance(model, nn.Module)
    if in_memory and checkpoint:
        raise SequencerError("validate: pass a checkpoint or a model in memory, not both")
    if in_memory:
        check_float32_weights(model, "validate")
    user_data = data is not None and not isinstance(data, (str, os.PathLike))
    data = os.fspath(data) if data is not None and not user_data else data
    with console(progress), own_modes(), caller_state_kept(), caller_module_kept(model if in_memory else None), \
            workers_stopped_on_exit(), process_group(device) as dist_info:
        if load is None and not in_memory:
            pretrained = _pretrained_by_default(model, checkpoint, pretrained, dist_info)
        user_split = wrap_dataset(data) if user_data else None
        if in_memory and user_split is not None and user_split.tensors and not (img_size or input_size):
            img_size = int(user_split.dataset[0][0].shape[-1])  # the tensors' own size, used as given

        def load_the_model() -> LoadedModel:
            if in_memory:
                return _in_memory(model, img_size, input_size, dist_info.device)
            if load is not None:
                return load(dist_info.device)
            return load_model(checkpoint, model=model, pretrained=pretrained, num_classes=num_classes,
                              img_size=img_size, input_size=input_size, use_ema=use_ema, device=dist_info.device)

        def open_split(data, dataset, split, checkpoint=None):
            split = split_to_evaluate(checkpoint, data, split, dataset, notes=dist_info.is_primary)
            return create_dataset(dataset, root=data, split=split, class_map=class_map or None,
                                  download=dataset_download)

        loaded, split_set, dataset = _model_and_split(load_the_model, open_split, user_split, data, dataset, split,
                                                      checkpoint, bool(checkpoint) or load is not None or in_memory,
                                                      dist_info)
        loaded.model = _prepared(loaded.model, prepare, torchcompile)
        overrides = dict(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
        eval_dtype = _amp_dtype(amp, amp_dtype, dist_info)
        if dist_info.is_primary:
            _note_the_runs_autocast(loaded, eval_dtype)
        metrics = _evaluate(loaded, split_set, overrides, batch_size, workers, eval_dtype, dataset, dist_info,
                            tensors=user_data and split_set.tensors)
        metrics["amp"] = metrics["amp"] or _reduced_precision(loaded.model)
        results = ValidationResult(
            model=loaded.name, checkpoint=os.fspath(checkpoint) if checkpoint else ("pretrained" if pretrained
                                                                                   else ""), **metrics,
            weights=loaded.weights)
        if dist_info.is_primary:
            log_results(results)
    return results


def _model_and_split(load_the_model: Callable[[], LoadedModel], open_split, user_split, data, dataset: str,
                     split: str | None, checkpoint, model_first: bool, dist_info: DistInfo) -> tuple:
    """(the loaded model, the split to evaluate, ``dataset``), each read in the order that lets a mistake fail
    before the slow part: a caller's Dataset (``user_split``) is used as given; no data: the data the checkpoint
    records, known once it is read; ``model_first`` (a ``checkpoint`` file, an exported file ``load`` reads, or a
    module in memory carrying its checkpoint's record) on an existing folder or a ``dataset`` without one (the
    digits): the model first, as its record says which split of its run's own DATA to evaluate
    (``split_to_evaluate``: the one the run evaluated on, or carved from the training split with ``val_fraction``)
    and whether a named one is its training split; else the data first, so a missing folder does not wait for (or
    download) the model's weights. Files the checkpoint's run trained on are left out of a named folder's split."""
    if user_split is not None:
        return load_the_model(), user_split, dataset
    if data is None and not dataset:
        loaded = load_the_model()
        data, dataset, split = _checkpoint_data(loaded, checkpoint, split, dist_info)
        split_set = open_split(data, dataset, split, loaded.checkpoint)
    elif model_first and (data is None or os.path.exists(data)):
        loaded = load_the_model()
        split_set = open_split(data, dataset, split, loaded.checkpoint)
    else:
        split_set = open_split(data, dataset, split)
        loaded = load_the_model()
    return loaded, held_out_files_only(split_set, loaded, dist_info.is_primary), dataset


def _prepared(model: nn.Module, prepare: Callable[[nn.Module], nn.Module] | None, torchcompile: str | None):
    """The model as it runs: ``prepare`` applied (``--fast``), then compiled with the ``torchcompile`` backend."""
    if prepare is not None:
        model = prepare(model)
    return torch.compile(model, backend=torchcompile) if torchcompile else model


def _reduced_precision(model: nn.Module) -> str:
    """The reduced precision a prepared model computes in without autocast, by name (``prepare``'s
    ``optimize_for_inference`` copy in bfloat16: its ``dtype``; ``--fast`` on a CPU with bf16 kernels; an ONNX file
    of float16 or int8: its ``precision``); "" for float32."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype_name(dtype) if dtype != torch.float32 else ""
    precision = getattr(model, "precision", None)
    return precision if isinstance(precision, str) and precision != "float32" else ""


def _checkpoint_data(loaded: LoadedModel, checkpoint, split: str | None, dist_info: DistInfo) -> tuple:
    """(DATA, --dataset, --split) of the data the loaded checkpoint records (its held-out split unless ``split``
    names another)."""
    source = f"checkpoint {os.fspath(checkpoint)!r}" if checkpoint else loaded.source or f"model {loaded.name}"
    recorded = recorded_data(loaded.checkpoint, source, "the `checkpoint`" if checkpoint else "it")
    split = split or recorded.split
    if dist_info.is_primary:
        _logger.info(f"note: no DATA given: evaluating on the data {source} was trained on "
                     f"({recorded.root or recorded.dataset}, split {split!r})")
    return recorded.root, recorded.dataset, split


def _in_memory(model: nn.Module, img_size: int | None, input_size, device: torch.device) -> LoadedModel:
    """The caller's module as a :class:`LoadedModel`, moved to ``device`` (:func:`validate` puts it back: its
    ``caller_module_kept``); its input size from the arguments, its ``pretrained_cfg`` (a loaded checkpoint's record:
    create_model(checkpoint_path=...)), its own ``img_size``, else 224; what the same call kept of the file's record
    stands in for the checkpoint (`_record_kept_on`)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = (input_size[1] if input_size else img_size) or (cfg.get("input_size") or (0, 0, None))[-1] or \
        getattr(model, "img_size", None) or 224
    in_chans = (input_size[0] if input_size else None) or getattr(model, "in_chans", None) or 3
    stem = getattr(model, "in_chans", None)
    if isinstance(stem, int) and in_chans != stem:  # its stem is as built: nothing adapts it here
        raise SequencerError(f"validate: `input_size` has {in_chans} channels but `model` {module_name(model)} "
                             f"takes {stem}", hint=f"build it with in_chans={in_chans} (create_model(..., "
                             f"checkpoint_path=..., in_chans={in_chans}) adapts a checkpoint's stem)")
    data_config = {k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in cfg}
    names = cfg.get("label_names")
    names = list(names) if isinstance(names, (list, tuple)) and len(names) == getattr(model, "num_classes", None) \
        else None
    model.to(device)
    return LoadedModel(model, module_name(model), None, (in_chans, int(size), int(size)), data_config,
                       checkpoint=_record_kept_on(model), output_names=names)


def _record_kept_on(model: nn.Module) -> dict | None:
    """What create_model(checkpoint_path=...) kept of the file's record besides the pretrained_cfg, as the
    checkpoint's own path reads it: the class folders its training left out (``ignored_classes``) and the data it
    trained on (``data``: the held-out split, the files ``--val-fraction`` carved out), so that the same folders and
    files are left out of the evaluated split."""
    ignored = getattr(model, "ignored_classes", None)
    trained_on = getattr(model, "training_data", None)
    record = {}
    if isinstance(ignored, (list, tuple)) and ignored:
        record["ignored_classes"] = list(ignored)
    if isinstance(trained_on, dict) and trained_on:
        record["data"] = dict(trained_on)
    return record or None


def _pretrained_by_default(model, checkpoint, pretrained: bool, dist_info: DistInfo) -> bool:
    """As timm's validate.py: a model name alone means its released weights (random ones prove nothing)."""
    if model and not checkpoint and not pretrained:
        if has_pretrained_weights(get_model_entry(model).pretrained_cfg):
            return True
        if dist_info.is_primary:
            _logger.info(f"note: {model} has no released weights and no `checkpoint` was given: "
                         f"evaluating randomly initialised weights")
    return pretrained


def _amp_dtype(amp: bool, amp_dtype: str | None, dist_info: DistInfo) -> torch.dtype | None:
    if not (amp or amp_dtype):
        return None
    notes = []
    dtype = autocast_dtype(amp_dtype or "auto", dist_info.device, notes=notes)
    if dist_info.is_primary:  # the same on every rank: said once
        say_notes(notes)
    return dtype


def _note_the_runs_autocast(loaded: LoadedModel, eval_dtype: torch.dtype | None) -> None:
    """One note when the checkpoint's run evaluated under autocast and this evaluation runs in float32: its
    summary.csv's eval numbers and these then differ in the last digits, which reads as a wrong checkpoint."""
    meta = checkpoint_metadata(loaded.checkpoint)
    trained = meta.get("eval_amp_dtype")
    if trained and eval_dtype is None and len(meta.get("averaged_from") or []) > 1:
        _logger.info(f"note: the averaged checkpoints' runs evaluated under {trained} autocast; no run evaluated "
                     f"their average (no summary.csv holds its numbers), and this runs in float32: "
                     f"`amp_dtype={trained}` evaluates it as they evaluated theirs")
    elif trained and eval_dtype is None:
        _logger.info(f"note: the checkpoint's run evaluated under {trained} autocast (its summary.csv's eval "
                     f"numbers); this runs in float32, so the numbers may differ a little: `amp_dtype={trained}` "
                     f"evaluates as the run did")


def _evaluate(loaded: LoadedModel, split_set, overrides: dict, batch_size: int, workers: int | None,
              amp_dtype, dataset: str, dist_info: DistInfo, tensors: bool = False) -> dict:
    """Evaluate ``loaded`` on ``split_set`` with the checkpoint's preprocessing (what training evaluated with),
    then the explicit overrides; the results from ``dataset`` on. ``tensors``: the images are tensors to use as
    given."""
    device = dist_info.device
    config = dict(input_size=loaded.input_size)
    config.update({k: v for k, v in overrides.items() if v is not None})
    config = resolve_data_config(config, loaded.model, recorded=loaded.data_config)
    check_input_size(loaded, *config["input_size"][1:])
    label_with_model_classes(split_set, loaded)
    if workers is None:
        workers = 0 if dataset == "digits" else default_workers()
    loader = create_loader(split_set, config["input_size"], batch_size, is_training=False,
                           mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"],
                           interpolation=config["interpolation"], num_workers=workers,
                           distributed=dist_info.distributed, device=device,
                           normalize_on_device=False if tensors else None)
    metrics = evaluate(loaded.model, loader, device, amp_dtype=amp_dtype, distributed=dist_info.distributed)
    return dict(
        dataset=split_set.description,
        top1=round(metrics["top1"], 3), top1_err=round(100 - metrics["top1"], 3),
        top5=round(metrics["top5"], 3), top5_err=round(100 - metrics["top5"], 3),
        loss=round(metrics["loss"], 5),
        images_per_sec=round(metrics["images_per_sec"], 1),
        param_count=loaded.num_params or None,  # None for an ONNX file: onnxruntime holds the weights
        img_size=config["input_size"][-1],
        crop_pct=config["crop_pct"],
        interpolation=config["interpolation"],
        images=metrics["count"],
        unreadable=metrics["unreadable"],
        nonfinite=metrics["nonfinite"],
        amp=dtype_name(amp_dtype) or "",
        device=str(device),
    )


def log_results(results: ValidationResult) -> None:
    _logger.info(f" * Acc@1 {results.top1:.3f} ({results.top1_err:.3f}) "
                 f"Acc@5 {results.top5:.3f} ({results.top5_err:.3f})")
    size = f"{results.param_count / 1e6:.2f}M params" if results.param_count else "ONNX"
    size += {"ema": ", EMA weights", "model": ", raw model weights"}.get(results.weights, "")
    size += f", {results.amp}" if results.amp else ""
    _logger.info(f"model {results.model} ({size}) at {results.img_size}px on {results.dataset}: {results.images} "
                 f"images, loss {results.loss:.4f}, {results.images_per_sec:.1f} images/s"
                 + (f", {results.unreadable} unreadable skipped" if results.unreadable else ""))
