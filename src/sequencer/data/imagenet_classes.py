"""Readable names of the 1000 ImageNet-1k classes, in the usual class-index order.

Derived at import from timm's bundled ``ImageNetInfo`` (a file shipped inside timm, nothing is downloaded): the first
synonym of each WordNet description, e.g. ``"tench, Tinca tinca"`` -> ``"tench"``. The two names that would collide
("crane" bird/machine, "maillot" twice) are disambiguated so every name is unique.
"""
from __future__ import annotations

from timm.data import ImageNetInfo

# first synonyms that are ambiguous in ImageNet-1k
_DISAMBIGUATE = {134: "crane (bird)", 517: "crane (machine)", 639: "tank suit"}


def _readable_names() -> tuple[str, ...]:
    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
    for index, name in _DISAMBIGUATE.items():
        names[index] = name
    return tuple(names)


IMAGENET_CLASSES: tuple[str, ...] = _readable_names()
