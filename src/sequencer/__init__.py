"""Sequencer: deep-LSTM vision backbones (Tatsunami & Taki, NeurIPS 2022)."""
from .errors import SequencerError
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "optimize_for_inference", "SequencerError", "__version__"]


def __getattr__(name):
    if name == "optimize_for_inference":  # imported lazily: it pulls in the inference tooling
        from .tools.optimize import optimize_for_inference
        return optimize_for_inference
    raise AttributeError(name)
