"""Data: datasets (image folders, timm tar, torchvision, embedded digits), timm transforms and device loaders."""
from .datasets import (
    ClassificationDataset,
    DigitsDataset,
    ImageFileDataset,
    UnreadableImageError,
    create_dataset,
    load_class_map,
    load_image,
    to_rgb,
)
from .loader import ImageLoader, create_loader, create_transform, resolve_data_config

__all__ = [
    "ClassificationDataset", "DigitsDataset", "ImageFileDataset", "ImageLoader", "UnreadableImageError",
    "create_dataset", "create_loader", "create_transform", "load_class_map", "load_image", "resolve_data_config",
    "to_rgb",
]
