"""Released weights: download once and load them into a model.

Two sources. The authors' GitHub release (a cfg's ``url``): downloaded into the torch hub cache (atomic, checked
against the published SHA-256, with a progress bar on stderr unless :data:`download_progress` says not). The
Hugging Face Hub (a cfg's ``hf_hub_id`` when its ``source`` is ``"hf-hub"``, and every ``hf-hub:ORG/NAME`` model
name): timm's repositories (``config.json`` + ``model.safetensors``), fetched with ``huggingface_hub`` into its
own cache, so ``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_TOKEN`` mean
what they mean to every other Hugging Face tool. Checkpoint formats and key layouts are
:mod:`sequencer.models.loading`'s: a Hub file loads exactly as ``checkpoint_path=`` would load it.
"""
from __future__ import annotations

import contextvars
import hashlib
import http.client
import inspect
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..errors import SequencerError, optional_import
from .loading import load_checkpoint, load_state_dict_into, read_checkpoint, weights_to_load

_logger = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 60.0
# whether a download of released weights shows its progress bar: off in a library call made with progress=False
# (sequencer.engine.guest.console sets it for the calling thread's call), which prints nothing at all
download_progress = contextvars.ContextVar("sequencer_download_progress", default=True)


class ProgressBar(tqdm):
    """A tqdm bar without tqdm's monitor thread, which the first bar of a process starts (shown or not) and which
    runs until the process exits: a library call leaves no thread behind. (The monitor refreshes a bar whose
    updates slowed; these bars update at each step or chunk.)"""

    monitor_interval = 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str | None, progress: bool, timeout: float) -> None:
    """Stream ``url`` into a unique ``.partial`` file next to ``dest``; rename it only once complete and verified."""
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "sequencer"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with ProgressBar(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                             disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and size != expected:
            raise SequencerError(f"download of {url} was cut short ({size} of {expected} bytes)",
                                 hint="retry, or download the file by other means and pass it with `checkpoint_path`")
        if sha256 and digest.hexdigest() != sha256:
            raise SequencerError(f"pretrained weights from {url} failed their sha256 check "
                                 f"(got {digest.hexdigest()}, expected {sha256}); nothing was cached",
                                 hint="retry, or pass a verified file with `checkpoint_path`")
        os.replace(partial, dest)  # atomic: readers see no file or the whole file
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
            e.close()  # its response's socket: the error raised below keeps ``e`` (its __context__) as long as it lives
        else:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise SequencerError(f"could not download pretrained weights from {url} ({reason})",
                             hint="with no network, download the file by other means and pass it with "
                                  "`checkpoint_path`") from None
    finally:
        partial.unlink(missing_ok=True)


def download_weights(url: str, sha256: str | None = None, progress: bool = True,
                     timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` once into ``<torch hub dir>/checkpoints`` and return the local path.

    The file is streamed to a temporary name in that folder and renamed only when complete (its length matches
    ``Content-Length``) and, if ``sha256`` is given, when its digest matches; a cached file that fails a known
    ``sha256`` is set aside (:func:`set_aside`) and downloaded afresh. ``file://`` URLs take the same path. Network
    failures raise SequencerError naming the URL; ``timeout`` (seconds per network operation) keeps an unreachable
    host from hanging forever.
    """
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / filename
    digest = _sha256(dest) if dest.exists() and sha256 else None
    if digest is not None and digest != sha256:
        _logger.warning(f"cached weights {dest} fail the sha256 of {url}: set aside as "
                        f"{set_aside(dest, digest).name}, downloading afresh")
    if not dest.exists():
        _fetch(url, dest, sha256, progress, timeout)
    return dest


def set_aside(path: Path, digest: str | None = None) -> Path:
    """Renames a cached file that this package cannot use to ``<name>.<its sha256[:8]>.rejected`` beside it and
    returns the new path (``digest``: its sha256 where already known). Deleting it is not this package's call: the
    torch hub cache is keyed by file name alone, so the file may be another tool's, or the user's."""
    kept = path.with_name(f"{path.name}.{(digest or _sha256(path))[:8]}.rejected")
    os.replace(path, kept)
    return kept


def load_pretrained(model: nn.Module, pretrained_cfg: dict) -> None:
    """Fetch (once) and load the released weights: from the Hugging Face Hub when ``pretrained_cfg['source']`` is
    ``"hf-hub"`` (its ``hf_hub_id``), else from ``pretrained_cfg['url']``."""
    name = pretrained_cfg.get("architecture", type(model).__name__)
    if pretrained_cfg.get("source") == "hf-hub":
        if not pretrained_cfg.get("hf_hub_id"):
            raise SequencerError(f"no Hugging Face Hub copy of the weights of {name!r} is known (`source='hf-hub'` "
                                 f"without an `hf_hub_id`)", hint="name the repository: "
                                 "`pretrained_cfg_overlay=dict(source='hf-hub', hf_hub_id='ORG/NAME')`")
        load_hf_hub_weights(model, pretrained_cfg["hf_hub_id"])
        return
    url = pretrained_cfg.get("url")
    if not url:
        raise SequencerError(f"no pretrained weights are published for {name!r}",
                             hint="train it, or pass `checkpoint_path`")
    path = download_weights(url, sha256=pretrained_cfg.get("sha256"), progress=download_progress.get())
    try:
        checkpoint = read_checkpoint(path)
    except SequencerError as e:
        # a truncated or foreign file must not stay under this name and poison every later run
        kept = set_aside(path)
        raise SequencerError(f"weights {path} from {url} are unusable (set aside as {kept.name}): {e}",
                             hint="run again to download them afresh") from None
    load_state_dict_into(model, weights_to_load(checkpoint, f"pretrained weights {url}")[0],
                         source=f"pretrained weights {url}")


# ---- the Hugging Face Hub ----------------------------------------------------------------------------------------

HF_HUB_PREFIX = "hf-hub:"
# what a timm repository holds its weights in, preferred first (safetensors: no pickle at all)
HF_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# the weights' location and timm's loading switches: a repository's config describes the weights it holds itself
_NOT_FROM_HUB_CONFIG = {"architecture", "url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict",
                        "custom_load"}
_SIZE_FIELDS = ("input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size")


def split_hf_hub_id(hub_id: str) -> tuple[str, str | None]:
    """``"ORG/NAME"`` or ``"ORG/NAME@REVISION"`` -> (repository id, revision or None for its main branch)."""
    repo_id, _, revision = hub_id.partition("@")
    return repo_id, revision or None


class _NotInRepo(Exception):
    """The repository (reached, or in the cache) has no such file."""


class _SilentBar(tqdm):
    """huggingface_hub's progress bar, off (a library call made with progress=False prints nothing)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _hf_hub_file(hub_id: str, filename: str) -> Path:
    """``filename`` of repository ``hub_id`` from huggingface_hub's cache, downloaded there first when needed.

    Raises _NotInRepo when the repository lacks it, SequencerError (one line naming the repository) for anything
    else: no network, HF_HUB_OFFLINE with a cold cache, a gated or missing repository or revision, HTTP errors.
    huggingface_hub writes a download under a temporary name and renames it once complete: a failure leaves no
    partial file in its cache.
    """
    huggingface_hub = optional_import("huggingface_hub", f"{HF_HUB_PREFIX}{hub_id} (the Hugging Face Hub)")
    repo_id, revision = split_hf_hub_id(hub_id)
    options = {}
    if not download_progress.get() and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        options["tqdm_class"] = _SilentBar
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, **options))
    except Exception as e:  # noqa: BLE001  (sorted below; anything that is not the Hub's or the network's is raised)
        raise _hub_failure(hub_id, filename, e) from None


def _hub_failure(hub_id: str, filename: str, error: Exception) -> Exception:
    """The one-line SequencerError (or _NotInRepo) for a failed ``hf_hub_download``; a bug's error unchanged."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    where, endpoint = f"{HF_HUB_PREFIX}{hub_id}", constants.ENDPOINT
    if isinstance(error, GatedRepoError):
        return SequencerError(f"{where} is a gated repository: downloading it needs an account that accepted its "
                              f"terms", hint=f"accept them at {endpoint}/{split_hf_hub_id(hub_id)[0]}, then "
                                             f"`hf auth login` or set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return SequencerError(f"{where}: no such repository on {endpoint} (or it is private)",
                              hint="check the name (ORG/NAME, as timm/sequencer2d_s.in1k); for a private one, "
                                   "`hf auth login` or set HF_TOKEN")
    if isinstance(error, RevisionNotFoundError):
        return SequencerError(f"{where}: the repository has no revision {split_hf_hub_id(hub_id)[1]!r}",
                              hint="name a branch, tag or commit after @, or drop @ for its main branch")
    if isinstance(error, LocalEntryNotFoundError) or type(error).__name__ == "OfflineModeIsEnabled":
        cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
        if getattr(constants, "HF_HUB_OFFLINE", False):
            return SequencerError(f"{where}: HF_HUB_OFFLINE is set and {filename} is not in the Hugging Face "
                                  f"cache ({cache})", hint="run once with network (or copy that cache from a "
                                                           "machine that has it), or unset HF_HUB_OFFLINE")
        reason = _first_line(error.__cause__ or error)
        return SequencerError(f"{where}: could not reach {endpoint} ({reason}) and {filename} is not in the Hugging "
                              f"Face cache ({cache})", hint="check the network, or point HF_ENDPOINT at a mirror; "
                              "with no network, fill the cache on a machine that has one")
    if isinstance(error, EntryNotFoundError):
        return _NotInRepo(filename)
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return SequencerError(f"{where}: downloading {filename} from {endpoint} failed (HTTP {status})",
                              hint="retry later; with no network, fill the cache on a machine that has one")
    if isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests",
                                                                               "urllib3", "huggingface_hub"):
        return SequencerError(f"{where}: downloading {filename} from {endpoint} failed ({_first_line(error)})",
                              hint="retry; with no network, fill the cache on a machine that has one")
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def hf_hub_model_config(hub_id: str) -> tuple[str, dict, dict]:
    """What repository ``hub_id``'s ``config.json`` (timm's layout) says: (architecture, pretrained cfg fields,
    model arguments).

    The pretrained cfg fields are its ``pretrained_cfg`` (mean, std, crop_pct, input_size, interpolation, ...) with
    the top-level ``num_classes``, ``label_names`` and ``label_descriptions``; an older flat config (everything at
    the top, label names as ``labels``) reads the same. The model arguments are its ``model_args`` and
    ``num_classes``: what the weights were made with. SequencerError (one line) for a repository without a usable
    config.json.
    """
    where = f"{HF_HUB_PREFIX}{hub_id}"
    try:
        path = _hf_hub_file(hub_id, "config.json")
    except _NotInRepo:
        raise SequencerError(f"{where}: the repository has no config.json, so it is not a timm model",
                             hint="pass its weights file with `checkpoint_path` and a model name") from None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SequencerError(f"{where}: its config.json ({path}) cannot be read ({_first_line(e)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise SequencerError(f"{where}: its config.json names no architecture, so it is not a timm model")
    nested = config.get("pretrained_cfg")
    cfg = dict(nested) if isinstance(nested, dict) else dict(config)
    if "labels" in cfg and "label_names" not in cfg:
        cfg["label_names"] = cfg.pop("labels")
    cfg.update({k: config[k] for k in ("num_classes", "label_names", "label_descriptions") if k in config})
    cfg = {k: tuple(v) if k in _SIZE_FIELDS and isinstance(v, list) else v
           for k, v in cfg.items() if k not in _NOT_FROM_HUB_CONFIG and k not in ("pretrained_cfg", "model_args")}
    args = dict(config.get("model_args") or {})
    if isinstance(config.get("num_classes"), int):
        args.setdefault("num_classes", config["num_classes"])
    if isinstance(args.get("in_chans"), int) and cfg.get("input_size"):
        cfg["input_size"] = (args["in_chans"], *cfg["input_size"][1:])
    return config["architecture"], cfg, args


def load_hf_hub_weights(model: nn.Module, hub_id: str) -> Path:
    """Load repository ``hub_id``'s weights (``model.safetensors``, else ``pytorch_model.bin``) into ``model``
    exactly as ``checkpoint_path=`` loads a file; returns the cached file. SequencerError (one line naming the
    repository) when it has none, cannot be reached, or they do not fit."""
    where = f"{HF_HUB_PREFIX}{hub_id}"
    for filename in HF_HUB_WEIGHT_FILES:
        try:
            path = _hf_hub_file(hub_id, filename)
            break
        except _NotInRepo:
            continue
    else:
        raise SequencerError(f"{where}: the repository has no weights ({' or '.join(HF_HUB_WEIGHT_FILES)})",
                             hint="name a repository of weights, e.g. hf-hub:timm/sequencer2d_s.in1k")
    try:
        load_checkpoint(model, path)
    except SequencerError as e:
        # the cache is huggingface_hub's: a file it holds is not deleted here, the message says where it is
        raise SequencerError(f"{where}: {e.message}", hint=e.hint or f"delete {path} (`hf cache` manages the "
                                                                      f"cache) and run again") from None
    return path
