"""Shared fixtures for the tool tests: a tiny image-folder dataset of real PNGs and tiny checkpoints in the
training-checkpoint format (written directly with torch.save, as `sequencer train` would)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.data import create_transform, load_image
from sequencer.models import create_model

CLASS_NAMES = ["cat", "dog"]
# sequencer2d_nano with fewer/narrower layers: ~10k parameters, patch 2, any even input size.
TINY_ARCH = "sequencer2d_nano"
TINY_KWARGS = dict(layers=(1, 1, 1), patch_sizes=(2, 1, 1), embed_dims=(16, 24, 24), hidden_sizes=(4, 6, 6),
                   num_classes=2)
TINY_DATA_CONFIG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bicubic",
                        img_size=32)


def make_image(rng: np.random.Generator, label: int, size: int = 40) -> Image.Image:
    """A textured RGB image whose dominant colour depends on the label."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, 1 - xx], -1) * 120
    base[..., 0 if label == 0 else 2] += 100
    noise = rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_class_folders(root: Path, per_class: int, seed: int = 0, size: int = 40,
                        class_names=CLASS_NAMES) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, label, size).save(root / name / f"{name}_{i}.png")
    return root


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The tiny test model with a random (not zero) head and final norm, so its outputs differ between images."""
    torch.manual_seed(seed)
    model = create_model(TINY_ARCH, **TINY_KWARGS)
    torch.nn.init.normal_(model.head.fc.weight, std=1.0)
    torch.nn.init.normal_(model.head.fc.bias, std=0.1)
    # a trained final LayerNorm has uneven channel weights; with all-ones weights the channel sum of the final
    # features is identically zero and their ERF would be float noise
    torch.nn.init.normal_(model.norm.weight, mean=1.0, std=0.5)
    return model.eval()


def save_training_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None = None,
                             epoch: int = 3, class_names=CLASS_NAMES) -> Path:
    """A checkpoint dict in the training contract's format (every value weights_only-safe)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # lr 0: gives the optimizer a momentum buffer, as a real checkpoint has, weights unchanged
    model.zero_grad(set_to_none=True)
    checkpoint = {
        "version": 1, "arch": model.model_name, "model_kwargs": dict(model.model_kwargs),
        "class_names": list(class_names), "data_config": dict(TINY_DATA_CONFIG),
        "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": epoch},
        "scaler": None, "epoch": epoch, "metric": 50.0,
        "args": {"lr": 0.1, "model": model.model_name, "bce_loss": False},
        "rng_state": {"torch": torch.get_rng_state()},
    }
    if ema is not None:
        checkpoint["state_dict_ema"] = ema.state_dict()
    torch.save(checkpoint, path)
    return path


def reference_model(checkpoint):
    """Independent reference: the model rebuilt from the checkpoint dict by hand (EMA weights if any)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = create_model(ckpt["arch"], **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt.get("state_dict_ema") or ckpt["state_dict"])
    return model


def reference_inputs(paths, size=32):
    """(N, 3, size, size): the eval transform of the tiny data config applied by hand."""
    cfg = TINY_DATA_CONFIG
    transform = create_transform((3, size, size), False, mean=cfg["mean"], std=cfg["std"],
                                 crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])
    return torch.stack([transform(load_image(p)) for p in paths])


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """ImageNet layout: root/{train,val}/{cat,dog}/*.png (real 40x40 PNGs)."""
    root = tmp_path_factory.mktemp("images")
    write_class_folders(root / "train", per_class=4, seed=0)
    write_class_folders(root / "val", per_class=3, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny 2-class checkpoint (model weights + different EMA weights) as `sequencer train` writes it."""
    path = tmp_path_factory.mktemp("ckpt") / "last.pth.tar"
    return save_training_checkpoint(path, tiny_model(seed=0), ema=tiny_model(seed=1))
