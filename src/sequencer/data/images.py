"""Reading image files: any PIL mode to 8-bit RGB, upright as its EXIF orientation says (as a phone shows it),
decoded at once so that a bad file fails where it is read."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image, ImageOps

_logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the stored pixels must turn to be upright
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """A sample's image could not be read or decoded; ``.path`` names it."""

    def __init__(self, path: str, reason: object):
        super().__init__(f"unreadable image {path}: {reason}")
        self.path = path


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB version of a decoded ``img`` of any PIL mode.

    Grayscale, CMYK and YCbCr convert directly; images with transparency (RGBA, LA, palette with a transparent index,
    grey or RGB with a PNG transparent colour) are composited onto white, as a viewer shows them; 16/32-bit integer
    and float images are rescaled to 8 bits instead of being clipped (PIL's own ``convert`` turns most of a 16-bit
    image white). An embedded ICC profile is not applied: pixels are taken as sRGB, as timm and torchvision take them.
    """
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "RGB"):  # a palette index, or a PNG tRNS grey/colour key
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I (32-bit int), F (float)
        return Image.fromarray(_to_8_bits(np.asarray(img, dtype=np.float64), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8_bits(a: np.ndarray, mode: str) -> np.ndarray:
    """uint8 version of the pixels ``a`` of a 16/32-bit integer or float image: 16-bit (and values up to 65535)
    divided by 257, floats of [0, 1] times 255, 8-bit ranges kept, wider ranges scaled by their peak; not-a-number
    pixels (a float TIFF's "no data") are black and leave the scale of the rest alone."""
    finite = np.isfinite(a)
    peak = float(a[finite].max()) if finite.any() else 0.0
    if peak > 65535:
        a = a * (255.0 / peak)
    elif mode.startswith("I;16") or peak > 255:
        a = a / 257.0  # 65535 -> 255
    elif mode == "F" and peak <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    return np.clip(np.rint(np.where(finite, a, 0.0)), 0, 255).astype(np.uint8)


def load_image(source: str | os.PathLike | io.IOBase) -> Image.Image:
    """Fully decode an image file (path or binary file object) to RGB, turned upright by its EXIF orientation (a
    phone's JPEG stored 64x32 with orientation 6 comes out 32x64, as torchvision's ``decode_image(...,
    apply_exif_orientation=True)`` gives it); raises PIL/OS errors for bad files."""
    return load_image_with_header(source)[0]


def load_image_with_header(source: str | os.PathLike | io.IOBase) -> tuple[Image.Image, tuple[int, int], int]:
    """:func:`load_image`'s image, with the file's stored (width, height) and EXIF orientation: what pixels that
    label the image as stored (a segmentation mask) need to turn with it, read from the one decode."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return load_image_with_header(f)
    img = Image.open(source)
    _warn_if_huge(img, getattr(source, "name", "an image in a tar"))
    img.load()  # decode now, so corrupt and truncated files fail here and not inside a transform
    stored, orientation = img.size, exif_orientation(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img), stored, orientation


def _warn_if_huge(img: Image.Image, name: str) -> None:
    """Name an image over ``PIL.Image.MAX_IMAGE_PIXELS``: PIL's own warning (a possible decompression bomb) names no
    file, and Python shows it once per process."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        _logger.warning("large image %s: %dx%d px, over PIL.Image.MAX_IMAGE_PIXELS (%d); read anyway (twice that "
                        "is refused as a possible decompression bomb)", name, img.width, img.height, limit)


def exif_orientation(img: Image.Image) -> int:
    """An opened image's EXIF orientation, 1 (stored upright) to 8; 1 without the tag."""
    return img.getexif().get(EXIF_ORIENTATION, 1)


def upright_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of pixels stored as ``stored_size`` once turned upright: orientations 5-8 turn by 90 degrees."""
    return stored_size[::-1] if orientation in _QUARTER_TURNS else tuple(stored_size)


def turned_upright(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` turned as EXIF ``orientation`` says (what :func:`load_image` does to a tagged file), for pixels that
    carry no tag of their own but belong to a tagged image, such as its label mask."""
    method = _TURNS.get(orientation)
    return img.transpose(method) if method is not None else img


# the EXIF orientations (the TIFF 6.0 / EXIF 2.3 Orientation tag) as the transposition that makes the pixels upright
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
_QUARTER_TURNS = (5, 6, 7, 8)
