"""The training configuration: :class:`TrainConfig`, whose fields are ``sequencer train``'s flags with their
defaults (timm's ``train.py`` defaults), how they merge with the digits demo's defaults and a ``--config`` YAML, and
how they become one run's settings (:func:`resolve_config`). The checks that refuse values which cannot work are
``config_checks``; the command and :func:`sequencer.train` both go through :func:`resolve_config` and
``config_checks.check_config``, so they accept and refuse the same settings.

The settings machinery of a library call is shared by every settings dataclass (``TrainConfig``, segmentation's
``SegmentConfig``): :func:`records_given` (only the fields set count), :func:`explicit_settings` (a config and/or
keywords), :func:`checked_settings` (unknown names and wrong types refused, one line naming the setting) and
:func:`checked_callbacks`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..errors import SequencerError


@dataclass
class RunState:
    """What one training run keeps beside its settings (never written to args.yaml or checkpoints).

    ``given``: the settings the user chose (flags, keywords or ``--config``); a resume takes every other one from its
    checkpoint. ``start_warnings``: notes held until the run starts (a later one-line error stays the only line);
    ``amp_notes``: the autocast rule's, held with them and said as validate says them (``amp.say_notes``).
    ``quiet``: no progress bar. ``created_dirs``: folders this start created, innermost first, removed again while
    empty when it fails. ``claim``: the experiment folder's claim file while the run holds it. ``wandb``: the
    ``--log-wandb`` run, if any. ``module``: the caller's ``nn.Module`` to train (None: ``model`` names one);
    ``datasets``: the caller's ``(train, val)`` Datasets (None: ``data`` names the data); ``callbacks``: called with
    every epoch's metrics (:func:`sequencer.train`, ``train_segmenter``). ``caller_sigterm``: a library entry point's run, which leaves
    SIGTERM to the caller's own disposition (``stop_request.StopRequest``); ``sigterm_caught``: such a run caught one, to be
    delivered again once it has returned (``stop_request.hand_sigterm_to_caller``).
    """
    given: frozenset[str] = frozenset()
    start_warnings: list[str] = field(default_factory=list)
    amp_notes: list[str] = field(default_factory=list)
    quiet: bool = False
    created_dirs: list[str] = field(default_factory=list)
    claim: str | None = None
    wandb: object | None = None
    module: Any = None
    datasets: tuple | None = None
    callbacks: list[Callable[[dict], Any]] = field(default_factory=list)
    caller_sigterm: bool = False
    sigterm_caught: bool = False


def records_given(cls):
    """Class decorator for a settings dataclass: each instance records the fields passed to its constructor or
    assigned afterwards (:func:`given_settings`), so that only the settings the user chose count."""
    names = [f.name for f in dataclasses.fields(cls)]
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def init_recording_given(self, *args, **kwargs):
        dataclass_init(self, *args, **kwargs)
        object.__setattr__(self, "_given", {*names[:len(args)], *kwargs})

    def setattr_recording_given(self, name, value):
        object.__setattr__(self, name, value)
        if "_given" in self.__dict__:
            self._given.add(name)

    cls.__init__ = init_recording_given
    cls.__setattr__ = setattr_recording_given
    return cls


@records_given
@dataclass
class TrainConfig:
    """One training run's settings; each field is the ``sequencer train`` flag of that name (``--drop-path`` is
    ``drop_path``), with the flag's default.

    ``sequencer.train(TrainConfig(epochs=3, lr=1e-3))`` counts as given only the fields passed to the constructor
    (or assigned afterwards) with a value other than None, exactly as keywords would: the others keep the digits
    demo's defaults and a resume's recorded settings. ``dataclasses.replace`` passes every field, so all count.
    A run never changes the object it is given."""
    data: str | None = None  # dataset root; None (and no dataset) = the embedded digits demo
    config: str = ""
    # dataset
    data_dir: str | None = None
    dataset: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    val_fraction: float = 0.0  # > 0: hold out this share of the training images (data without a held-out split)
    dataset_download: bool = False
    class_map: str = ""
    # model
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    initial_checkpoint: str = ""
    initial_checkpoint_ema: bool | None = None  # its weights: None those its run evaluated, True its EMA, False raw
    resume: str = ""
    no_resume_opt: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    input_size: list[int] | None = None
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str = ""
    batch_size: int = 128
    validation_batch_size: int | None = None
    channels_last: bool = False
    grad_accum_steps: int = 1
    grad_checkpointing: bool = False
    torchcompile: str | None = None
    torchcompile_mode: str | None = None
    device: str | None = None
    # optimizer
    opt: str = "sgd"
    opt_eps: float | None = None
    opt_betas: list[float] | None = None
    momentum: float = 0.9
    weight_decay: float = 2e-5
    clip_grad: float | None = None
    clip_mode: str = "norm"
    layer_decay: float | None = None
    # learning-rate schedule
    sched: str = "cosine"
    sched_on_updates: bool = False
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ""
    lr_noise: list[float] | None = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_cycle_mul: float = 1.0
    lr_cycle_decay: float = 0.5
    lr_cycle_limit: int = 1
    lr_k_decay: float = 1.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    epochs: int = 300
    start_epoch: int | None = None
    decay_milestones: list[int] = field(default_factory=lambda: [90, 180, 270])
    decay_epochs: float = 90
    warmup_epochs: int = 5
    warmup_prefix: bool = False
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    decay_rate: float = 0.1
    # augmentation and regularisation
    no_aug: bool = False
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.1
    bce_loss: bool = False
    bce_target_thresh: float | None = None
    train_interpolation: str = "random"
    drop: float = 0.0
    drop_path: float | None = None
    # model EMA
    model_ema: bool = False
    model_ema_force_cpu: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    # run
    seed: int = 42
    log_interval: int = 50
    checkpoint_hist: int = 10
    workers: int = 4
    amp: bool = False
    amp_dtype: str = "float16"
    output: str = ""
    experiment: str = ""
    eval_metric: str = "top1"
    local_rank: int = 0
    # timm flags typed by habit (engine/timm_habits.py)
    log_wandb: bool = False
    pin_mem: bool = False
    no_prefetcher: bool = False
    dist_bn: str = ""
    recovery_interval: int = 0


def given_settings(cfg) -> dict:
    """{name: value} of the fields the user set on ``cfg`` (a :func:`records_given` dataclass; None values mean the
    default, so they are left out)."""
    return {name: getattr(cfg, name) for name in sorted(getattr(cfg, "_given", ()))
            if getattr(cfg, name) is not None}


def config_defaults(config_class=TrainConfig) -> dict:
    """{field name: default} of ``config_class`` (fresh copies of the list defaults)."""
    fresh = config_class()
    return {f.name: getattr(fresh, f.name) for f in dataclasses.fields(config_class)}


def check_keys(keys, where: str, hint: str, config_class=TrainConfig) -> None:
    """SequencerError naming the keys that are not ``config_class``'s settings (with the closest one), e.g. a
    typo."""
    known = config_defaults(config_class)
    unknown = sorted(set(keys) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean `{close[0]}`? {hint}" if close else hint
        raise SequencerError(f"{where}: unknown key(s) {', '.join(unknown)}", hint=hint)


def explicit_settings(config, settings: dict, config_class, where: str) -> dict:
    """The settings a library call was given: ``config``'s fields set (a ``config_class``), then the keywords
    (which win); a positional other than a ``config_class`` is the data (``train("folder")``). A ``config_class``
    given as the ``config`` keyword counts as the positional (the text ``config`` setting is the --config YAML)."""
    if isinstance(settings.get("config"), config_class):
        if config is not None:
            raise SequencerError(f"{where}: config given twice (positionally and as config=)")
        settings = dict(settings)
        config = settings.pop("config")
    if config is None or isinstance(config, config_class):
        return {**(given_settings(config) if config is not None else {}), **settings}
    if isinstance(config, Mapping):  # a dict of settings (a loaded YAML, a sweep's) was taken for the data
        raise SequencerError(f"{where}: the positional is a {config_class.__name__} or the data, not a dict",
                             hint=f"pass a dict of settings as keywords, {where}(**settings), or as "
                                  f"{config_class.__name__}(**settings)")
    # a script's parsed flags, likewise (argparse is the commands' alone: known by its type's name)
    if (type(config).__module__, type(config).__name__) == ("argparse", "Namespace"):
        raise SequencerError(f"{where}: the positional is a {config_class.__name__} or the data, not an argparse "
                             f"Namespace", hint=f"pass its settings as keywords, {where}(**vars(args))")
    if "data" in settings:
        raise SequencerError(f"{where}: data given twice (positionally and as data=)")
    return {"data": config, **settings}


def checked_settings(explicit: dict, where: str, hint: str, config_class=TrainConfig) -> dict:
    """``explicit`` with each value as its field's type holds it and None values (the default) left out;
    SequencerError naming an unknown key or a value of the wrong type."""
    check_keys(explicit, where, hint, config_class)
    return {k: checked_value(k, v, where, config_class=config_class) for k, v in explicit.items() if v is not None}


def checked_callbacks(callbacks, where: str) -> list:
    """``callbacks`` (one callable or several) as a list; SequencerError for one that is not callable."""
    callbacks = [callbacks] if callable(callbacks) else list(callbacks or ())
    for cb in callbacks:
        if not callable(cb):
            raise SequencerError(f"{where}: callbacks holds {cb!r}, which is not callable",
                                 hint="pass functions taking the epoch's metrics dict")
    return callbacks


# Used when no DATA is given (or --dataset digits): sequencer2d_nano on the 8x8 scikit-learn digits, upscaled.
# Tuned to pass 96% top-1 on the held-out split in well under 2 minutes on 2 CPU cores.
DIGITS_DEFAULTS = dict(
    dataset="digits", model="sequencer2d_nano", img_size=16, epochs=15, batch_size=32, opt="adamw", lr=2e-3,
    weight_decay=0.05, sched="cosine", sched_on_updates=True, warmup_epochs=0, min_lr=1e-5, hflip=0.0,
    scale=[0.75, 1.0], ratio=[0.9, 1.1], color_jitter=0.0, smoothing=0.1, workers=0,
    train_interpolation="bilinear", interpolation="bilinear", log_interval=30, checkpoint_hist=2, val_split="val",
)
LR_SCALING = {"lr_base", "lr_base_size", "lr_base_scale"}  # the settings the lr derives from when `lr` is not given


def resolve_config(explicit: dict, state: RunState | None = None) -> TrainConfig:
    """timm defaults < digits-demo defaults < ``--config`` YAML < ``explicit`` settings (the flags given), as one
    new config; ``state.given`` is set to the settings the user chose (a resume takes every other one from its
    checkpoint). An ``explicit`` value of None means the default. Every value is type-checked (SequencerError
    naming the setting and the type it needs); the demo's defaults apply when there is no data (and
    ``state.datasets`` holds none)."""
    explicit = checked_settings(explicit, "train", "settings are train's flag names with underscores, e.g. drop_path")
    defaults = config_defaults()
    from_yaml = {}
    config_path = explicit.get("config") or ""
    if config_path:
        try:
            with open(config_path) as f:
                from_yaml = yaml.safe_load(f) or {}
        except OSError as e:
            raise SequencerError(f"`config={config_path!r}`: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise SequencerError(f"`config={config_path!r}` is not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:  # a binary file (a checkpoint passed for its args.yaml)
            raise SequencerError(f"`config={config_path!r}` is not a YAML text file (byte {e.start} is not "
                                 f"{e.encoding})", hint="pass a run's args.yaml or a YAML file of flag values"
                                 ) from None
        if not isinstance(from_yaml, dict):
            raise SequencerError(f"`config={config_path!r}` must hold a mapping of flag names to values")
        # keys may be spelled as the flags are (drop-path) or as args.yaml writes them (drop_path)
        from_yaml = {str(k).lstrip("-").replace("-", "_"): v for k, v in from_yaml.items()}
        check_keys(from_yaml, f"`config={config_path!r}`", "keys are train's flag names, e.g. drop-path or drop_path")
        from_yaml.pop("config", None)
        from_yaml = {k: checked_value(k, v, f"`config={config_path!r}`", text_numbers=True)
                     for k, v in from_yaml.items()}
        # `input_size` is `in_chans` + `img_size` (config_checks): a flag for one spelling beats the file's other one
        for flags, spelled_otherwise in ((("input_size",), ("img_size", "in_chans")),
                                         (("img_size", "in_chans"), ("input_size",))):
            if any(f in explicit for f in flags):
                from_yaml = {k: v for k, v in from_yaml.items() if k not in spelled_otherwise}
    if explicit.get("data") and explicit.get("data_dir") and \
            os.path.normpath(str(explicit["data"])) != os.path.normpath(str(explicit["data_dir"])):
        raise SequencerError(f"`data={explicit['data']!r}` and `data_dir={explicit['data_dir']!r}` name different "
                             f"folders", hint="pass the dataset once, as `data` or as `data_dir`")
    if explicit.get("data_dir") and not explicit.get("data"):  # the flag given beats a --config's data
        explicit = {**explicit, "data": explicit["data_dir"]}
    merged = {**defaults, **from_yaml, **explicit}
    data = merged.get("data") or merged.get("data_dir")
    user_data = state is not None and state.datasets is not None
    if not user_data and ((not data and not merged.get("dataset")) or merged.get("dataset") == "digits"):
        chosen = {**from_yaml, **explicit}  # a `lr_base*` chosen without `lr` derives the lr, not the demo's
        demo = {k: v for k, v in DIGITS_DEFAULTS.items() if k != "lr" or "lr" in chosen or not LR_SCALING & {*chosen}}
        merged = {**defaults, **demo, **chosen}
    merged["data"] = merged.get("data") or merged.get("data_dir")
    cfg = TrainConfig(**merged)
    if state is not None:
        state.given = frozenset(explicit) | frozenset(from_yaml)
    return cfg


@functools.cache
def _field_types(config_class) -> dict:
    return typing.get_type_hints(config_class)


def checked_value(name: str, value, where: str, text_numbers: bool = False, config_class=TrainConfig):
    """``value`` for the setting ``name`` as its field's type (in ``config_class``) holds it (a tuple as a list, a
    path as text, an int where a float goes); SequencerError naming the setting and the type it needs.
    ``text_numbers``: a number written as text ("1e-3", as YAML reads it) is taken as the number."""
    expected = _field_types(config_class).get(name)
    if expected is None:
        return value
    if text_numbers and isinstance(value, str):
        value = _number_from_text(value, expected)
    try:
        return _as_type(value, expected)
    except TypeError:
        raise SequencerError(f"{where}: `{name}={_shown(value)}` is not {_type_name(expected)}") from None


def _shown(value) -> str:
    """``repr(value)`` where it is short and one line (a message stays one line), else its type."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"<{type(value).__name__}>"


def _number_from_text(text: str, expected):
    for kind in (int, float):
        if kind in _alternatives(expected):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def _alternatives(tp) -> tuple:
    return typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)


def _as_type(value, tp):
    """``value`` converted to ``tp`` (a settings dataclass's annotation); TypeError when it is not one."""
    if isinstance(tp, types.UnionType):
        for alternative in typing.get_args(tp):
            try:
                return _as_type(value, alternative)
            except TypeError:
                pass
        raise TypeError
    origin = typing.get_origin(tp)
    if tp is type(None) and value is None:
        return None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if tp is dict and isinstance(value, Mapping):
        return dict(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_as_type(v, typing.get_args(tp)[0]) for v in value]
    raise TypeError


def _type_name(tp) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "a bool", int: "an int", float: "a number", str: "a str", dict: "a dict"}.get(tp, str(tp))
