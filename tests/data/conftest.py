import numpy as np
import pytest
from PIL import Image


def write_images(folder, classes=("a", "b"), per_class=3, size=8, ext=".png", seed=0):
    """Write ``per_class`` random RGB images per class into folder/CLASS/; returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / c / f"{c}_{i}{ext}"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    """ImageNet-style root with train/ (2 classes x 3) and validation/ (2 classes x 2) splits of 8 px PNGs."""
    root = tmp_path / "imagenet"
    write_images(root / "train", per_class=3)
    write_images(root / "validation", per_class=2, seed=1)
    return root
