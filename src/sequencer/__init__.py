"""Sequencer: deep-LSTM vision backbones (Tatsunami & Taki, NeurIPS 2022).

The library under the ``sequencer`` command: :func:`create_model` builds a model, :func:`train` trains one (a
registry name or your own ``nn.Module``, on a folder or your own Datasets) as ``sequencer train`` does and
:func:`validate` evaluates one (a checkpoint or a module in memory) as ``sequencer validate`` does; :func:`create_backbone`
builds a stride 4-32 feature pyramid for torchvision's detectors. Semantic segmentation is the same pair:
:func:`create_segmenter` builds a segmenter, :func:`train_segmenter` trains one as ``sequencer segment train`` does and
:func:`validate_segmenter` evaluates one (mIoU, pixel accuracy, per-class IoU). Train and validate are guests
in your process: they log through the ``"sequencer"`` logger, raise instead of exiting, leave your process group,
random state and your module's modes as they found them (validation gives back a module it moved to its device),
and Ctrl-C raises ``KeyboardInterrupt`` (:class:`TrainingInterrupted`).
"""
from .errors import SequencerError
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "create_backbone", "list_models", "train", "validate", "TrainResult", "TrainConfig", "TrainingInterrupted",
           "ValidationResult", "optimize_for_inference", "SequencerError", "__version__",
           "create_segmenter", "train_segmenter", "validate_segmenter", "SegmentConfig", "SegmentResult",
           "SegmentValidationResult"]

# imported on first use: they pull in the training, evaluation and inference tooling
_LAZY = {
    "train": ("sequencer.engine.train", "train"),
    "TrainResult": ("sequencer.engine.train", "TrainResult"),
    "TrainConfig": ("sequencer.engine.config", "TrainConfig"),
    "TrainingInterrupted": ("sequencer.engine.train", "TrainingInterrupted"),
    "validate": ("sequencer.engine.validation", "validate"),
    "ValidationResult": ("sequencer.engine.validation", "ValidationResult"),
    "optimize_for_inference": ("sequencer.tools.optimize", "optimize_for_inference"),
    "create_backbone": ("sequencer.models.backbone", "create_backbone"),
    "create_segmenter": ("sequencer.models.segmentation", "create_segmenter"),
    "train_segmenter": ("sequencer.engine.segmentation", "train_segmenter"),
    "SegmentConfig": ("sequencer.engine.segmentation_config", "SegmentConfig"),
    "SegmentResult": ("sequencer.engine.segmentation_config", "SegmentResult"),
    "validate_segmenter": ("sequencer.engine.segmentation_eval", "validate_segmenter"),
    "SegmentValidationResult": ("sequencer.engine.segmentation_eval", "SegmentValidationResult"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(name)
