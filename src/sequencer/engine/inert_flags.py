"""The train flags that only act beside another one (``--clip-mode`` needs ``--clip-grad``, ``--mixup-prob`` a
mixup, ``--patience-epochs`` the plateau schedule, ...): one line at the start of a run for each such flag the user
set that does nothing in it, so a setting never goes unused in silence. timm ignores them alike; a run still starts
(a timm command line keeps working)."""
from __future__ import annotations

from .config import LR_SCALING, TrainConfig, config_defaults

_SCHEDULES_WITH = {  # the --sched kinds (timm's create_scheduler_v2) that read each schedule flag
    "decay_epochs": ("step", "wsd", "rsqrt"), "decay_milestones": ("multistep",), "patience_epochs": ("plateau",),
    "decay_rate": ("step", "multistep", "plateau", "poly"), "lr_k_decay": ("cosine", "poly"),
    **{name: ("cosine", "tanh", "poly") for name in ("lr_cycle_mul", "lr_cycle_decay", "lr_cycle_limit")},
}
_AUGMENTATION = ("aa", "reprob", "hflip", "scale", "ratio", "color_jitter", "train_interpolation", "mixup", "cutmix",
                 "cutmix_minmax")
_MIXING = ("mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch")


NEW_RUN_WEIGHTS = "sets a new run's weights; a resume continues from its checkpoint's"


def _why_inert(cfg: TrainConfig, given, resuming: bool) -> dict[str, str]:
    """{setting: why it does nothing in ``cfg``'s run} for every setting that cannot act in it (``given``: the
    settings the user chose; ``resuming``: the run continues a checkpoint)."""
    why = {}
    if resuming:  # `resume=auto` finding nothing starts a new run from them, so they are no error
        why.update(dict.fromkeys(("initial_checkpoint", "initial_checkpoint_ema", "pretrained"), NEW_RUN_WEIGHTS))
        if not cfg.experiment:  # (`resume=auto` needs `experiment`) outputs.make_output_dir
            why["output"] = "is not where a resume without `experiment` writes: it continues in its checkpoint's folder"
    if "lr" in given:
        why.update(dict.fromkeys(LR_SCALING, "derives an lr, and `lr` is given"))
    if cfg.clip_grad is None:
        why["clip_mode"] = "applies only with `clip_grad`"
    if not cfg.bce_loss:
        why["bce_target_thresh"] = "applies only with `bce_loss`"
    if not cfg.model_ema:
        why.update(dict.fromkeys(("model_ema_decay", "model_ema_warmup", "model_ema_force_cpu"),
                                 "applies only with `model_ema`"))
    if not cfg.torchcompile:
        why["torchcompile_mode"] = "applies only with `torchcompile`"
    if not cfg.amp:
        why["amp_dtype"] = "applies only with `amp` (this run computes in float32)"
    if not cfg.resume:
        why["no_resume_opt"] = "applies only with `resume`"
    if not cfg.initial_checkpoint:
        why["initial_checkpoint_ema"] = "applies only with `initial_checkpoint`"
    if cfg.lr_noise is None:
        why.update(dict.fromkeys(("lr_noise_pct", "lr_noise_std"), "applies only with `lr_noise`"))
    if not cfg.warmup_epochs:
        why.update(dict.fromkeys(("warmup_lr", "warmup_prefix"), "applies only with `warmup_epochs` above 0"))
    if cfg.reprob == 0:
        why.update(dict.fromkeys(("remode", "recount"), "applies only with `reprob` above 0"))
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        why.update(dict.fromkeys(_MIXING, "applies only with `mixup` or `cutmix`"))
    if cfg.sched == "none":  # timm builds no scheduler: the lr stays `lr` and the run `epochs` long
        why.update(dict.fromkeys(("warmup_epochs", "warmup_lr", "warmup_prefix", "min_lr", "cooldown_epochs",
                                  "lr_noise", "lr_noise_pct", "lr_noise_std", "sched_on_updates"),
                                 "is not read by `sched=none` (a constant lr)"))
    for name, kinds in _SCHEDULES_WITH.items():
        if cfg.sched not in kinds:
            why[name] = f"is not read by `sched={cfg.sched}` (only by {', '.join(kinds)})"
    if cfg.no_aug:
        why.update(dict.fromkeys((*_AUGMENTATION, *_MIXING, "remode", "recount"), "is off with `no_aug`"))
    return why


def notes(cfg: TrainConfig, given, resuming: bool = False) -> list[str]:
    """One line per setting in ``given`` (the settings the user chose) that asks for something and does nothing in
    ``cfg``'s run. A setting at its default (an ``args.yaml`` given as ``--config`` lists them all) or off (0, None,
    False: ``hflip=0`` beside ``no_aug``) asks for nothing that goes unused."""
    defaults = config_defaults()
    why = _why_inert(cfg, given, resuming)
    return [inert_note(name, getattr(cfg, name), why[name])
            for name in sorted(given) if name in why and getattr(cfg, name) not in (defaults[name], 0, None, False)]


def inert_note(name: str, value, why: str) -> str:
    """The one line that says a setting given does nothing in the run (``train``'s and ``segment train``'s)."""
    return f"`{name}={_shown(value)}` {why}; it has no effect in this run"


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
