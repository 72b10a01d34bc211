"""Segmentation data: VOC and ADE20K layouts, the up-front checks of bad files, masks through the transforms."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation_helpers import make_ade20k, make_voc, object_info, palette_png
from sequencer.data.ade20k import ADE20K_CLASSES
from sequencer.data.segmentation import (IGNORE_INDEX, EvalTransform, SegmentationDataset, TrainTransform,
                                         eval_size_of, open_split, read_mask, scaled_saturation)
from sequencer.errors import SequencerError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture
def voc(tmp_path):
    return make_voc(tmp_path / "voc", n_train=4, n_val=2)


def test_voc_split_lists_the_id_list_in_order(voc):
    split = open_split(voc, "train", num_classes=3)
    assert split.layout == "voc" and len(split) == 4 and not split.reduce_zero_label
    assert [p.stem for p in split.images] == [f"train_{i:03d}" for i in range(4)]
    assert [p.name for p in split.masks] == [f"train_{i:03d}.png" for i in range(4)]
    assert open_split(voc, "train").class_names[15] == "person"  # 21 classes by default: VOC's names


def test_training_pairs_stay_aligned_through_the_augmentation(voc):
    """Geometry moves image and mask together: after random scale, crop, flip and photometric distortion the pixels
    labelled red-square are still the reddest (photometric changes keep the ordering of red minus blue)."""
    torch.manual_seed(0)
    dataset = SegmentationDataset(open_split(voc, "train", num_classes=3), TrainTransform(32, MEAN, STD))
    red_minus_blue = {1: [], 2: []}
    for _ in range(3):
        for i in range(len(dataset)):
            image, mask = dataset[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert mask.shape == (32, 32) and mask.dtype == torch.int64
            assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
            for label in (1, 2):
                if (mask == label).any():
                    red_minus_blue[label].append((image[0] - image[2])[mask == label].mean().item())
    assert red_minus_blue[1] and red_minus_blue[2]
    assert min(red_minus_blue[1]) > 0 > max(red_minus_blue[2]), red_minus_blue


def test_crop_pads_small_images_with_ignore(voc):
    torch.manual_seed(0)
    dataset = SegmentationDataset(open_split(voc, "train", num_classes=3), TrainTransform(200, MEAN, STD,
                                                                                         (0.2, 0.2)))
    image, mask = dataset[0]  # a 48 px image scaled to a 40 px short side, in a 200 px crop: mostly padding
    assert image.shape == (3, 200, 200)
    assert (mask == IGNORE_INDEX).float().mean() > 0.8


def test_eval_transform_resizes_the_image_and_keeps_the_mask(voc):
    dataset = SegmentationDataset(open_split(voc, "val", num_classes=3), EvalTransform(24, MEAN, STD))
    image, mask = dataset[1]  # 40x56 (H x W)
    assert image.shape == (3, 24, 34) and mask.shape == (40, 56)  # 56 * 24 / 40 = 33.6, rounded as mmcv does
    original = np.array(Image.open(dataset.split.masks[1]))
    assert torch.equal(mask, torch.from_numpy(original).long())


def test_eval_resize_caps_the_long_side_at_four_times_the_size():
    """mmsegmentation's ADE20K/VOC test resize, scale (2048, 512) with keep_ratio: the factor is
    min(2048 / long, 512 / short), so an image wider than 4:1 is scaled by its long side (its short side was set to
    the eval size whatever the long side became); another eval size keeps the 4:1 cap."""
    assert eval_size_of(375, 500, 512) == (512, 683)  # ADE20K's usual shapes: the short side (683 by rounding)
    assert eval_size_of(512, 2048, 512) == (512, 2048)  # 4:1 exactly
    assert eval_size_of(512, 2560, 512) == (410, 2048) and eval_size_of(2560, 512, 512) == (2048, 410)
    assert eval_size_of(300, 3000, 640) == (256, 2560)
    wide = EvalTransform(24, MEAN, STD).image(torch.zeros(3, 40, 200, dtype=torch.uint8))
    assert wide.shape == (3, 19, 96)  # factor min(96 / 200, 24 / 40) = 0.48; was (24, 120)


def test_eval_resize_is_bilinear_without_antialiasing():
    """As mmsegmentation's OpenCV resize (and the training resize): a 4x reduction samples between source columns
    4x + 1 and 4x + 2 only. Columns 1 and 2 of every 4 at 200, the rest 0: each output is 200; antialiasing (used
    before) averaged over ~8 columns, ~100."""
    image = torch.zeros(3, 8, 32, dtype=torch.uint8)
    image[..., 1::4] = image[..., 2::4] = 200
    out = EvalTransform(2, (0, 0, 0), (1, 1, 1)).image(image)
    assert out.shape == (3, 2, 8)
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1 / 255), out[0]


def test_training_resize_caps_the_long_side_as_evaluation_does():
    """mmsegmentation's RandomResize(scale=(2048, 512), ratio_range, keep_ratio): a 10:1 image at ratio 1 is scaled
    to a long side of 4 x crop (eval_size_of's rule), not to a short side of crop (which made it 32 x 320 before).
    The rest of the crop is padding: 0 in the normalised image (the mean colour, as the peers pad, and as the
    backbone pads its input; black before) and ignored in the mask."""
    torch.manual_seed(0)
    image, mask = TrainTransform(32, MEAN, STD, (1.0, 1.0))(torch.full((3, 40, 400), 255, dtype=torch.uint8),
                                                            torch.ones(40, 400, dtype=torch.uint8))
    rows = eval_size_of(40, 400, 32)[0]
    assert rows == 13 and image.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert (mask[:rows] == 1).all() and (mask[rows:] == IGNORE_INDEX).all()
    assert (image[:, rows:] == 0).all() and (image[:, :rows] > 0).all()


def test_training_crop_redraws_windows_where_one_class_covers_most():
    """RandomCrop(cat_max_ratio=0.75): a 32-px window of a 128-px wide mask, class 2 only in columns 56..71, is
    redrawn (up to 10 times) until no class covers 75% of it; one draw passes in ~1 of 3, so without the redraws
    about a third of the crops would hold both classes in proportion."""
    mask = torch.ones(32, 128, dtype=torch.uint8)
    mask[:, 56:72] = 2
    mask[:, :8] = IGNORE_INDEX  # ignored pixels count for no class
    transform = TrainTransform(32, MEAN, STD, (1.0, 1.0))
    torch.manual_seed(0)
    balanced = 0
    for _ in range(30):
        _, crop = transform(torch.zeros(3, 32, 128, dtype=torch.uint8), mask)
        counts = torch.bincount(crop.flatten(), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
        balanced += int((counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum())
    assert balanced >= 27, balanced


def test_photometric_distortion_is_mmsegmentations():
    """PhotoMetricDistortion's operations: brightness adds U(-32, 32) (a black image brightens evenly, which a
    multiplying factor never does), each step with probability 0.5 (most black images stay black), and hue
    moves by whole steps of OpenCV's 180 (2 degrees), up to 36 degrees (ColorJitter(hue=0.05): 18 at most)."""
    transform = TrainTransform(4, (0, 0, 0), (1, 1, 1), (1.0, 1.0))
    mask = torch.ones(4, 4, dtype=torch.uint8)
    torch.manual_seed(0)
    black = [transform(torch.zeros(3, 4, 4, dtype=torch.uint8), mask)[0] for _ in range(100)]
    assert all(torch.equal(b, torch.full_like(b, float(b[0, 0, 0]))) for b in black)  # one value added everywhere
    # black stays black without a brightness step or with a darkening one: 3 in 4
    assert 60 <= sum(float(b.max()) == 0 for b in black) <= 90
    assert 24 / 255 < max(float(b.max()) for b in black) <= 32 * 1.5 / 255  # and a contrast step
    dark_red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    dark_red[0] = 100  # clipped by none of the steps: brightness and contrast keep its hue
    shifts = []
    for _ in range(100):
        r, g, b = (transform(dark_red, mask)[0][:, 0, 0] * 255).tolist()
        hue = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0] * 360
        shifts.append(hue - 360 if hue > 180 else hue)
    assert all(abs(s / 2 - round(s / 2)) < 0.05 for s in shifts), shifts
    assert max(abs(s) for s in shifts) > 20 and -36.01 < min(shifts) and max(shifts) < 34.01


@pytest.mark.parametrize("factor", [0.5, 1.3, 3.0])
def test_saturation_scales_hsv_saturation_keeping_hue_and_value(factor):
    """PhotoMetricDistortion's saturation step multiplies HSV's S (capped at 1); torchvision's adjust_saturation blends
    with grey instead, which changes the value too. Reference: the standard library's colorsys."""
    pixels = torch.tensor([[200.0, 100, 50], [10, 250, 120], [90, 90, 90], [30, 0, 255]])
    out = scaled_saturation(pixels.T.reshape(3, 4, 1), factor).reshape(3, 4).T
    for before, after in zip(pixels.tolist(), out.tolist()):
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in before))
        h2, s2, v2 = colorsys.rgb_to_hsv(*(c / 255 for c in after))
        assert (round(v2, 6), round(s2, 6)) == (round(v, 6), round(min(1.0, s * factor), 6)), (before, after)
        assert s == 0 or abs(h2 - h) < 1e-6, (before, after)


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    split = open_split(root, "training", num_classes=2)
    assert split.layout == "ade20k" and split.reduce_zero_label and len(split) == 6
    assert open_split(root, "val", num_classes=2).split == "val"  # train/val name the ADE20K folders
    raw = np.array(Image.open(split.masks[0]))
    reduced = read_mask(split.masks[0], reduce_zero_label=True)
    assert np.array_equal(reduced[raw == 0], np.full((raw == 0).sum(), IGNORE_INDEX, np.uint8))
    assert np.array_equal(reduced[raw > 0], raw[raw > 0] - 1)
    _, mask = SegmentationDataset(split)[0]
    assert set(mask.unique().tolist()) <= {0, 1, IGNORE_INDEX}


def test_ade20k_has_its_150_scene_parsing_names():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert all(n == n.strip() and n and "," not in n and ";" not in n for n in ADE20K_CLASSES)
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[44], ADE20K_CLASSES[149]) == \
        ("wall", "person", "chest of drawers", "flag")


def test_ade20k_class_names_default_file_and_custom(tmp_path):
    """150 classes (the layout's default): the folder's objectInfo150.txt names them (first synonym), else the
    embedded names; another number of classes keeps class_<i>."""
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    assert open_split(root, "training").class_names == list(ADE20K_CLASSES)
    assert open_split(root, "training", num_classes=2).class_names == ["class_0", "class_1"]
    names = ["partition wall", *ADE20K_CLASSES[1:]]
    object_info(root, [f"{n};{n}s;other" for n in names])  # `floor;flooring` lists
    assert open_split(root, "training").class_names == names
    object_info(root, [f"{n}, {n}s" for n in names], separator="    ")  # space-separated copies, ', ' lists
    assert open_split(root, "training").class_names == names
    assert open_split(root, "training", class_names=["a"] * 150).class_names == ["a"] * 150  # given names win


def test_ade20k_names_from_an_object_info_shaped_as_the_challenge_devkits(tmp_path):
    """CSAILVision/sceneparsing's objectInfo150.txt: tabs, ', ' between synonyms, and a few stray spaces (Idx '22 ',
    names 'bed ' and 'windowpane, window ')."""
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    for i, name in enumerate(ADE20K_CLASSES, start=1):
        idx = f"{i} " if 22 <= i <= 27 else str(i)
        listed = {8: "bed ", 9: "windowpane, window ", 45: "chest of drawers, chest, bureau, dresser"}.get(
            i, f"{name}, {name}s")
        lines.append(f"{idx}\t0.0100\t100\t10\t{listed}")
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert open_split(root, "training").class_names == list(ADE20K_CLASSES)


@pytest.mark.parametrize("break_it,line,message", [
    (lambda lines: lines.__setitem__(3, "3\t0.08\t8265\tsky"), 4, "4 columns, expected 5"),
    (lambda lines: lines.__setitem__(5, lines[5].replace("5", "6", 1)), 6, "Idx '6', expected 5"),
    (lambda lines: lines.__setitem__(2, "2\t0.1\t1\t1\t;building"), 3, "no class name"),
    (lambda lines: lines.__setitem__(9, "9\t0.1\t1\t1\tsky;heavens"), 10, "class name 'sky' is also class 3's"),
    (lambda lines: lines.pop(), 150, "the file ends after 149 classes, 150 expected"),
    (lambda lines: lines.append("151\t0.1\t1\t1\textra"), 152, "a class beyond the 150"),
])
def test_a_malformed_object_info_is_one_line_naming_file_and_line(tmp_path, break_it, line, message):
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    path = object_info(root, list(ADE20K_CLASSES))
    lines = path.read_text().splitlines()
    break_it(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SequencerError) as caught:
        open_split(root, "training")
    assert str(caught.value).startswith(f"{path} line {line}: {message}")
    assert "\n" not in str(caught.value)


def test_reduce_zero_label_keeps_255_ignored(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1, 255, 150]], np.uint8)).save(path)
    assert read_mask(path, True).tolist() == [[255, 0, 255, 149]]
    assert read_mask(path, False).tolist() == [[0, 1, 255, 150]]


def test_ade20k_label_above_the_classes_is_refused(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    with pytest.raises(SequencerError, match=r"mask .*ADE_training_00000000.png holds value 2, neither a class "
                                             r"\(0..1 \(0 = ignored"):
        open_split(root, "training", num_classes=1)


# ------------------------------------------------------------------------------------------------ bad input
def _bad(voc, break_it):
    """open_split after ``break_it(voc)``; returns the one-line message."""
    break_it(voc)
    with pytest.raises(SequencerError) as caught:
        open_split(voc, "train", num_classes=3)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_mask_of_another_size(voc):
    def shrink(root):
        palette_png(np.zeros((20, 20), np.uint8)).save(root / "SegmentationClass" / "train_002.png")
    message = _bad(voc, shrink)
    assert "SegmentationClass/train_002.png is 20x20 but its image train_002.png is 48x48" in message


def test_mask_value_neither_class_nor_ignore(voc):
    def add_value(root):
        mask = np.array(Image.open(root / "SegmentationClass" / "train_001.png"))
        mask[0, 0] = 7
        palette_png(mask).save(root / "SegmentationClass" / "train_001.png")
    message = _bad(voc, add_value)
    assert "train_001.png holds value 7, neither a class (0..2) nor 255" in message


def test_missing_mask(voc):
    message = _bad(voc, lambda root: (root / "SegmentationClass" / "train_003.png").unlink())
    assert "mask" in message and "SegmentationClass/train_003.png does not exist" in message


def test_rgb_mask(voc):
    def colour(root):
        path = root / "SegmentationClass" / "train_000.png"
        Image.open(path).convert("RGB").save(path)
    message = _bad(voc, colour)
    assert "SegmentationClass/train_000.png is RGB, not a palette or grayscale PNG" in message


def test_id_list_naming_a_missing_image(voc):
    def add_id(root):
        with open(root / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
            f.write("ghost\n")
    message = _bad(voc, add_id)
    assert "ImageSets/Segmentation/train.txt' names image 'ghost'" in message and "JPEGImages/ghost" in message


def test_grayscale_masks_are_accepted(voc):
    for path in (voc / "SegmentationClass").iterdir():
        Image.fromarray(np.array(Image.open(path))).save(path)  # P -> L, same indices
    assert len(open_split(voc, "train", num_classes=3)) == 4


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(SequencerError, match="neither a Pascal VOC folder"):
        open_split(tmp_path, "train")


@pytest.mark.parametrize("layout", ["", "voc", "ade20k"])  # a checkpoint gives its layout
def test_a_missing_dataset_folder_is_named_as_such(tmp_path, layout):
    with pytest.raises(SequencerError, match=r"^dataset folder '.*/nowhere' does not exist$"):
        open_split(tmp_path / "nowhere", "val", layout=layout)



# ------------------------------------------------------------------------------------- EXIF-oriented images
def _tag_orientation(path, orientation: int) -> None:
    """Re-save an image file with an EXIF orientation tag; its stored pixels stay as they were."""
    image = Image.open(path)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


@pytest.mark.parametrize("orientation,turn", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                              (2, lambda a: a[:, ::-1]), (3, lambda a: a[::-1, ::-1])])
def test_a_mask_labelling_the_stored_pixels_turns_with_its_exif_oriented_image(tmp_path, orientation, turn):
    """The image is read upright (as a phone shows it); its mask, drawn on the stored pixels, must turn with it, or
    every pixel is scored against another pixel's label (mIoU 49.7 -> 27.0 on a probe)."""
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1, sizes=((40, 56),))
    image_file = voc / "JPEGImages" / "train_000.png"
    stored_image = np.array(Image.open(image_file))
    stored_mask = np.array(Image.open(voc / "SegmentationClass" / "train_000.png"))
    _tag_orientation(image_file, orientation)
    image, mask = SegmentationDataset(open_split(voc, "train", num_classes=3))[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), turn(stored_image))
    np.testing.assert_array_equal(mask.numpy(), turn(stored_mask))


def test_a_mask_drawn_on_the_upright_picture_is_kept(tmp_path):
    """A labelling tool that shows the photo upright saves the mask at the upright size: it already fits."""
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1, sizes=((40, 56),))
    image_file = voc / "JPEGImages" / "train_000.png"
    upright_image = np.array(Image.open(image_file))
    upright_mask = np.array(Image.open(voc / "SegmentationClass" / "train_000.png"))
    Image.fromarray(np.ascontiguousarray(np.rot90(upright_image, 1))).save(image_file)  # stored turned left,
    _tag_orientation(image_file, 6)  # tagged "turn right to view"
    image, mask = SegmentationDataset(open_split(voc, "train", num_classes=3))[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), upright_image)
    np.testing.assert_array_equal(mask.numpy(), upright_mask)


def test_a_mask_fitting_neither_size_of_an_oriented_image_names_both(voc):
    def turn_and_shrink(root):
        _tag_orientation(root / "JPEGImages" / "train_002.png", 6)
        palette_png(np.zeros((20, 20), np.uint8)).save(root / "SegmentationClass" / "train_002.png")
    voc = make_voc(voc.parent / "oblong", n_train=4, n_val=1, sizes=((40, 56),))
    message = _bad(voc, turn_and_shrink)
    assert "train_002.png is 20x20 but its image train_002.png is 56x40 (40x56 upright, by its EXIF" in message
