"""torch.hub entry points: one per registered model.

    model = torch.hub.load("<owner>/sequencer", "sequencer2d_s", pretrained=True)     # from GitHub
    model = torch.hub.load("/path/to/sequencer", "sequencer2d_s", source="local")    # from a clone

Each entry point takes ``create_model``'s keyword arguments (``pretrained``, ``num_classes``, ``checkpoint_path``,
``img_size``, ``drop_path_rate``, ``features_only``, ...). The package is imported from this repository's ``src``
folder, so a plain clone works without installing it.
"""
import os as _os
import sys as _sys

dependencies = ["torch", "timm", "tqdm"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

from sequencer.models import create_model as _create_model  # noqa: E402
from sequencer.models import list_models as _list_models  # noqa: E402


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (f"{name}: ``sequencer.create_model({name!r}, pretrained=pretrained, **kwargs)``; "
                          f"``pretrained=True`` downloads the authors' released weights where they exist.")
    return entrypoint


globals().update({_name: _entrypoint(_name) for _name in _list_models()})
