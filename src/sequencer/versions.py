"""Release numbers of the packages the code adapts to (onnxruntime's int8 kernels, Triton's interpreter, ...), read
in one place. ``packaging`` is no dependency of this package nor of torch, so the few comparisons needed here use
the leading numbers of a version string, which is all they compare."""
import re


def release(version: str) -> tuple[int, ...]:
    """The numeric release of ``version``, to compare as a tuple: ``"1.24.1"`` -> (1, 24, 1); a local or pre-release
    part ends it (``"2.6.0+cu124"``, ``"3.7.0rc1"``, ``"2.15.0a0+git12ab"`` -> (2, 6, 0), (3, 7, 0), (2, 15, 0)), so a
    pre-release of X counts as X. A string with no leading number is a ValueError."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in match.group().split("."))
