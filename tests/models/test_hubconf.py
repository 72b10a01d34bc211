"""hubconf.py: torch.hub.load(<repo dir>, name, source="local") builds every registered model."""
import importlib.util
from pathlib import Path

import torch

import sequencer

REPO = Path(__file__).resolve().parents[2]


def test_hub_load_local(hub_dir):
    model = torch.hub.load(str(REPO), "sequencer2d_nano", source="local", num_classes=3, trust_repo=True)
    assert model.model_name == "sequencer2d_nano"
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_an_entrypoint_for_every_registered_model():
    spec = importlib.util.spec_from_file_location("sequencer_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entrypoints = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entrypoints == sequencer.list_models()
    assert "torch" in hubconf.dependencies
    model = hubconf.sequencer2d_s(num_classes=0, layers=(1, 1, 1, 1))
    assert model.model_name == "sequencer2d_s" and model(torch.randn(1, 3, 28, 28)).shape == (1, 384)
