"""Checks that a written PNG is a real picture of the expected size."""
import numpy as np
from PIL import Image


def assert_real_png(path, size):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size, f"{path}: {img.size} != {size}"
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 0, f"{path} is blank"
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 16, f"{path} has only {len(colours)} colours"
