"""What the timm train flags users type by habit do here: ``--log-wandb``, ``--pin-mem``, ``--no-prefetcher``,
``--dist-bn`` and ``--recovery-interval``. Each does what it does in timm where that applies to us, or says in one
line what we do instead; none stops a run. (The flags are defined in ``commands/train.py``.)"""
from __future__ import annotations

from .config import given_settings
from .distributed import has_running_stats
from .guest import warn


def notes(cfg, device, model, given=None) -> list[str]:
    """One line per habit flag that has nothing to do on this run (``model``: the model trained; ``given``: the
    settings the user chose, by default the ones set on ``cfg``: a run's resolved config has all of them set)."""
    given = given_settings(cfg) if given is None else given
    out = []
    if cfg.dist_bn and not has_running_stats(model):
        out.append(f"`dist_bn={cfg.dist_bn}`: the model has no BatchNorm (Sequencer models: LayerNorm only), "
                   f"nothing to sync")
    if "dist_bn" in given and cfg.dist_bn == "" and has_running_stats(model):
        # timm's "" leaves each rank scoring its share with its own statistics: logged numbers of no single model
        out.append("`dist_bn=''`: timm's no-sync; here the ranks' BatchNorm statistics are still averaged before "
                   "each evaluation under DDP (as reduce), so the logged numbers are those of the checkpoint's model")
    if device.type != "cuda":
        if cfg.pin_mem:
            out.append(f"`pin_mem`: pinned memory only speeds copies to a GPU; ignored on {device.type}")
        if cfg.no_prefetcher:
            out.append(f"`no_prefetcher`: on {device.type} batches are always normalised by the workers already")
    return out


def loader_options(cfg, device) -> dict:
    """create_loader keywords for --pin-mem and --no-prefetcher (None keeps the loader's default)."""
    cuda = device.type == "cuda"
    return dict(pin_memory=True if cfg.pin_mem and cuda else None,
                normalize_on_device=False if cfg.no_prefetcher else None)


def start_wandb(cfg, args: dict):
    """A wandb run logging ``args`` (or None, with a one-line warning, when wandb is not installed)."""
    if not cfg.log_wandb:
        return None
    try:
        import wandb
    except ImportError:
        warn("`log_wandb`: wandb is not installed, not logging to Weights & Biases (pip install wandb); "
                      "summary.csv has every epoch")
        return None
    return wandb.init(project=cfg.experiment or None, name=cfg.experiment or None, config=args)

