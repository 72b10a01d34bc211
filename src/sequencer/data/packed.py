"""An image folder's file list with no Python object per file.

A list of ``(path, target)`` tuples costs three Python objects per file (about 180 bytes each file, measured with
``benchmarks/data_scale.py``). A data-loader worker forked from the process shares that memory only until it touches
an object's reference count, which any read does; the operating system then copies the touched page into the worker.
Over an epoch every worker touches pages all over the list, so with ImageNet's 1.28M files, 8 workers per process and
8 processes the list ends up copied up to 64 times (PyTorch issue 13246). `PackedSamples` holds the paths as one bytes
object and the offsets and targets as two numpy arrays: three objects in all, whatever the number of files.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class PackedSamples(Sequence):
    """``[(path, target)]``, read as a list of tuples (index, iterate, ``len``), stored as the paths' bytes in the
    file-system encoding (a name that is not UTF-8 comes back as it was), their end offsets and the targets
    (int64 arrays, (N,))."""

    def __init__(self, samples: Iterable[tuple[str, int]] = ()):
        paths, targets = [], []
        for path, target in samples:
            paths.append(os.fsencode(path))
            targets.append(int(target))
        self._paths = b"".join(paths)
        self._ends = np.cumsum(np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths)))
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._paths[start:int(self._ends[i])]), int(self.targets[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        start = 0
        for end, target in zip(self._ends.tolist(), self.targets.tolist()):  # not numpy's per-item scalars
            yield os.fsdecode(self._paths[start:end]), target
            start = end

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None  # equal to a list of the same tuples, and lists are unhashable

    def __repr__(self) -> str:
        return f"PackedSamples({len(self)} files)"
