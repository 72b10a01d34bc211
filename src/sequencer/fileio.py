"""Atomic file writes: every file a command produces is complete or absent, never half-written; and none replaces a
file the command reads (`input_overwritten`)."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import SequencerError

# Temporaries are ".<target name>.<anything>.tmp" in the target's folder: the names write_atomically (mkstemp) and
# every other writer give them, and the one pattern remove_stale_temporaries clears after a kill.
TEMP_SUFFIX = ".tmp"
STALE_TEMP_GLOB = ".*" + TEMP_SUFFIX


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], what: str = "file") -> Path:
    """Call ``write(tmp_path)``, fsync the file and rename it onto ``path``: readers never see a partial file.

    On failure the temporary file is removed and any previous ``path`` is left as it was. Raises SequencerError
    naming ``path`` when the folder is missing or not writable or the disk is full.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SequencerError(f"output folder {str(parent)!r} does not exist", hint="create it first")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise SequencerError(f"cannot write to output folder {str(parent)!r} ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the mode a plain open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "the disk is full" if full else (e.strerror or str(e))
        raise SequencerError(f"could not write {what} {str(path)!r}: {reason}; nothing was half-written and any "
                             f"previous {path.name} is unchanged",
                             hint="free some space or choose another output" if full else "choose another output"
                             ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(parent)
    return path


def existing_folder(path: str | os.PathLike, what: str, hint: str | None = None) -> Path:
    """``path`` as a Path; SequencerError naming it (``what``) where it is a file (with ``hint``) or nothing is
    there."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SequencerError(f"{what} {os.fspath(path)!r} is a file, not a folder", hint=hint)
    if not folder.is_dir():
        raise SequencerError(f"{what} {os.fspath(path)!r} does not exist")
    return folder


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """The folder ``path``, created with its missing parents for the block's writes; when the block fails (an error,
    Ctrl-C) the folders this created are removed again while they are empty, so a failed command leaves no debris.
    Raises SequencerError naming it (``what``) when it cannot be created or written in."""
    folder = Path(path)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SequencerError(f"cannot create {what} {str(folder)!r} ({e.strerror or e})") from None
    try:
        if not os.access(folder, os.W_OK):
            raise SequencerError(f"{what} {str(folder)!r} is not writable")
        yield folder
    except BaseException:
        for made in created:
            try:
                os.rmdir(made)  # fails, as it should, once anything was written there
            except OSError:
                break
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name next to ``path`` for writers that cannot use write_atomically (hard links, plots)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporaries a killed run left in ``folder`` (they can be checkpoint-sized)."""
    for stale in Path(folder).glob(STALE_TEMP_GLOB):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: restore at once
    os.umask(mask)
    return mask


def input_overwritten(outputs, inputs) -> tuple[Path, Path] | None:
    """(output, input) for the first of ``outputs`` that is one of ``inputs`` (the same file by any name: another
    spelling, a link), which writing it would replace; None where none is. An output not yet there is no input."""
    found = {}
    for path in inputs:
        try:
            stat = os.stat(path)
        except OSError:  # not there (yet): no output replaces it
            continue
        found.setdefault((stat.st_dev, stat.st_ino), Path(path))
    for path in outputs:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in found:
            return Path(path), found[(stat.st_dev, stat.st_ino)]
    return None
