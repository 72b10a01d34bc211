"""timm's auto-augment policies on Pillow 13 draw as on the Pillow of the paper's time (0-bit posterize: black)."""
import pickle
import random

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data import create_transform as timm_create_transform

from sequencer.data import create_transform
from sequencer.data.augment import keep_zero_bit_posterize, posterize

# the paper's policy and the other RandAugment / AugMix / AutoAugment policies timm offers
POLICIES = ["rand-m9-mstd0.5", "rand-m0-mstd0.5", "rand-m10-n3-inc1", "augmix-m10-w3-d2", "augmix-m5-w2",
            "original", "v0", "originalr", "v0r", "3a"]


def old_pillow_posterize(img, bits):
    """Pillow's posterize before it refused 0 bits: keep the ``bits`` high bits of every channel."""
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _policy_only(policy: str):
    """The auto-augment step of timm's training transform for ``policy`` (8 px images)."""
    full = timm_create_transform((3, 8, 8), is_training=True, auto_augment=policy)
    return next(t for t in full.transforms if type(t).__name__ in ("RandAugment", "AutoAugment", "AugMixAugment"))


def _draw(transform, img, seed: int) -> np.ndarray:
    random.seed(seed)
    np.random.seed(seed)
    return np.asarray(transform(img))


def _compare_to_old_pillow(policy: str, draws: int, monkeypatch) -> int:
    """Draw ``policy`` ``draws`` times with our fix and with plain timm on the old Pillow posterize; assert equal
    images; return how many 0-bit posterizes happened."""
    ours = keep_zero_bit_posterize(_policy_only(policy))
    plain = _policy_only(policy)
    images = [_image(i) for i in range(16)]
    got = [_draw(ours, images[i % 16], i) for i in range(draws)]
    zero_bits = []

    def counting_old_posterize(img, bits):
        zero_bits.append(bits == 0)
        return old_pillow_posterize(img, bits)

    with monkeypatch.context() as m:
        m.setattr(ImageOps, "posterize", counting_old_posterize)
        for i in range(draws):
            assert np.array_equal(got[i], _draw(plain, images[i % 16], i)), f"{policy} draw {i}"
    return sum(zero_bits)


def test_papers_policy_draws_thousands_of_times_like_the_old_pillow(monkeypatch):
    draws = 10000
    zero_bit = _compare_to_old_pillow("rand-m9-mstd0.5-inc1", draws, monkeypatch)
    assert zero_bit > 0  # the 0-bit case really happened (about 0.2% of images) and came out black
    plain = _policy_only("rand-m9-mstd0.5-inc1")
    try:
        ImageOps.posterize(_image(0), 0)
    except ValueError:  # Pillow 13 refuses 0 bits: what the fix is for, plain timm's policy fails there
        with pytest.raises(ValueError, match="bits"):
            for i in range(draws):
                _draw(plain, _image(0), i)
    # (the declared floor, Pillow 10, still takes 0 bits: plain timm draws as ours, compared above)


@pytest.mark.parametrize("policy", POLICIES)
def test_other_policies_match_the_old_pillow(policy, monkeypatch):
    _compare_to_old_pillow(policy, 400 if policy.startswith("augmix") else 1500, monkeypatch)


def test_zero_bit_posterize_is_black_and_other_bits_are_pillows():
    img = _image(3)
    for mode in ("RGB", "L"):
        im = img.convert(mode)
        assert np.array_equal(np.asarray(posterize(im, 0)), np.zeros_like(np.asarray(im)))
        assert posterize(im, 0).mode == mode
        for bits in range(1, 8):
            assert np.array_equal(np.asarray(posterize(im, bits)), np.asarray(old_pillow_posterize(im, bits)))
        assert posterize(im, 8) is im


def test_the_fix_travels_with_the_transform_to_spawned_workers():
    ours = create_transform((3, 8, 8), True, auto_augment="rand-m10-n3-inc1")
    copy = pickle.loads(pickle.dumps(ours))  # what a spawn-started data worker receives
    funcs = {op.aug_fn for t in copy.transforms for op in getattr(t, "ops", [])}
    assert posterize in funcs
