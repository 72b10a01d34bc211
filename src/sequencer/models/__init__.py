from . import sequencer2d, vanilla_sequencer  # noqa: F401  (registers the models)
from .loading import checkpoint_filter_fn, load_checkpoint, read_checkpoint
from .registry import create_model, get_model_entry, has_pretrained_weights, list_models
from .features import FeatureExtractor
from .sequencer2d import Sequencer2d
from .vanilla_sequencer import VanillaSequencer

__all__ = ["create_model", "list_models", "get_model_entry", "has_pretrained_weights", "load_checkpoint", "read_checkpoint",
           "checkpoint_filter_fn", "Sequencer2d", "VanillaSequencer", "FeatureExtractor"]
