"""The one rule that turns files into labelled samples, for image folders, tar files, ``validate`` and ``predict``.

- A class is a top-level folder of the split (``SPLIT/CLASS/``); an image anywhere below it belongs to it, however
  deep (``train/cat/2019/a.jpg`` is a cat). Sub-folders never become classes of their own.
- Hidden entries are not data: a file or folder whose name starts with "." (``.ipynb_checkpoints``, ``.DS_Store``,
  macOS ``._a.jpg``), macOS's ``__MACOSX`` folder and a Synology NAS's ``@eaDir`` thumbnail folders are skipped,
  with everything below them.
- A file is an image by its extension (`IMAGE_EXTENSIONS`, any case).
- Symbolic links are followed, but each real file counts once, at its own path: a link to what lies inside the split
  anyway (``cat/more -> ../dog``) and a link back to a folder above it (a loop, ``cat/up -> ..``) are skipped with
  a warning each (`walk_images`).
- A folder of tar files (``SPLIT/CLASS.tar``): each tar is a class named after the file; its images may sit in any
  folder inside it.
- Class names are Unicode NFC (`class_name`): a folder from a macOS zip spells "café" decomposed (NFD), and it is the
  same class as the composed "café" of a class map, a checkpoint or another split.
"""
from __future__ import annotations

import copy
import logging
import os
import posixpath
import tarfile
import unicodedata
from pathlib import Path
from typing import Iterator

from ..errors import SequencerError

_logger = logging.getLogger(__name__)

# what Pillow reads (.avif where it was built with AVIF: features.check("avif"); elsewhere such a file is named as
# unreadable, never silently left out)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm",
                    ".pgm", ".pbm")
# folders tools add next to the data: archivers (macOS zip), a Synology NAS (a thumbnail folder in every folder,
# `cat/@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg`: resized copies of the photos, which would count as more photos)
NOT_DATA = ("__MACOSX", "@eaDir")

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


def find_split_folder(root: str, split: str) -> str:
    """The sub-folder (or ``.tar``) of ``root`` holding ``split``; ``root`` itself when it has no split folders."""
    entries = os.listdir(root)
    found_split = find_split(entries, split, root, suffixes=("", ".tar"))
    if found_split is not None:
        return os.path.join(root, found_split)
    found = sorted(e for e in entries if e.lower() in SPLIT_NAMES or
                   (e.lower().endswith(".tar") and e.lower()[:-4] in SPLIT_NAMES))
    if found:
        raise SequencerError(f"split {split!r} not found in {root!r}", hint=f"splits found: {', '.join(found)}")
    return root  # class folders directly


def held_out_split(root: str | None, split: str) -> str:
    """``split``, or "test" when ``split`` means validation and ``root`` has no such folder but a test split.

    A dataset shipped as train/ and test/ (CIFAR-style) then trains and validates without ``--val-split test``.
    """
    if not root or not os.path.isdir(os.path.expanduser(str(root))):
        return split
    entries = {e.lower() for e in os.listdir(os.path.expanduser(str(root)))}

    def present(name: str) -> bool:
        return any(a.lower() in entries or a.lower() + ".tar" in entries for a in split_aliases(name))

    is_val = split.lower() in SPLIT_SYNONYMS["val"]
    return "test" if is_val and not present(split) and present("test") else split


def has_split(root: str | None, split: str) -> bool:
    """Whether the folder or .tar ``root`` holds a split folder (or ``SPLIT.tar``) for ``split`` or a synonym."""
    root = os.path.expanduser(str(root or ""))
    if os.path.isdir(root):
        return find_split(os.listdir(root), split, root, suffixes=("", ".tar")) is not None
    if os.path.isfile(root) and root.lower().endswith(".tar"):
        try:
            return split_prefix_in_tar([m.name for m in tar_members(root)], split, root) != ""
        except SequencerError:  # split folders, but not this one
            return False
    return False


def is_hidden(name: str) -> bool:
    """A file or folder name that is not data (dot-files and dot-folders, ``__MACOSX``, ``@eaDir``)."""
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


def walk_images(folder: str, real_dirs: set[str] | None = None) -> Iterator[str]:
    """The '/'-separated paths (relative to ``folder``) of the image files below it, hidden entries pruned.

    Symbolic links are followed, but each real file is yielded once: a link to a folder or image that lies inside
    ``folder`` anyway is skipped (its images count at their own path, under their own class), and a link back to
    a folder above it (a loop, ``cat/up -> ..``) is skipped; each with one warning. ``real_dirs`` (if given)
    receives the real path of every folder read (of a linked image: its folder), so that two splits can be checked
    for shared files.
    """
    root = os.path.realpath(folder)
    visited = {root}
    pending = [("", root)]  # (path relative to folder, its real path)
    while pending:
        rel, real = pending.pop()
        if real_dirs is not None:
            real_dirs.add(real)
        with os.scandir(os.path.join(folder, *rel.split("/")) if rel else folder) as listing:
            entries = sorted(listing, key=lambda e: e.name, reverse=True)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                target = _followed_folder(entry, child, folder, real, root, visited)
                if target is not None:
                    pending.append((child, target))
            elif is_image_name(entry.name) and not _counted_elsewhere(entry, child, folder, root, real_dirs):
                yield child
            elif rel and entry.is_symlink() and not os.path.exists(entry.path):  # the split's own: check_class_entries
                _logger.warning("skipped symbolic link %s: it leads to %s, which does not exist",
                                os.path.join(folder, *child.split("/")), os.readlink(entry.path))


def find_images(paths: list[str]) -> list[Path]:
    """The files named plus the image files under the folders named (recursively, sorted); duplicates dropped.

    Raises SequencerError for a path that does not exist or when no image is found at all.
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file():
            found[p] = None
        elif p.is_dir():
            for rel in sorted(walk_images(str(p))):  # hidden entries below a folder are not data
                found[p / rel] = None
        else:
            raise SequencerError(f"{str(p)!r} does not exist")
    if not found:
        raise SequencerError(f"no image files found in {', '.join(map(repr, paths))}",
                             hint=f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return list(found)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _followed_folder(entry: os.DirEntry, rel: str, folder: str, parent: str, root: str, visited: set) -> str | None:
    """The real path of the folder ``entry`` to walk into, or None for a link not to follow (warned about)."""
    if not entry.is_symlink():
        return os.path.join(parent, entry.name)
    target = os.path.realpath(entry.path)
    shown = os.path.join(folder, *rel.split("/"))
    if _inside(parent, target):
        _logger.warning("skipped symbolic link %s: it leads back to %s, a folder above it (a loop)", shown, target)
        return None
    if _inside(target, root) or target in visited:
        _logger.warning("skipped symbolic link %s: its images (in %s) are read once, at their own path", shown, target)
        return None
    visited.add(target)
    return target


def _counted_elsewhere(entry: os.DirEntry, rel: str, folder: str, root: str, real_dirs: set | None) -> bool:
    """True for a link to an image that is read at its own path inside ``folder``."""
    if not entry.is_symlink():
        return False
    target = os.path.realpath(entry.path)
    if _inside(target, root) and os.path.isfile(target) and class_of(os.path.relpath(target, root).replace(os.sep, "/")) is not None:
        _logger.warning("skipped symbolic link %s: its image %s is read at its own path",
                        os.path.join(folder, *rel.split("/")), target)
        return True
    if real_dirs is not None:
        real_dirs.add(os.path.dirname(target))
    return False


ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".7z", ".rar")


def archive_stem(name: str) -> str | None:
    """"cat" for an archive file name such as "cat.zip" or "cat.tar.gz"; None for any other name."""
    low = name.lower()
    return next((name[:-len(ext)] for ext in ARCHIVE_EXTENSIONS if low.endswith(ext) and len(low) > len(ext)), None)


def check_class_entries(folder: str, classes: set[str]) -> None:
    """Name what a split ``folder`` holds that gives no class: one warning per class folder without image files
    (none where no folder holds any: the caller's one-line "no images found" says it all);
    SequencerError for an archive beside the class folders whose class has no folder (``train/cat.zip`` beside
    ``train/dog/``: the class would be lost), a warning where that class has a folder too; SequencerError for a
    symbolic link to a folder that does not exist (``train/cat -> /mnt/usb/cats`` with the drive unmounted)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_hidden(name):
            continue
        if os.path.islink(path) and not os.path.exists(path) and not is_image_name(name):
            raise SequencerError(f"{path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist: "
                                 f"class {class_name(name)!r} would be lost",
                                 hint="mount or restore what it leads to, or remove the link")
        if os.path.isdir(path):
            if classes and class_name(name) not in classes:
                _logger.warning("ignoring class folder %s: it holds no image files", path)
            continue
        stem = archive_stem(name)
        if stem is not None and class_name(stem) in classes:
            _logger.warning("ignoring %s beside the class folder %s (archives inside a split are not read)", path,
                            os.path.join(folder, stem))
        elif stem is not None:
            raise SequencerError(f"{path!r} is an archive beside the class folders of {folder!r}: class {stem!r} "
                                 f"would be lost", hint=f"extract it into {os.path.join(folder, stem)}, or pass a "
                                                        f"folder holding only CLASS.tar files with `name=tar`")


# ------------------------------------------------------------------------------------------------------------ tars
def tar_members(path: str) -> list[tarfile.TarInfo]:
    """The regular files in the tar ``path``; SequencerError naming it when it is missing or not a tar.

    A hard link is a file of its own (named as the link, its target's bytes), as in the folder the tar was made
    from: ``tar cf`` stores every name of a hard-linked file after the first as a link to it. So is a symbolic link
    to a file the tar holds (``tar cf`` of a folder of links stores the links), and a link to a folder it holds
    holds that folder's files under its own name; one that may be data (an image's name,
    or a folder's) leading to nothing in the tar is refused, naming it: its images would be lost.
    """
    try:
        with tarfile.open(path) as tf:
            members = tf.getmembers()
    except (OSError, EOFError, tarfile.TarError) as e:
        # tarfile's "could not be opened" lists every compression it tried, one line each
        reason = "not a tar archive" if isinstance(e, tarfile.ReadError) and "\n" in str(e) else str(e)
        raise SequencerError(f"cannot read tar dataset {path!r}: {reason}") from None
    return _files_and_links(members, path)


def _files_and_links(members: list[tarfile.TarInfo], path: str) -> list[tarfile.TarInfo]:
    files = {posixpath.normpath(m.name): m for m in members if m.isfile()}
    links = {posixpath.normpath(m.name): m for m in members if m.issym()}
    found, folder_links = [], []
    for m in members:
        target = files.get(posixpath.normpath(m.linkname)) if m.islnk() else m if m.isfile() else None
        if m.issym():
            end = _link_end(m, links)
            target = files.get(end)
            if target is None and end is not None and any(name.startswith(end + "/") for name in files):
                folder_links.append((m.name, end))  # a folder the tar holds (a split alias: val -> validation)
                continue
            if target is None and _may_be_data(m.name):
                raise SequencerError(f"cannot read tar dataset {path!r}: its member {m.name!r} is a symbolic link to "
                                     f"{m.linkname!r}, which is not a file or folder in the tar: its images would be "
                                     f"lost", hint="make the tar with `tar -h` (--dereference), which stores the files "
                                                   "that links lead to")
        if target is not None:
            found.append(_named(target, m.name))
    # a link to a folder holds that folder's files under its own name, as the folder read through the link does
    return found + [_named(f, link + posixpath.normpath(f.name)[len(end):])
                    for link, end in folder_links for f in found if posixpath.normpath(f.name).startswith(end + "/")]


def _named(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """``member`` read under ``name`` (a copy, where that is not its own)."""
    if member.name == name:
        return member
    member = copy.copy(member)
    member.name = name
    return member


def _link_end(link: tarfile.TarInfo, links: dict) -> str | None:
    """The member name the symbolic link member ``link`` leads to (through other links); None for an absolute
    target or a loop."""
    seen = set()
    while link.issym():
        if link.linkname.startswith("/"):
            return None
        name = posixpath.normpath(posixpath.join(posixpath.dirname(posixpath.normpath(link.name)), link.linkname))
        if name in seen:
            return None
        seen.add(name)
        if name not in links:
            return name
        link = links[name]
    return None


def _may_be_data(name: str) -> bool:
    """Whether a tar member ``name`` may hold images: an image's name, or a folder's (no extension), none hidden."""
    parts = [p for p in posixpath.normpath(name).split("/") if p not in ("", ".")]
    return bool(parts) and not any(is_hidden(p) for p in parts) and (
        is_image_name(parts[-1]) or not posixpath.splitext(parts[-1])[1])


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
