"""Semantic-segmentation data: Pascal VOC and ADE20K folder layouts, their up-front checks, and image+mask transforms.

Layouts (found by their folders):

- **Pascal VOC**: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette or grayscale PNGs of class
  indices), ``ImageSets/Segmentation/<split>.txt`` (one id a line). 21 classes by default.
- **ADE20K** (``ADEChallengeData2016``): ``images/{training,validation}/<name>.jpg`` and
  ``annotations/{training,validation}/<name>.png``. 150 classes, named by the folder's ``objectInfo150.txt`` or
  else the same names embedded (:mod:`sequencer.data.ade20k`); 0 means "other" and is ignored by
  ``reduce_zero_label`` (on by default for this layout): 0 -> 255, k -> k-1.

Mask value 255 is ignored everywhere (VOC's object borders). :func:`check_pairs` reads every mask once before a run
starts, so a bad file is one line naming it before anything is written, not a crash hours later. The transforms
(:class:`TrainTransform`, :class:`EvalTransform`) follow mmsegmentation's ADE20K / Pascal VOC pipelines, the numbers
peers report: geometry applies to image and mask together, masks are resized nearest-neighbour and padded with 255.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SequencerError
from ..fileio import existing_folder
from .ade20k import ADE20K_CLASSES, ade20k_class_names
from .class_folders import IMAGE_EXTENSIONS
from .images import (READ_ERRORS, UnreadableImageError, exif_orientation, load_image_with_header, turned_upright,
                     upright_size)

IGNORE_INDEX = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
ADE20K_NUM_CLASSES = len(ADE20K_CLASSES)
LAYOUTS = ("voc", "ade20k")
_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
MASK_MODES = ("P", "L")  # palette or 8-bit grayscale PNGs of class indices


@dataclass
class SegmentationSplit:
    """One split of a dataset: its (image, mask) file pairs and how to read their labels.

    ``masks`` is None for a split listed without masks (never the case for the two layouts' train/val splits).
    """
    root: Path
    layout: str
    split: str
    images: list[Path]
    masks: list[Path]
    num_classes: int
    reduce_zero_label: bool
    class_names: list[str]

    @property
    def description(self) -> str:
        return f"{self.layout} split {self.split!r} of {self.root}"

    def __len__(self) -> int:
        return len(self.images)


def _dataset_folder(root: str | os.PathLike) -> Path:
    """``root`` as a Path; SequencerError where it is not a folder (a file, or nothing there)."""
    return existing_folder(root, "dataset folder", hint="pass the Pascal VOC or ADE20K folder")


def detect_layout(root: str | os.PathLike) -> str:
    """"voc" or "ade20k" from the folders under ``root``; SequencerError naming what was expected otherwise."""
    root = _dataset_folder(root)
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    raise SequencerError(f"{str(root)!r} is neither a Pascal VOC folder (JPEGImages/, SegmentationClass/) nor an "
                         f"ADE20K one (images/, annotations/)", hint="pass the folder that holds them")


def open_split(root: str | os.PathLike, split: str, layout: str = "", num_classes: int | None = None,
               reduce_zero_label: bool | None = None, class_names: list[str] | None = None,
               decode_images: bool = False) -> SegmentationSplit:
    """List ``split`` of the dataset at ``root`` (layout detected unless given) and check every pair
    (:func:`check_pairs`; ``decode_images``: the images decoded too). ``num_classes`` defaults to the layout's
    (21 / 150); ``reduce_zero_label`` to True for ADE20K only. Raises SequencerError (one line naming the file) for
    any bad input."""
    root = _dataset_folder(root)  # also when the layout is given (a checkpoint's): not "id list ... does not exist"
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise SequencerError(f"unknown dataset layout {layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
    reduce = (layout == "ade20k") if reduce_zero_label is None else bool(reduce_zero_label)
    if num_classes is None:
        num_classes = ADE20K_NUM_CLASSES if layout == "ade20k" else len(VOC_CLASSES)
    if not 1 <= num_classes <= IGNORE_INDEX - int(reduce):
        raise SequencerError(f"`num_classes={num_classes}`: must be 1..{IGNORE_INDEX - int(reduce)} (8-bit masks, "
                             f"{IGNORE_INDEX} is ignored)")
    images, masks = (_voc_pairs if layout == "voc" else _ade20k_pairs)(root, split)
    if not images:
        raise SequencerError(f"{layout} split {split!r} of {str(root)!r} lists no images")
    names = list(class_names) if class_names else default_class_names(layout, num_classes, root)
    if len(names) != num_classes:
        raise SequencerError(f"{len(names)} class names for {num_classes} classes")
    out = SegmentationSplit(root, layout, split, images, masks, num_classes, reduce, names)
    check_pairs(out, decode_images=decode_images)
    return out


def default_class_names(layout: str, num_classes: int, root: str | os.PathLike) -> list[str]:
    """The layout's own names when ``num_classes`` is its default (VOC's 21; ADE20K's 150, from
    ``root/objectInfo150.txt`` when there is one), else ``class_<i>``."""
    if layout == "voc" and num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    if layout == "ade20k" and num_classes == ADE20K_NUM_CLASSES:
        return ade20k_class_names(root)
    return [f"class_{i}" for i in range(num_classes)]


def _voc_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    id_list = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not id_list.is_file():
        raise SequencerError(f"id list {str(id_list)!r} does not exist",
                             hint="name a split that ImageSets/Segmentation holds")
    ids = [line.strip() for line in id_list.read_text().splitlines() if line.strip()]
    images, masks = [], []
    for image_id in ids:
        image = _find_image(root / "JPEGImages", image_id)
        if image is None:
            raise SequencerError(f"{str(id_list)!r} names image {image_id!r}, but "
                                 f"{str(root / 'JPEGImages' / image_id)}.jpg does not exist")
        images.append(image)
        masks.append(root / "SegmentationClass" / f"{image_id}.png")
    return images, masks


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in (".jpg", ".jpeg", ".png"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def _ade20k_pairs(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    folder_name = _ADE_SPLITS.get(split, split)
    folder = root / "images" / folder_name
    if not folder.is_dir():
        raise SequencerError(f"ADE20K split folder {str(folder)!r} does not exist",
                             hint="use `train_split=training` / `val_split=validation`")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    masks = [root / "annotations" / folder_name / f"{p.stem}.png" for p in images]
    return images, masks


# ------------------------------------------------------------------------------------------------ checks
def check_pairs(split: SegmentationSplit, threads: int = 8, decode_images: bool = False) -> None:
    """Check every (image, mask) pair before anything runs; SequencerError naming the first bad file (in list order).

    Image sizes come from headers; each mask is decoded once for its values (a 256-bin histogram), in threads.
    ``decode_images``: each image is decoded too (a truncated file has a sound header): for a split that must be
    read whole, such as the one a training run evaluates on, which would otherwise stop at its first evaluation.
    """
    def problem(index: int) -> str | None:
        return _pair_problem(split.images[index], split.masks[index], split.num_classes, split.reduce_zero_label,
                             decode_images)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(split)))) as pool:
        for message in pool.map(problem, range(len(split))):
            if message:
                raise SequencerError(message)


def _pair_problem(image: Path, mask: Path, num_classes: int, reduce_zero_label: bool,
                  decode_image: bool = False) -> str | None:
    if not image.is_file():
        return f"image {image} does not exist"
    if not mask.is_file():
        return f"mask {mask} does not exist (for image {image.name})"
    try:
        if decode_image:
            _, stored, orientation = load_image_with_header(image)
        else:
            stored, orientation = image_header(image)
    except READ_ERRORS as e:
        return f"image {image} is unreadable ({e})"
    upright = upright_size(stored, orientation)
    try:
        with Image.open(mask) as m:
            if m.mode not in MASK_MODES:
                return (f"mask {mask} is {m.mode}, not a palette or grayscale PNG of class indices (convert colour "
                        f"masks to indices first)")
            if m.size not in (stored, upright):
                turned = f" ({upright[0]}x{upright[1]} upright, by its EXIF orientation)" if upright != stored else ""
                return (f"mask {mask} is {m.size[0]}x{m.size[1]} but its image {image.name} is "
                        f"{stored[0]}x{stored[1]}{turned}")
            counts = m.histogram()
    except READ_ERRORS as e:
        return f"mask {mask} is unreadable ({e})"
    highest = num_classes if reduce_zero_label else num_classes - 1
    bad = [v for v, n in enumerate(counts) if n and v > highest and v != IGNORE_INDEX]
    if bad:
        allowed = f"0..{highest}" + (" (0 = ignored, reduce-zero-label)" if reduce_zero_label else "")
        return (f"mask {mask} holds value {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + f", neither a class ({allowed}) nor {IGNORE_INDEX} (ignored)")
    return None


def image_header(path: str | os.PathLike) -> tuple[tuple[int, int], int]:
    """An image file's stored (width, height) and EXIF orientation, from its header."""
    with Image.open(path) as img:
        return img.size, exif_orientation(img)


def read_mask(path: str | os.PathLike, reduce_zero_label: bool, header: tuple = ((0, 0), 1)) -> np.ndarray:
    """A mask file as an (H, W) uint8 array of class indices (255 = ignore), zero label reduced when asked.

    ``header``: its image's stored size and EXIF orientation (:func:`image_header`,
    :func:`~sequencer.data.images.load_image_with_header`). The image is read upright, so a mask of the image's
    stored size, labelling the pixels as stored, is turned with it; a mask of the upright size only (drawn on the
    upright picture) is kept."""
    stored, orientation = header
    with Image.open(path) as m:
        if orientation != 1 and m.size == tuple(stored):
            m = turned_upright(m, orientation)
        labels = np.array(m, dtype=np.uint8)  # palette PNGs decode to their indices, which are the classes
    if reduce_zero_label:
        labels = labels - 1  # uint8: 0 wraps to 255 (ignored); 255 must stay 255, not 254
        labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
    return labels


# ---------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(torch.utils.data.Dataset):
    """``(image, mask)`` samples of a :class:`SegmentationSplit` through ``transform`` (see :class:`TrainTransform`,
    :class:`EvalTransform`): image (3, H, W) float, mask (H', W') int64 with 255 = ignore."""

    def __init__(self, split: SegmentationSplit, transform=None):
        self.split = split
        self.transform = transform
        self.description = split.description

    def __len__(self) -> int:
        return len(self.split)

    def describe(self, index: int) -> str:
        return str(self.split.images[index])

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        path = self.split.images[index]
        try:
            image, *header = load_image_with_header(path)  # one decode gives the header the mask turns by
            mask = read_mask(self.split.masks[index], self.split.reduce_zero_label, header)
        except READ_ERRORS as e:
            raise UnreadableImageError(str(path), e) from None
        return image, mask

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        image, mask = self.load(index)
        pair = tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(mask))
        image_t, mask_t = self.transform(*pair) if self.transform is not None else pair
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


# the long side is at most this many times the short side, in training (times the ratio drawn) and evaluation:
# mmsegmentation's ADE20K and Pascal VOC scale (2048, 512) with keep_ratio, at other sizes (4 * size, size)
LONG_SIDE_CAP = 4


def rescaled_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """(h, w) of an image of ``height`` x ``width`` scaled, aspect kept, so that its short side is ``short`` and its
    long side at most ``long`` (an image more elongated than ``long / short`` gets a shorter short side), each side
    rounded to the nearest pixel (1 at least): mmcv's ``imrescale`` with scale (``long``, ``short``)."""
    scale = min(short / min(height, width), long / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def eval_size_of(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) an image of ``height`` x ``width`` is evaluated at: short side ``size``, long side at most
    ``LONG_SIDE_CAP * size`` (:func:`rescaled_size`; mmsegmentation's test resize, scale (2048, 512))."""
    return rescaled_size(height, width, size, LONG_SIDE_CAP * size)


class EvalTransform:
    """Evaluation: the image resized, aspect kept, to short side ``size`` with its long side at most 4 x ``size``
    (:func:`eval_size_of`), bilinear without antialiasing (as mmsegmentation's OpenCV resize, and as
    :class:`TrainTransform` resizes: the model is scored on images made as its training images were; antialiased
    before 2026-12-07), and normalised; the mask is left at its own resolution, where metrics are computed (logits
    are resized back to it, bilinear, before the argmax, as mmsegmentation does)."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, h, w) float, normalised."""
        from torchvision.transforms.v2 import functional as F

        resized = F.resize(image, list(eval_size_of(*image.shape[-2:], self.size)), antialias=False)
        return F.normalize(F.to_dtype(resized, torch.float32, scale=True), self.mean, self.std)

    def __call__(self, image, mask):
        return self.image(image.as_subclass(torch.Tensor)), mask


class TrainTransform:
    """Training augmentation of an (image, mask) pair, mmsegmentation's ADE20K / Pascal VOC train pipeline:

    1. resize, aspect kept, by a ratio r ~ U(``scale_range``): short side ``int(crop * r)``, long side at most
       ``int(LONG_SIDE_CAP * crop * r)`` (:func:`rescaled_size`, the evaluation's rule; mmsegmentation's
       ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)`` at crop 512), the image bilinear
       without antialiasing (as OpenCV resizes there), the mask nearest-neighbour;
    2. a random window of at most ``crop`` x ``crop``, drawn again (10 times at most, then the last draw is kept)
       while one class covers ``cat_max_ratio`` or more of its labelled pixels, or it holds fewer than two classes
       (``RandomCrop(cat_max_ratio=0.75)``; ignored pixels do not count);
    3. a horizontal flip with probability 0.5;
    4. :class:`PhotometricDistortion`;
    5. normalisation, then padding on the right and bottom to ``crop`` x ``crop`` with 0 (the mean colour: the
       peers pad the normalised image, as the backbone pads its input) and 255 (ignored) in the mask.

    Called on (3, H, W) uint8 and (H, W) integer tensors (``tv_tensors`` too); returns (3, crop, crop) float32 and
    (crop, crop) int64. Its random numbers are torch's (seeded per loader worker)."""

    def __init__(self, crop: int, mean, std, scale_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75):
        self.crop, self.mean, self.std = int(crop), tuple(mean), tuple(std)
        self.scale_range, self.cat_max_ratio = tuple(scale_range), float(cat_max_ratio)
        self.photometric = PhotometricDistortion()

    def resized(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        low, high = self.scale_range
        ratio = low + (high - low) * float(torch.rand(()))
        size = list(rescaled_size(*image.shape[-2:], max(1, int(self.crop * ratio)),
                                  max(1, int(LONG_SIDE_CAP * self.crop * ratio))))
        return (F.resize_image(image, size, InterpolationMode.BILINEAR, antialias=False),
                F.resize_mask(mask[None], size)[0])

    def window(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, drawn as step 2 says."""
        height, width = mask.shape
        h, w = min(self.crop, height), min(self.crop, width)
        for attempt in range(11):
            top = int(torch.randint(height - h + 1, ()))
            left = int(torch.randint(width - w + 1, ()))
            if self.cat_max_ratio >= 1 or attempt == 10:
                break
            counts = torch.bincount(mask[top:top + h, left:left + w].flatten().long(), minlength=IGNORE_INDEX + 1)
            counts = counts[torch.arange(counts.numel()) != IGNORE_INDEX]
            if (counts > 0).sum() > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left, h, w

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as F

        image, mask = self.resized(image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor))
        top, left, h, w = self.window(mask)
        image, mask = image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        image = F.normalize(self.photometric(image) / 255, self.mean, self.std)
        pad = (0, self.crop - w, 0, self.crop - h)
        return (torch.nn.functional.pad(image, pad, value=0.0),
                torch.nn.functional.pad(mask.long(), pad, value=IGNORE_INDEX))


class PhotometricDistortion:
    """mmsegmentation's ``PhotoMetricDistortion`` (its defaults), on a (3, H, W) uint8 image -> float32 in 0..255.

    Each step applies with probability 0.5: brightness, a value U(-32, 32) *added* to every channel; contrast, the
    channels *multiplied* by U(0.5, 1.5) (about 0, not about the mean), either second or last (a coin); saturation,
    HSV saturation times U(0.5, 1.5), capped at 1, hue and value kept (:func:`scaled_saturation`); hue, shifted by an
    integer k in [-18, 17] of OpenCV's 180 hue steps, k / 180 of the colour circle (up to 36 degrees; torchvision's
    ``ColorJitter(hue=0.05)``, used here before 2026-12-07, reached 18). Every step clips to 0..255. The same
    operations and ranges, not the same pixels: computed in float, where mmsegmentation rounds down to uint8 after
    each step and goes through OpenCV's 8-bit HSV. No channel swap (torchvision's ``RandomPhotometricDistort`` also
    permutes the channels, which makes a red object blue)."""

    brightness_delta = 32.0
    contrast_range = (0.5, 1.5)
    saturation_range = (0.5, 1.5)
    hue_delta = 18  # of OpenCV's 180 hue steps

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        def coin() -> bool:
            return bool(torch.rand(()) < 0.5)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(()))

        x = image.float()
        if coin():
            x = (x + uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = coin()
        if contrast_first and coin():
            x = (x * uniform(*self.contrast_range)).clamp(0, 255)
        if coin():
            x = scaled_saturation(x, uniform(*self.saturation_range))
        if coin():
            steps = int(torch.randint(-self.hue_delta, self.hue_delta, ()))
            x = F.adjust_hue(x / 255, steps / 180) * 255
        if not contrast_first and coin():
            x = (x * uniform(*self.contrast_range)).clamp(0, 255)
        return x


def scaled_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """A (3, H, W) float RGB image with each pixel's HSV saturation times ``factor`` (capped at 1), its hue and value
    kept: every channel's distance below the pixel's maximum is scaled by the same number."""
    value = image.amax(0, keepdim=True)
    chroma = value - image.amin(0, keepdim=True)
    cap = torch.where(chroma > 0, value / chroma.clamp(min=1e-12), torch.full_like(value, factor))
    return value - torch.minimum(cap, torch.full_like(cap, factor)) * (value - image)


def voc_palette(n: int = 256) -> list[int]:
    """The Pascal VOC colour map as a flat [r, g, b, ...] list of ``n`` colours: class bits spread over the high
    bits of the three channels, so neighbouring classes get distant colours."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
