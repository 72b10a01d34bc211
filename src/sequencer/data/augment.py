"""timm's RandAugment / AutoAugment / AugMix as the paper trained with them, on today's Pillow.

timm's posterize ops can ask for 0 bits: RandAugment's ``inc1`` policies ("PosterizeIncreasing") at magnitude
10 (``rand-m9-mstd0.5-inc1``, the paper's policy, reaches it for about 0.2% of images), "Posterize" at magnitude 0,
and AutoAugment's ``original``/``v0`` sub-policy ``('Posterize', 0.8, 2)``. Pillow keeps the ``bits`` high bits of
every channel; with 0 bits the Pillow of the paper's time therefore returned a black image, while Pillow 13 raises
``ValueError: bits must be between or equal to 1 and 8`` and kills the data worker.

:func:`keep_zero_bit_posterize` swaps the posterize function inside the built transform's ops (nothing global is
patched), so the fix travels with the transform into data-loader workers, forked or spawned.
"""
from __future__ import annotations

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment


def posterize(img: Image.Image, bits_to_keep, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of each channel; 8 or more keeps the image, 0 or fewer gives black."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits >= 1:
        return ImageOps.posterize(img, bits)
    # no bit kept: every value masks to 0 (what Pillow's lookup table did for 0 bits), in the image's own mode
    return img.point([0] * 256 * len(img.getbands()))


def _augment_ops(obj):
    """Every timm AugmentOp inside a transform: Compose.transforms, RandAugment/AugMix .ops, AutoAugment .policy."""
    if isinstance(obj, timm_auto_augment.AugmentOp):
        yield obj
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _augment_ops(item)
        return
    for attr in ("transforms", "ops", "policy"):
        children = getattr(obj, attr, None)
        if isinstance(children, (list, tuple)):
            yield from _augment_ops(children)


def keep_zero_bit_posterize(transform):
    """Make ``transform``'s timm posterize ops give a black image for 0 bits instead of raising; returns it."""
    for op in _augment_ops(transform):
        if op.aug_fn is timm_auto_augment.posterize:
            op.aug_fn = posterize
    return transform
