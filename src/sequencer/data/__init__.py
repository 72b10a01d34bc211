"""Data: datasets (image folders, timm tar, torchvision, embedded digits), timm transforms and device loaders.

The names below are imported on first use: a light module of this package (``class_folders``: which files are
images, found before anything loads) costs no import of torch, timm or PIL."""
import importlib
from typing import TYPE_CHECKING

# name -> the module of this package that defines it
_EXPORTS = {
    "load_class_map": "class_map", "ClassificationDataset": "datasets", "DigitsDataset": "datasets",
    "ImageFileDataset": "datasets", "create_dataset": "datasets", "UnreadableImageError": "images",
    "load_image": "images", "to_rgb": "images", "ImageLoader": "loader", "create_loader": "loader",
    "create_transform": "loader", "resolve_data_config": "loader",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .class_map import load_class_map
    from .datasets import ClassificationDataset, DigitsDataset, ImageFileDataset, create_dataset
    from .images import UnreadableImageError, load_image, to_rgb
    from .loader import ImageLoader, create_loader, create_transform, resolve_data_config


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
