"""The model of a training run: the caller's module or one built by name (a resumed or initial checkpoint's
architecture), with the checkpoint's weights, checked against the image size, and wrapped for DDP and
``torch.compile``. Each step returns the settings it derived (model name, image size) as a new config.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import SequencerError
from ..models import create_model, get_model_entry
from ..models.loading import (checkpoint_metadata, extract_state_dict, load_state_dict_into, read_checkpoint,
                              weights_to_load)
from . import distributed as dist_utils
from .config import RunState, TrainConfig
from .head_by_name import head_rows_by_name
from .inference import refuse_segmentation_checkpoint
from .train_data import TrainData
from .user_data import check_float32_weights, compiled_module, module_name


def build_model(cfg, state: RunState, data: TrainData, device: torch.device) -> tuple[nn.Module, TrainConfig]:
    """The model on ``device`` (the caller's ``state.module``, the module inside it where it is a ``torch.compile``
    wrapper, whose forward passes :func:`wrap_model` runs: the checkpoints hold the module's own keys; or one built
    by name), with the resumed or initial checkpoint's weights, checked against the image size; with the settings
    naming its model and image size."""
    init_meta = read_checkpoint(cfg.initial_checkpoint) if cfg.initial_checkpoint else None
    refuse_segmentation_checkpoint(init_meta, f"`initial_checkpoint={cfg.initial_checkpoint!r}`")
    if state.module is not None:
        model = compiled_module(state.module)
        _check_user_module(model, data)
    else:
        # the model the file records (ours in its entries or a .safetensors' metadata, timm's train.py in its args)
        recorded = checkpoint_metadata(init_meta)
        model, cfg = _create_model(cfg, data.resume_ckpt, recorded if recorded.get("arch") else None,
                                   data.num_classes)
        if data.resume_ckpt is not None:
            model = _sized_as_resumed(model, cfg, data.resume_ckpt, state)
    if init_meta is not None and data.resume_ckpt is None:
        source = f"`initial_checkpoint={cfg.initial_checkpoint!r}`"
        weights, _ = weights_to_load(init_meta, source, cfg.initial_checkpoint_ema,
                                     other="`initial_checkpoint_ema=True` starts from its EMA weights")
        weights = head_rows_by_name(weights, checkpoint_metadata(init_meta).get("class_names"), data.class_names,
                                    model, source)
        load_state_dict_into(model, weights, source=source)
    img_size = cfg.img_size
    if data.resume_ckpt is not None:
        load_state_dict_into(model, extract_state_dict(data.resume_ckpt, use_ema=False),
                             source=f"`resume={data.resume_path!r}`")
        data.num_classes = getattr(model, "num_classes", data.num_classes)
        img_size = img_size or getattr(model, "img_size", None)
    _check_top5_metric(cfg, state, model, data)
    img_size = img_size or _default_img_size(model, data)
    try:
        if hasattr(model, "check_input_size"):
            model.check_input_size(img_size, img_size)
    except ValueError as e:
        raise SequencerError(f"`img_size={img_size}`: {e}",
                             hint=f"use a multiple of {model.reduction}") from None
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise SequencerError(f"grad_checkpointing: {module_name(model)} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, dataclasses.replace(cfg, img_size=img_size)


def _check_top5_metric(cfg, state: RunState, model: nn.Module, data: TrainData) -> None:
    """SequencerError for `eval_metric=top5` where the model has 5 outputs or fewer: its top 5 hold every class,
    so every epoch scored 100, the first stayed the best checkpoint and a plateau schedule decayed the lr as if
    nothing improved. A resume of such a run (which keeps its metric) goes on, with a warning."""
    heads = getattr(model, "num_classes", data.num_classes)
    if cfg.eval_metric != "top5" or not isinstance(heads, int) or heads > 5:
        return
    said = (f"`eval_metric=top5` with a {heads}-class head: its top 5 hold every class, so every epoch scores 100% "
            f"and the best checkpoint {'stays' if data.resume_ckpt is not None else 'would stay'} the first epoch")
    if data.resume_ckpt is None:
        raise SequencerError(said, hint="use `eval_metric=top1` or `eval_metric=loss`")
    state.start_warnings.append(said)


def _default_img_size(model: nn.Module, data: TrainData) -> int:
    """The model's own input size; for a module without one, the size of the caller's tensors, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    if data.tensors:
        return int(data.train_set.dataset[0][0].shape[-1])
    return 224


def _check_user_module(model: nn.Module, data: TrainData) -> None:
    """The caller's module must be able to score every class; one without a ``num_classes`` cannot be checked
    before its first batch."""
    if not isinstance(model, nn.Module):
        raise SequencerError(f"model must be a registry name or an nn.Module, not {type(model).__name__}")
    check_float32_weights(model, "train")
    heads = getattr(model, "num_classes", None)
    if isinstance(heads, int) and heads < data.num_classes:
        raise SequencerError(f"model {module_name(model)} has a {heads}-class head but the data has "
                             f"{data.num_classes} classes", hint=f"call model.reset_classifier({data.num_classes})")
    if data.resume_ckpt is not None and data.resume_ckpt.get("arch") and \
            data.resume_ckpt["arch"] != getattr(model, "model_name", None):
        raise SequencerError(f"`resume={data.resume_path}`: the checkpoint is a {data.resume_ckpt['arch']}, not "
                             f"the {module_name(model)} given as model")


def _create_model(cfg, resume_ckpt: dict | None, init_ckpt_meta: dict | None,
                  num_classes: int) -> tuple[nn.Module, TrainConfig]:
    """The model to train, and the settings naming it; architecture from the resumed checkpoint, else --model
    (or an initial checkpoint's)."""
    base = resume_ckpt or init_ckpt_meta or {}
    if resume_ckpt is not None and not base.get("arch") and base.get("architecture"):
        raise SequencerError(f"`resume`: {base['architecture']}", hint="pass that module as `model`")
    if resume_ckpt is not None and cfg.model and base.get("arch") and cfg.model != base["arch"]:
        raise SequencerError(f"`model={cfg.model}` does not match the resumed checkpoint's {base['arch']}",
                             hint="drop `model` when resuming")
    arch_kwargs = {}
    name = cfg.model
    if base.get("arch") and (not name or name == base["arch"]):
        name = base["arch"]
        arch_kwargs = dict(base.get("model_kwargs") or {})
        if resume_ckpt is None:  # a new run from these weights: size, classes and regularisation come from flags
            for k in ("num_classes", "img_size", "in_chans", "drop_rate", "drop_path_rate"):
                arch_kwargs.pop(k, None)
    name = name or "sequencer2d_s"
    get_model_entry(name)
    kwargs = dict(arch_kwargs, **cfg.model_kwargs)
    if resume_ckpt is None or isinstance(resume_ckpt.get("args"), dict):
        # the regularisation rates are training settings, not architecture: a resume runs the ones its checkpoint's
        # args record, or the `drop`/`drop_path` given (neither changes the weights: the state dict still loads)
        kwargs["drop_rate"] = cfg.drop
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.img_size:  # a resume's too: the size it trains at (its checkpoint's unless `img_size` changes it)
        kwargs["img_size"] = cfg.img_size
    if resume_ckpt is None:
        kwargs["num_classes"] = num_classes
        if cfg.in_chans:
            kwargs["in_chans"] = cfg.in_chans
    try:
        return create_model(name, pretrained=cfg.pretrained and not resume_ckpt, **kwargs), \
            dataclasses.replace(cfg, model=name)
    except SequencerError as e:
        if not cfg.pretrained or e.hint is None:
            raise
        # the library's hint names the other commands' --checkpoint; train takes the file as --initial-checkpoint
        message = e.message
        raise SequencerError(f"`pretrained`: {message}",
                             hint="download the file by other means and pass it with `initial_checkpoint=FILE`, "
                                  "or drop `pretrained`") from None


def _sized_as_resumed(model: nn.Module, cfg, resume_ckpt: dict, state: RunState) -> nn.Module:
    """``model`` (built at this start's ``img_size``), or, where that size gives a parameter another shape than the
    checkpoint's (``v_sequencer_s_pe``'s position embedding: its optimizer state holds that shape), the model at the
    checkpoint's size, which interpolates the embedding to the inputs' grid, said at the start."""
    recorded = extract_state_dict(resume_ckpt, use_ema=False)
    own = model.state_dict()
    resized = sorted(k for k in own.keys() & recorded.keys() if own[k].shape != recorded[k].shape)
    if not resized:
        return model
    kwargs = {k: v for k, v in model.model_kwargs.items() if k != "img_size"}
    recorded_size = (resume_ckpt.get("model_kwargs") or {}).get("img_size")
    if recorded_size is not None:
        kwargs["img_size"] = recorded_size
    kept = create_model(model.model_name, **kwargs)
    state.start_warnings.append(
        f"`img_size={cfg.img_size}`: {model.model_name} keeps the checkpoint's {kept.img_size} px model ({', '.join(resized)} "
        f"sized for it, interpolated to {cfg.img_size} px inputs); a new run from it (`initial_checkpoint`) resizes it")
    return kept


def wrap_model(cfg, info: dist_utils.DistInfo, model: nn.Module, runs: nn.Module | None = None
               ) -> tuple[nn.Module, nn.Module]:
    """(the model to train: DDP across processes, compiled with --torchcompile; the model to evaluate). ``runs``:
    what runs ``model``'s forward passes where it is not ``model`` itself (the caller's ``torch.compile`` wrapper)."""
    runs = model if runs is None else runs
    train_model = runs
    if info.distributed:
        device = info.device
        train_model = nn.parallel.DistributedDataParallel(runs, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.torchcompile:
        train_model = torch.compile(train_model, backend=cfg.torchcompile, mode=cfg.torchcompile_mode)
    eval_model = (torch.compile(runs, backend=cfg.torchcompile, mode=cfg.torchcompile_mode) if cfg.torchcompile
                  else runs)
    return train_model, eval_model
