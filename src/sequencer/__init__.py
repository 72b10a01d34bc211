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
from typing import TYPE_CHECKING

from .errors import SequencerError

__version__ = "0.1.0"
__all__ = ["create_model", "create_backbone", "list_models", "train", "validate", "TrainResult", "TrainConfig", "TrainingInterrupted",
           "ValidationResult", "optimize_for_inference", "SequencerError", "__version__",
           "create_segmenter", "train_segmenter", "validate_segmenter", "SegmentConfig", "SegmentResult",
           "SegmentValidationResult"]

# imported on first use, so that `import sequencer` (and the command line's `--help` and argument errors) costs no
# import of torch, timm or the training, evaluation and inference tooling
_LAZY = {
    "create_model": ("sequencer.models", "create_model"),
    "list_models": ("sequencer.models", "list_models"),
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

if TYPE_CHECKING:  # what type checkers and IDEs see: the names _LAZY imports on first use
    from .engine.config import TrainConfig
    from .engine.segmentation import train_segmenter
    from .engine.segmentation_config import SegmentConfig, SegmentResult
    from .engine.segmentation_eval import SegmentValidationResult, validate_segmenter
    from .engine.train import TrainingInterrupted, TrainResult, train
    from .engine.validation import ValidationResult, validate
    from .models import create_model, list_models
    from .models.backbone import create_backbone
    from .models.segmentation import create_segmenter
    from .tools.optimize import optimize_for_inference


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups find it without coming here
        return value
    raise AttributeError(f"module 'sequencer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
