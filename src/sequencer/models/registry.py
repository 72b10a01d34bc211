"""Model registry: ``create_model(name, ...)`` and ``list_models(pattern)``.

Model files register their variants here (``register_model``); this module imports none of them, so the registry
and the models import one way only (``models/__init__.py`` imports the model files to fill it). A name
``hf-hub:ORG/NAME[@REVISION]`` is a timm repository on the Hugging Face Hub: its config.json names the registered
architecture, and gives the arguments and pretrained cfg of the weights it holds."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..errors import SequencerError, checked_positive_int
from .features import FeatureExtractor
from .hub import HF_HUB_PREFIX, hf_hub_model_config, load_pretrained
from .loading import (checkpoint_metadata, embedding_img_size, head_rows, load_state_dict_into, read_checkpoint,
                      recorded_cfg, recorded_ignored_classes, recorded_training_data, stem_channels,
                      weights_to_load)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    kwargs: dict
    pretrained_cfg: dict
    # the arguments the weights of a Hub repository were made with (its config.json): create_model records them in
    # model_kwargs, so `create_model(model.model_name, **model.model_kwargs)` rebuilds the model without the Hub
    weights_args: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, cls: type, kwargs: dict, pretrained_cfg: dict) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ModelEntry(name, cls, dict(kwargs), dict(pretrained_cfg, architecture=name))


def has_pretrained_weights(pretrained_cfg: dict) -> bool:
    """Whether released weights exist for a model with this cfg (on GitHub or the Hugging Face Hub)."""
    return bool(pretrained_cfg.get("url") or pretrained_cfg.get("hf_hub_id"))


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Sorted registered names matching the shell-style ``pattern``; ``pretrained`` keeps those with weights."""
    if not isinstance(pattern, str):  # fnmatch's TypeError 'expected str, bytes or os.PathLike object, not int'
        raise SequencerError(f"list_models: `pattern={pattern!r}` is not text",
                             hint="a shell-style pattern, e.g. 'sequencer2d*'")
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (not pretrained or has_pretrained_weights(e.pretrained_cfg)))


def get_model_entry(name: str) -> ModelEntry:
    """The registered model ``name``; for ``hf-hub:ORG/NAME`` the architecture its config.json names, with the
    repository's cfg and arguments (read through huggingface_hub's cache). SequencerError for unknown names."""
    if not isinstance(name, str):  # a module or None passed as the name failed as "'NoneType' has no 'startswith'"
        raise SequencerError(f"a model name is a registered name (text), not {type(name).__name__}",
                             hint="run `sequencer models` for the list")
    if name.startswith(HF_HUB_PREFIX):
        return _hf_hub_entry(name[len(HF_HUB_PREFIX):])
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `sequencer models` for the list"
        raise SequencerError(f"unknown model {name!r}", hint=hint) from None


def _hf_hub_entry(hub_id: str) -> ModelEntry:
    """The entry of the architecture repository ``hub_id`` holds, its cfg updated by the repository's config.json
    (``hf_hub_id``, ``source="hf-hub"``: pretrained weights come from that repository)."""
    architecture, hub_cfg, args = hf_hub_model_config(hub_id)
    if architecture not in _REGISTRY:
        raise SequencerError(f"{HF_HUB_PREFIX}{hub_id}: its config.json names architecture {architecture!r}, which "
                             f"is not a sequencer model", hint="run `sequencer models` for the architectures it builds")
    entry = _REGISTRY[architecture]
    accepted = _accepted_keywords(entry.cls)
    unknown = sorted(set(args) - set(accepted)) if accepted is not None else []
    if unknown:
        raise SequencerError(f"{HF_HUB_PREFIX}{hub_id}: its config.json gives {architecture} the model_args "
                             f"{', '.join(unknown)}, which {entry.cls.__name__} does not take")
    cfg = dict(entry.pretrained_cfg, **hub_cfg, architecture=architecture, hf_hub_id=hub_id, source="hf-hub")
    return ModelEntry(architecture, entry.cls, dict(entry.kwargs), cfg, weights_args=args)


def _accepted_keywords(cls: type) -> dict[str, object] | None:
    """The keyword arguments ``cls(...)`` takes and their defaults (``inspect.Parameter.empty`` for none), following
    ``**kwargs`` up to the base classes' ``__init__``; None when some ``__init__`` takes any keyword."""
    names: dict[str, object] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # without self
        names.update({p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                      and p.name not in names})
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _check_keywords(name: str, cls: type, kwargs: dict) -> None:
    """SequencerError naming the keywords model ``name``'s class does not take, or a text value for one whose
    default is a number or a switch (``--model-kwargs proj_drop_rate=abc``); raised before it is built."""
    accepted = _accepted_keywords(cls)
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
    if unknown:
        raise SequencerError(f"bad argument for model {name!r}: {cls.__name__} takes no {', '.join(unknown)}",
                             hint=f"its arguments: {', '.join(sorted(accepted))}")
    for key, value in kwargs.items():
        default = (accepted or {}).get(key)
        if isinstance(value, str) and isinstance(default, (bool, int, float)):
            raise SequencerError(f"bad argument for model {name!r}: `{key}={value!r}` is text, but {key} is a "
                                 f"{type(default).__name__} (default {default!r})")


class ReadCheckpoint(NamedTuple):
    """A checkpoint file already read (``loading.read_checkpoint``), passed as ``create_model``'s
    ``checkpoint_path`` by a caller that read it for its metadata first, so that the file is read once;
    ``source`` names it in messages."""
    checkpoint: dict
    source: str


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | ReadCheckpoint | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        in_chans: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices=None,
        pretrained_cfg_overlay: dict | None = None,
        use_ema: bool | None = None,
        **overrides,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    ``name``: a registered name (``sequencer models``) or ``hf-hub:ORG/NAME[@REVISION]``, a timm repository on the
    Hugging Face Hub (e.g. ``hf-hub:timm/sequencer2d_s.in1k``) whose config.json gives the architecture, its
    arguments (class count, ...) and preprocessing (``model.pretrained_cfg``), and whose weights ``pretrained``
    loads. ``in_chans``: input channels (default: a ``checkpoint_path`` file's stem's, else the repository's, else
    3).

    Two kinds of weights, as in timm. ``pretrained`` loads released weights as the start of a model of the
    arguments given (downloaded once: the authors' GitHub release into the torch hub cache; with
    ``pretrained_cfg_overlay=dict(source="hf-hub")``, timm's Hugging Face Hub copy named by the cfg's
    ``hf_hub_id``, into huggingface_hub's cache, which honours HF_ENDPOINT and HF_HUB_OFFLINE; with
    ``pretrained_cfg_overlay=dict(file=PATH)``, timm's local copy, the file PATH in any layout below): a head
    trained for another ``num_classes`` is re-initialised with a warning, and a position embedding
    (``v_sequencer_s_pe``) for another token grid than ``img_size``'s is resampled to it as the weights load
    (bicubic, antialiased: ``timm.layers.resample_abs_pos_embed``'s numbers).
    ``checkpoint_path`` loads a file that is the model, in any supported layout (the authors' release, timm's,
    our training checkpoints, safetensors): the head takes the file's class count (the stem its input channels),
    and a ``num_classes`` of another count is an error (a new head starts from it as pretrained weights, above); a
    position embedding for another token grid than ``img_size``'s keeps its own: the model is built at the file's size
    (``model_kwargs["img_size"]``; ``pretrained_cfg["input_size"]`` stays ``img_size``) and interpolates it once,
    in forward, to each input's grid, with a note. A model without a head (``num_classes=0``) ignores a file's
    head; a file without one leaves the model's fresh head, with a warning. What the
    file records (ours: training checkpoints, ``checkpoint clean``, safetensors exports) becomes the model's
    ``pretrained_cfg``: its mean, std, crop_pct, interpolation and image size, and its class names as
    ``label_names`` where they name the head's outputs, so timm's ``resolve_data_config(model=model)`` and
    ``sequencer.validate(model=model)`` preprocess as ``sequencer predict --checkpoint`` does; for
    ``checkpoint_path``, also the class folders its training's class map left out, as ``model.ignored_classes``
    (not in ``pretrained_cfg``: timm's ``PretrainedCfg`` has no such field and refuses unknown ones), so that
    ``validate(model=model)`` leaves them out as ``validate --checkpoint`` does; and the data its run trained on,
    as ``model.training_data``, so that ``validate(model=model)`` evaluates (without ``data``) the held-out split
    the run evaluated, and (given the run's own folder) only the images a ``--val-fraction`` run held out, as
    ``validate --checkpoint`` does.
    ``use_ema`` picks a training checkpoint's weights (``loading.picked_weights``): None (default) the ones its run
    evaluated and logged, True its EMA weights where it has them, False its raw model's.
    ``features_only`` returns a module giving per-stage NCHW feature maps (``out_indices`` picks stages).
    ``pretrained_cfg_overlay`` replaces fields of the model's ``pretrained_cfg`` (e.g. ``url``, ``sha256``); as in
    timm, its ``num_classes`` and ``input_size`` describe the weights, and give the model its class count and input
    channels where the arguments give none (a negative ``num_classes``: the weights' head is never loaded).
    ``overrides`` replace architecture arguments (e.g. ``union="add"``, ``proj_drop_rate=0.1``).
    Bad names and arguments raise SequencerError.
    """
    entry = get_model_entry(name)
    cfg = copy.deepcopy(entry.pretrained_cfg)
    cfg.update(pretrained_cfg_overlay or {})
    # 0, -3, 2.5 or True failed deep in torch's layers (ZeroDivisionError, 'negative dimension', 'divisible by
    # groups'), or built a 1-channel stem
    in_chans = None if in_chans is None else checked_positive_int("in_chans", in_chans)
    overlay_chans, overlay_classes = _overlay_defaults(pretrained_cfg_overlay or {})
    local = cfg.get("file") if pretrained and not checkpoint_path and cfg.get("source") != "hf-hub" else None
    weights = _read_weights(checkpoint_path or local, use_ema, "pretrained weights" if local else "checkpoint")
    the_model = bool(weights) and not local  # the file is the model: its head's, stem's and embedding's sizes
    if in_chans is None:
        in_chans = ((the_model and stem_channels(weights.state)) or overlay_chans
                    or int(entry.weights_args.get("in_chans", 3)))
    user_kwargs = dict(entry.weights_args, **overrides, in_chans=in_chans, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate)
    if num_classes is None:
        num_classes = head_rows(weights.state) if the_model else None
    num_classes = overlay_classes if num_classes is None else num_classes
    if num_classes is not None:
        user_kwargs["num_classes"] = num_classes
    if img_size is not None:
        img_size = user_kwargs["img_size"] = checked_positive_int("img_size", img_size)
        cfg["input_size"] = (in_chans, img_size, img_size)
    else:
        cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    if the_model:
        kept = _file_img_size(entry, dict(entry.kwargs, **user_kwargs), weights)
        if kept:
            user_kwargs["img_size"] = kept
    kwargs = dict(entry.kwargs, **user_kwargs)
    _check_keywords(name, entry.cls, kwargs)
    if (pretrained or weights) and torch.get_default_device().type == "meta":
        raise SequencerError(f"create_model({entry.name!r}): weights cannot be loaded into a model built on the meta "
                             "device (torch's default device here: torch.set_default_device or `with torch.device`)",
                             hint="build it outside that, or build it there and load the weights with "
                                  "load_state_dict(..., assign=True)")
    model = entry.cls(**kwargs)  # its refused values raise ArgumentValueError; anything else is a bug: traceback
    classes = getattr(model, "num_classes", user_kwargs.get("num_classes"))
    if classes is not None and classes != cfg.get("num_classes"):
        cfg.pop("label_names", None)  # the weights' class names name another head's outputs
        cfg.pop("label_descriptions", None)
    if classes is not None:
        cfg["num_classes"] = classes
    model.pretrained_cfg = model.default_cfg = cfg
    model.model_name = entry.name
    model.model_kwargs = user_kwargs  # create_model(model.model_name, **model.model_kwargs) rebuilds it
    if pretrained and not weights:
        load_pretrained(model, cfg)
    if weights:
        load_state_dict_into(model, weights.state, source=weights.source, new_head=bool(local))
        _take_the_files_record(model, weights.checkpoint, in_chans, img_size is not None, pretrained_cfg_overlay,
                               the_model)
    if pretrained and not the_model and (pretrained_cfg_overlay or {}).get("num_classes", 0) < 0 and classes:
        model.reset_classifier(classes)  # as timm: weights whose head is no class count's never give theirs
    if features_only:
        model = FeatureExtractor(model, out_indices)
    return model


def _overlay_defaults(overlay: dict) -> tuple[int | None, int | None]:
    """(input channels, class count) that a ``pretrained_cfg_overlay`` gives the model where the caller names
    neither, as timm's: its ``input_size``'s channels, its ``num_classes`` (the weights' own; a negative count, a
    head that is no class count's, gives none). SequencerError for a value of another kind."""
    size, classes = overlay.get("input_size"), overlay.get("num_classes")
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 3
                                 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SequencerError(f"pretrained_cfg_overlay: `input_size={size!r}` is not (channels, height, width)")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)):
        raise SequencerError(f"pretrained_cfg_overlay: `num_classes={classes!r}` is not a whole number")
    return (size[0] if size else None), (classes if classes is not None and classes >= 0 else None)


class _Weights(NamedTuple):
    checkpoint: dict
    state: dict
    source: str


def _read_weights(path, use_ema: bool | None, kind: str) -> _Weights | None:
    """The file's checkpoint and the weights every loader takes from it (``loading.weights_to_load``)."""
    if not path:
        return None
    if isinstance(path, ReadCheckpoint):
        checkpoint, source = path
    else:
        checkpoint, source = read_checkpoint(path), f"{kind} {str(path)!r}"
    return _Weights(checkpoint, weights_to_load(checkpoint, source, use_ema)[0], source)


def _file_img_size(entry: ModelEntry, kwargs: dict, weights: _Weights) -> int | None:
    """The ``img_size`` a file that is the model sets where its position embedding is on another token grid than
    ``kwargs``' (``loading.embedding_img_size``); None where it fits."""
    defaults = {k: v for k, v in (_accepted_keywords(entry.cls) or {}).items() if v is not inspect.Parameter.empty}
    recorded = (checkpoint_metadata(weights.checkpoint).get("model_kwargs") or {}).get("img_size")
    return embedding_img_size(dict(defaults, **kwargs), weights.state, recorded, weights.source)


def _take_the_files_record(model: nn.Module, checkpoint: dict, in_chans: int, size_given: bool,
                           overlay: dict | None, the_model: bool) -> None:
    """The file's own record of how its weights see images (what `sequencer predict --checkpoint` applies), so
    that timm.data.resolve_data_config(model=...) and validate(model=...) preprocess as it does; the caller's
    img_size and pretrained_cfg_overlay stay theirs. A file that is the model also gives the classes its training
    left out and the data it trained on."""
    cfg = model.pretrained_cfg
    recorded = recorded_cfg(checkpoint, getattr(model, "num_classes", None), in_chans)
    if size_given:
        recorded.pop("input_size", None)
    cfg.update({k: v for k, v in recorded.items() if k not in (overlay or {})})
    if "label_names" in recorded:  # another head's descriptions (a Hub cfg's) describe other classes
        cfg.pop("label_descriptions", None)
    if not the_model:
        return
    ignored = recorded_ignored_classes(checkpoint)
    if ignored:
        model.ignored_classes = ignored
    trained_on = recorded_training_data(checkpoint)
    if trained_on:
        model.training_data = trained_on
