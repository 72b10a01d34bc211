"""Data: datasets (image folders, timm tar, torchvision, embedded digits), timm transforms and device loaders."""
from .class_map import load_class_map
from .datasets import ClassificationDataset, DigitsDataset, ImageFileDataset, create_dataset
from .images import UnreadableImageError, load_image, to_rgb
from .loader import ImageLoader, create_loader, create_transform, resolve_data_config

__all__ = [
    "ClassificationDataset", "DigitsDataset", "ImageFileDataset", "ImageLoader", "UnreadableImageError",
    "create_dataset", "create_loader", "create_transform", "load_class_map", "load_image", "resolve_data_config",
    "to_rgb",
]
