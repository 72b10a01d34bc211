"""Held-out splits carved from a training split (``--val-fraction``), named by file so that a resumed run and
``validate`` use the same one.

A sample's key is its file relative to the dataset's root (``cat/1.png``), or for tars ``TAR:MEMBER`` relative to
the folder of tars (``cat.tar:img/1.png``; a single tar: ``:MEMBER``); keys are '/'-separated.
"""
from __future__ import annotations

import copy
import os

import numpy as np

from ..errors import SequencerError


def sample_key(dataset, ref) -> str:
    """The key of the sample ``ref`` (a path, or a tar's (path, member, offset, size)) of ``dataset``."""
    if isinstance(ref, str):
        # a folder's files are os.path.join(root, ...): cut the root off (relpath makes both absolute first, a
        # per-file cost that shows at ImageNet's 1.28M files); relpath for a path given otherwise
        prefix = os.path.join(dataset.root, "")
        rel = ref[len(prefix):] if ref.startswith(prefix) else os.path.relpath(ref, dataset.root)
        return rel.replace(os.sep, "/")
    tar, member = ref[:2]
    where = "" if os.path.isfile(dataset.root) else os.path.relpath(tar, dataset.root).replace(os.sep, "/")
    return f"{where}:{member}"


def sample_keys(dataset) -> list[str]:
    """The keys of ``dataset``'s samples, in sample order."""
    return [sample_key(dataset, ref) for ref, _ in dataset.samples]


def carve_held_out(dataset, fraction: float, seed: int) -> list[str]:
    """The keys of a stratified held-out share of ``dataset``: ``round(fraction * n)`` images of each class of n
    (at least one where a class has two or more, never all of it), drawn with ``seed``; sorted."""
    if not 0 < fraction < 1:
        raise SequencerError(f"`val_fraction={fraction}`: must be between 0 and 1 (e.g. 0.1)")
    if not hasattr(dataset, "samples"):
        raise SequencerError(f"`val_fraction`: {dataset.description} is not an image folder or tar",
                             hint="carving a held-out split needs files (image folders or tars)")
    rng = np.random.default_rng(seed)
    keys = sample_keys(dataset)
    by_class: dict[int, list[int]] = {}
    for i, (_, target) in enumerate(dataset.samples):
        by_class.setdefault(target, []).append(i)
    held_out = []
    for target in sorted(by_class):
        members = by_class[target]
        n = min(max(int(round(fraction * len(members))), 1 if len(members) > 1 else 0), len(members) - 1)
        held_out += [keys[members[j]] for j in rng.permutation(len(members))[:n]]
    if not held_out:
        raise SequencerError(f"`val_fraction={fraction}` holds out no image of {dataset.description}",
                             hint="use a larger fraction, or more images per class")
    return sorted(held_out)


def split_by_keys(dataset, held_out: list[str] | set[str]) -> tuple:
    """(``dataset`` without the samples named by ``held_out``, a copy of it with only them); ``dataset`` itself is
    unchanged. The held-out copy's description says where it came from."""
    wanted = set(held_out)
    keys = sample_keys(dataset)
    rest, carved = copy.copy(dataset), copy.copy(dataset)
    rest.samples = [s for s, k in zip(dataset.samples, keys) if k not in wanted]
    carved.samples = [s for s, k in zip(dataset.samples, keys) if k in wanted]
    carved.skipped = set()
    carved.description = f"{dataset.description} (held-out files)"
    return rest, carved
