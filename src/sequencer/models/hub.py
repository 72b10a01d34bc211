"""Released weights from the hub: download once into the torch hub cache (atomic, checked against the published
SHA-256, with a progress bar on stderr unless :data:`download_progress` says not) and load them into a model.
Checkpoint formats and key layouts are :mod:`sequencer.models.loading`'s.
"""
from __future__ import annotations

import contextvars
import hashlib
import http.client
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

from ..errors import SequencerError
from .loading import extract_state_dict, load_state_dict_into, read_checkpoint

_logger = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 60.0
# whether a download of released weights shows its progress bar: off in a library call made with progress=False
# (sequencer.engine.guest.console sets it for the calling thread's call), which prints nothing at all
download_progress = contextvars.ContextVar("sequencer_download_progress", default=True)


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
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
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
    ``sha256`` is set aside (:func:`set_aside`) and downloaded afresh. ``file://`` URLs take the same path. Network failures raise SequencerError naming the
    URL; ``timeout`` (seconds per network operation) keeps an unreachable host from hanging forever.
    """
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / filename
    if dest.exists() and sha256 and _sha256(dest) != sha256:
        _logger.warning(f"cached weights {dest} fail the sha256 of {url}: set aside as {set_aside(dest).name}, "
                        f"downloading afresh")
    if not dest.exists():
        _fetch(url, dest, sha256, progress, timeout)
    return dest


def set_aside(path: Path) -> Path:
    """Renames a cached file that this package cannot use to ``<name>.<its sha256[:8]>.rejected`` beside it and
    returns the new path. Deleting it is not this package's call: the torch hub cache is keyed by file name alone,
    so the file may be another tool's, or the user's."""
    kept = path.with_name(f"{path.name}.{_sha256(path)[:8]}.rejected")
    os.replace(path, kept)
    return kept


def load_pretrained(model: nn.Module, pretrained_cfg: dict) -> None:
    """Fetch (once) and load the released weights named by ``pretrained_cfg['url']``."""
    url = pretrained_cfg.get("url")
    name = pretrained_cfg.get("architecture", type(model).__name__)
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
    load_state_dict_into(model, extract_state_dict(checkpoint), source=f"pretrained weights {url}")
