"""Atomic file writes: every file a command produces is complete or absent, never half-written."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import SequencerError


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
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise SequencerError(f"cannot write to output folder {str(parent)!r} ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
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
