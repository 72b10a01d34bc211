"""The one rule that turns files into labelled samples, for image folders, tar files, ``validate`` and ``predict``.

- A class is a top-level folder of the split (``SPLIT/CLASS/``); an image anywhere below it belongs to it, however
  deep (``train/cat/2019/a.jpg`` is a cat). Sub-folders never become classes of their own.
- Hidden entries are not data: a file or folder whose name starts with "." (``.ipynb_checkpoints``, ``.DS_Store``,
  macOS ``._a.jpg``) and macOS's ``__MACOSX`` folder are skipped, with everything below them.
- A file is an image by its extension (`IMAGE_EXTENSIONS`, any case).
- A folder of tar files (``SPLIT/CLASS.tar``): each tar is a class named after the file; its images may sit in any
  folder inside it.
- Class names are Unicode NFC (`class_name`): a folder from a macOS zip spells "café" decomposed (NFD), and it is the
  same class as the composed "café" of a class map, a checkpoint or another split.
"""
from __future__ import annotations

import os
import tarfile
import unicodedata
from typing import Iterator

from ..errors import SequencerError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
NOT_DATA = ("__MACOSX",)  # folders archive tools add next to the data

# folder names (lower case) that hold a split, grouped by meaning; the first of a group is the canonical name
SPLIT_SYNONYMS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "eval", "evaluation"),
    "test": ("test", "testing"),
}
SPLIT_NAMES = {n for names in SPLIT_SYNONYMS.values() for n in names}


def split_aliases(split: str) -> tuple[str, ...]:
    """``split`` followed by its synonyms, e.g. "validation" -> ("validation", "val", "valid", "eval", ...)."""
    key = split.lower()
    for names in SPLIT_SYNONYMS.values():
        if key in names:
            return (split,) + tuple(n for n in names if n != key)
    return (split,)


def find_split(entries, split: str, where: str, suffixes: tuple[str, ...] = ("",)) -> str | None:
    """The entry of ``entries`` (folder or member names, ending in one of ``suffixes``) that holds ``split``, or None.

    ``split`` or a synonym, an exact name first: ``--split Val`` reads ``Val/`` even beside ``val/``. Otherwise the
    one entry equal to it ignoring case; SequencerError naming them when several differ only in case.
    """
    for alias in split_aliases(split):
        wanted = [alias + suffix for suffix in suffixes]
        exact = [e for e in wanted if e in entries]
        if exact:
            return exact[0]
        folded = {w.lower() for w in wanted}
        matches = sorted(e for e in entries if e.lower() in folded)
        if len(matches) > 1:
            raise SequencerError(f"split {split!r} is ambiguous in {where!r}: {', '.join(matches)} differ only in "
                                 f"case", hint="pass the split's exact folder name, or rename one of them")
        if matches:
            return matches[0]
    return None


def is_hidden(name: str) -> bool:
    """A file or folder name that is not data (dot-files and dot-folders, ``__MACOSX``)."""
    return name.startswith(".") or name in NOT_DATA


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not is_hidden(name)


def class_name(name) -> str:
    """A class name as compared everywhere: text in Unicode NFC (macOS writes file names decomposed, NFD)."""
    return unicodedata.normalize("NFC", str(name))


def class_of(relpath: str) -> str | None:
    """The class of the file at ``relpath`` ('/'-separated, relative to the split): its top-level folder.

    "" for an image directly in the split (no class), None for what is not data (hidden, or not an image).
    """
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or any(is_hidden(p) for p in parts) or not is_image_name(parts[-1]):
        return None
    return class_name(parts[0]) if len(parts) > 1 else ""


def walk_images(folder: str) -> Iterator[str]:
    """The '/'-separated paths (relative to ``folder``) of the image files below it, hidden entries pruned."""
    for dirpath, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        rel = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        for f in files:
            if is_image_name(f):
                yield f if rel == "." else f"{rel}/{f}"


# ------------------------------------------------------------------------------------------------------------ tars
def tar_members(path: str) -> list[tarfile.TarInfo]:
    """The regular files in the tar ``path``; SequencerError naming it when it is missing or not a tar."""
    try:
        with tarfile.open(path) as tf:
            return [m for m in tf.getmembers() if m.isfile()]
    except (OSError, EOFError, tarfile.TarError) as e:
        raise SequencerError(f"cannot read tar dataset {path!r}: {e}") from None


def split_prefix_in_tar(names: list[str], split: str, path: str) -> str:
    """The folder inside a tar that holds ``split`` ("train/", "data/val/", ...), or "" when it has no split folders.

    A tar made of a whole dataset folder (``tar cf data.tar data``) wraps the split folders in one more folder; that
    is looked through too. Raises SequencerError when the tar has split folders but not this one.
    """
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    wrapper = ""
    if len(tops) == 1 and next(iter(tops)).lower() not in SPLIT_NAMES:
        inner = {n.split("/")[1] for n in names if n.count("/") >= 2}
        if any(t.lower() in SPLIT_NAMES for t in inner):
            wrapper, tops = next(iter(tops)) + "/", inner
    visible = [t for t in tops if not is_hidden(t)]
    found_split = find_split(visible, split, path)
    if found_split is not None:
        return f"{wrapper}{found_split}/"
    found = sorted(t for t in visible if t.lower() in SPLIT_NAMES)
    if found:
        raise SequencerError(f"split {split!r} not found in {path!r}", hint=f"splits found: {', '.join(found)}")
    return ""
