"""Synthetic segmentation data for the tests: Pascal VOC and ADE20K folder layouts of coloured shapes on noise.

Three classes: 0 background (grey noise), 1 red squares, 2 blue discs; palette PNG masks (VOC colours), 255 on a
one-pixel border around each shape as VOC marks object edges. Learnable to a high mIoU in a few seconds by a tiny
model; a model that predicts only background, the trivial baseline, scores background-fraction / 3 (about 26 %).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from sequencer.data.segmentation import voc_palette

# a sequencer2d_nano backbone shrunk to a few thousand parameters, and a narrow head
TINY_SEGMENTER = ["--backbone", "sequencer2d_nano", "--backbone-kwargs", "layers=(1,1)", "patch_sizes=(2,1)",
                  "embed_dims=(16,16)", "hidden_sizes=(4,4)", "mlp_ratios=(2,2)", "--head-channels", "16",
                  "--out-channels", "16"]
COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def draw_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8) with one or two shapes."""
    h, w = size
    image = np.clip(rng.normal(120, 35, size=(h, w, 3)), 0, 255)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for label in rng.permutation([1, 2])[:rng.integers(1, 3)]:
        side = int(rng.integers(10, min(h, w) // 2 + 4))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        if label == 1:
            inside = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        else:
            r = side / 2
            inside = (yy - top - r) ** 2 + (xx - left - r) ** 2 <= r * r
        image[inside] = np.clip(np.array(COLOURS[int(label)]) + rng.normal(0, 20, size=(int(inside.sum()), 3)), 0, 255)
        mask[inside] = label
    edge = np.zeros_like(mask, dtype=bool)  # 255 where a pixel's right or lower neighbour has another label
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    mask[edge] = 255
    return image.astype(np.uint8), mask


def palette_png(mask: np.ndarray) -> Image.Image:
    img = Image.fromarray(mask)
    img.putpalette(voc_palette())
    return img


def make_voc(root: Path, n_train: int = 32, n_val: int = 12, seed: int = 0, sizes=((48, 48), (40, 56))) -> Path:
    """root/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}; images of the given sizes
    (alternating), stored as PNG so that pixels are exact."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:03d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            image, mask = draw_sample(rng, sizes[i % len(sizes)])
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
            palette_png(mask).save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def make_ade20k(root: Path, n_train: int = 6, n_val: int = 3, seed: int = 1) -> Path:
    """root/{images,annotations}/{training,validation}: grayscale masks, 0 = other, shapes labelled 1 and 2."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = draw_sample(rng, (32, 32))
            mask[mask == 255] = 0  # ADE20K has no border label: 0 is "other"
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def object_info(root: Path, names: list[str], separator: str = "\t") -> Path:
    """root/objectInfo150.txt as the challenge ships it: a header, then ``Idx Ratio Train Val Name`` per class
    (``names`` written as given: synonym lists)."""
    header = separator.join(["Idx", "Ratio", "Train", "Val", "Name"])
    rows = [separator.join([str(i), "0.0100", "100", "10", name]) for i, name in enumerate(names, start=1)]
    path = root / "objectInfo150.txt"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def signal_in_training_step(monkeypatch, signum: int, step: int = 3) -> None:
    """Send ``signum`` to this process in ``segment train``'s ``step``-th training step (counted over the run from
    1; the third is epoch 1's first at two steps an epoch), as Ctrl-C or a scheduler's SIGTERM would."""
    from sequencer.engine import segmentation as seg_engine

    loss, calls = seg_engine.segmentation_loss, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return loss(*args)

    monkeypatch.setattr(seg_engine, "segmentation_loss", signalled)
