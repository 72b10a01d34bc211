"""A fingerprint of this package's kernel code, which every call of our custom ops carries into the traced graph.

Inductor's on-disk caches (the FX graph cache and AOTAutograd's, under ``TORCHINDUCTOR_CACHE_DIR``) key a graph on
its code and torch's own state, not on the Python behind a custom op (pytorch#160472): the fake kernels, the
autograd formulas and the autocast kernels that the tracer runs below dynamo's graph. A graph compiled against an
older version of these ops (before an upgrade, or an edit of a kernel) was served again: old numbers, or a crash
where an op's outputs changed. Each op takes :data:`KERNEL_CODE` as a constant argument (``kernel_code``, unused by
the op itself), so it is written into every graph that calls one, forward and backward, and into the caches' keys:
any change of this package's kernel sources is a cache miss, and an unchanged package still hits. Nothing of the
user's torch configuration is touched. Exports never see it: they capture ATen's own recurrent ops.
"""
from __future__ import annotations

import hashlib
from importlib import resources


def source_fingerprint(package: str) -> str:
    """A hash of the ``.py`` files of ``package`` (names and bytes, in name order); read through importlib's
    resources, so it works for an installed wheel, a source checkout or a zipped package alike."""
    digest = hashlib.sha256()
    files = sorted((f for f in resources.files(package).iterdir() if f.name.endswith(".py")), key=lambda f: f.name)
    for source in files:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


KERNEL_CODE = source_fingerprint(__package__)
