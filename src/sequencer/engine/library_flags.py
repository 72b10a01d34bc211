"""Checks of the train flags whose values go straight to a library (torch.compile, timm's optimizers, schedulers,
augmentation policies), run before anything is written: a typo is one line naming the flag, never a traceback
from deep inside the library after the experiment folder was made."""
from __future__ import annotations

from ..errors import SequencerError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ERASING_MODES = ("const", "rand", "pixel")


def check_library_flags(cfg) -> None:
    """Raise SequencerError for a value of --torchcompile(-mode), --opt, --sched, --aa, --remode or
    --train-interpolation that the library would refuse (or silently treat as something else)."""
    check_compile(cfg.torchcompile, cfg.torchcompile_mode)
    _check_optimizer(cfg.opt)
    _check_schedule(cfg.sched)
    _check_augment(cfg)


def check_compile(backend: str | None, mode: str | None) -> None:
    """SequencerError for a torch.compile ``backend`` or ``mode`` that torch does not have (``backend`` None or
    "": eager)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise SequencerError(f"`torchcompile_mode={mode}`: unknown mode", hint=f"modes: {', '.join(COMPILE_MODES)}")
    if not backend:
        return
    import torch._dynamo
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise SequencerError(f"`torchcompile={backend}`: unknown torch.compile backend",
                             hint=f"backends: {', '.join(torch._dynamo.list_backends())}")


def _check_optimizer(opt: str) -> None:
    from timm.optim import list_optimizers
    name = opt.lower()
    for prefix in ("lookahead_",):  # timm's optimizer wrappers, spelled as a prefix
        name = name.removeprefix(prefix)
    if name not in list_optimizers():
        raise SequencerError(f"`opt={opt}`: unknown optimizer", hint="see timm.optim.list_optimizers()")


def _check_schedule(sched: str) -> None:
    """timm's factory is asked, as the run will ask it: newer timm refuses an unknown name, timm 1.0.15 (the floor)
    returned no schedule, so that a typo trained at a constant `lr`."""
    import torch
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=2, updates_per_epoch=1)
    except ValueError:
        scheduler = None
    if scheduler is None and sched != "none":
        raise SequencerError(f"`sched={sched}`: unknown schedule",
                             hint="cosine, tanh, step, multistep, plateau, poly, none, or another of timm's")


def _check_augment(cfg) -> None:
    from ..choices import INTERPOLATIONS
    if cfg.remode not in ERASING_MODES:
        raise SequencerError(f"`remode={cfg.remode}`: unknown random erasing mode",
                             hint=f"modes: {', '.join(ERASING_MODES)}")
    if cfg.train_interpolation not in INTERPOLATIONS:
        raise SequencerError(f"`train_interpolation={cfg.train_interpolation}`: unknown interpolation",
                             hint=f"choices: {', '.join(INTERPOLATIONS)}")
    if cfg.aa:
        from timm.data import create_transform
        try:  # build the policy once, as the loader will: timm parses the string there
            create_transform(32, is_training=True, auto_augment=cfg.aa)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
            raise SequencerError(f"`aa={cfg.aa}`: not an augmentation policy timm knows ({e or type(e).__name__})",
                                 hint="e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, 3a") from None
        skipped = _sections_timm_skips(cfg.aa)
        if skipped:
            raise SequencerError(f"`aa={cfg.aa}`: timm would skip {', '.join(map(repr, skipped))} without a word: each "
                                 f"section after the policy's name is a key and a number", hint="e.g. m9, mstd0.5, "
                                 "inc1 (rand-m9-mstd0.5-inc1 is the paper's policy)")


def _sections_timm_skips(policy: str) -> list[str]:
    """The sections of an augmentation policy string that timm's parser passes over: one without a digit (``incl``
    typed for ``inc1`` trained with the plain ops instead of the increasing ones, ``mX`` at magnitude 10), other than
    RandAugment's ``t`` section naming its ops."""
    name, *sections = policy.split("-")
    return [s for s in sections if not any(c.isdigit() for c in s) and not (name == "rand" and s.startswith("t"))]
