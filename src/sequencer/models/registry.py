"""Model registry: ``create_model(name, ...)`` and ``list_models(pattern)``.

Model files register their variants here (``register_model``); this module imports none of them, so the registry
and the models import one way only (``models/__init__.py`` imports the model files to fill it)."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
from dataclasses import dataclass

from torch import nn

from ..errors import SequencerError
from .features import FeatureExtractor
from .hub import load_pretrained
from .loading import load_checkpoint


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    kwargs: dict
    pretrained_cfg: dict


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, cls: type, kwargs: dict, pretrained_cfg: dict) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ModelEntry(name, cls, dict(kwargs), dict(pretrained_cfg, architecture=name))


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Sorted registered names matching the shell-style ``pattern``; ``pretrained`` keeps those with weights."""
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (not pretrained or e.pretrained_cfg.get("url")))


def get_model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `sequencer models` for the list"
        raise SequencerError(f"unknown model {name!r}", hint=hint) from None


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


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices=None,
        pretrained_cfg_overlay: dict | None = None,
        use_ema: bool = True,
        **overrides,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    ``pretrained`` loads the released ImageNet weights (downloaded once into the torch hub cache);
    ``checkpoint_path`` loads a file in any supported layout (release, timm, our training checkpoints,
    safetensors). A head trained for another class count is dropped and re-initialised with a warning.
    ``use_ema`` picks a training checkpoint's EMA weights when it has them.
    ``features_only`` returns a module giving per-stage NCHW feature maps (``out_indices`` picks stages).
    ``pretrained_cfg_overlay`` replaces fields of the model's ``pretrained_cfg`` (e.g. ``url``, ``sha256``).
    ``overrides`` replace architecture arguments (e.g. ``union="add"``, ``proj_drop_rate=0.1``).
    Bad names and arguments raise SequencerError.
    """
    entry = get_model_entry(name)
    cfg = copy.deepcopy(entry.pretrained_cfg)
    cfg.update(pretrained_cfg_overlay or {})
    user_kwargs = dict(overrides, in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if num_classes is not None:
        user_kwargs["num_classes"] = num_classes
    if img_size is not None:
        user_kwargs["img_size"] = int(img_size)
        cfg["input_size"] = (in_chans, int(img_size), int(img_size))
    else:
        cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    kwargs = dict(entry.kwargs, **user_kwargs)
    _check_keywords(name, entry.cls, kwargs)
    model = entry.cls(**kwargs)  # its refused values raise ArgumentValueError; anything else is a bug: traceback
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    model.pretrained_cfg = model.default_cfg = cfg
    model.model_name = name
    model.model_kwargs = user_kwargs  # create_model(model.model_name, **model.model_kwargs) rebuilds it
    if pretrained and not checkpoint_path:
        load_pretrained(model, cfg)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path, use_ema=use_ema)
    if features_only:
        model = FeatureExtractor(model, out_indices)
    return model
