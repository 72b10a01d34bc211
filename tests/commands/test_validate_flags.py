"""`sequencer validate`'s preprocessing flags reach the loader it evaluates with, in the order flag > what the
checkpoint records > the model's own default; --split picks the images evaluated."""
from __future__ import annotations

import pytest

from commands.test_validate import MEAN, STD, _write_checkpoint, _write_folder
from sequencer.cli import main
from sequencer.data import resolve_data_config
from sequencer.models import create_model


@pytest.fixture
def loader_calls(monkeypatch):
    """The keywords (and input size) of every loader validate builds."""
    import sequencer.engine.validation as validation
    calls = []

    def spy(dataset, input_size, batch_size, **kw):
        calls.append(dict(kw, input_size=tuple(input_size), images=len(dataset)))
        return real(dataset, input_size, batch_size, **kw)

    real = validation.create_loader
    monkeypatch.setattr(validation, "create_loader", spy)
    return calls


@pytest.fixture
def data(tmp_path):
    _write_folder(tmp_path / "data" / "val", per_class=2)
    _write_folder(tmp_path / "data" / "train", per_class=1)
    return tmp_path / "data"


def _validate(*args) -> None:
    assert main(["validate", *map(str, args), "-j", "0", "-b", "4", "--device", "cpu"]) == 0


def _preprocessing(call) -> dict:
    return {k: call[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}


def test_flags_beat_the_checkpoints_record(data, tmp_path, loader_calls):
    _write_checkpoint(tmp_path / "c.pth.tar", ["a", "b", "c"])  # records MEAN, STD, crop 1.0, bilinear, 8 px
    _validate(data, "--checkpoint", tmp_path / "c.pth.tar")
    _validate(data, "--checkpoint", tmp_path / "c.pth.tar", "--mean", "0.1", "0.2", "0.3", "--std", "0.7",
              "--crop-pct", "0.5", "--interpolation", "nearest", "--img-size", "16")
    recorded, flagged = map(_preprocessing, loader_calls)
    assert recorded == dict(input_size=(3, 8, 8), mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear")
    assert flagged == dict(input_size=(3, 16, 16), mean=(0.1, 0.2, 0.3), std=(0.7,) * 3, crop_pct=0.5,
                           interpolation="nearest")


def test_without_a_record_the_models_defaults_apply(data, tmp_path, loader_calls):
    """A model name alone (random weights: sequencer2d_nano has no released ones) uses its pretrained_cfg."""
    _validate(data, "--model", "sequencer2d_nano", "--num-classes", "3", "--img-size", "16", "--split", "val")
    own = resolve_data_config(dict(img_size=16), create_model("sequencer2d_nano", num_classes=3, img_size=16))
    assert _preprocessing(loader_calls[0]) == own


def test_split_picks_the_images_evaluated(data, tmp_path, loader_calls):
    _write_checkpoint(tmp_path / "c.pth.tar", ["a", "b", "c"])
    _validate(data, "--checkpoint", tmp_path / "c.pth.tar", "--split", "train")
    _validate(data, "--checkpoint", tmp_path / "c.pth.tar", "--split", "val")
    assert [call["images"] for call in loader_calls] == [3, 6]


def test_class_map_picks_the_classes_evaluated(data, tmp_path, loader_calls):
    """A map naming two of the three folders evaluates their images only, labelled by the checkpoint's names."""
    _write_checkpoint(tmp_path / "c.pth.tar", ["a", "b", "c"])
    (tmp_path / "map.txt").write_text("b\na\n")
    _validate(data, "--checkpoint", tmp_path / "c.pth.tar", "--class-map", tmp_path / "map.txt")
    assert loader_calls[0]["images"] == 4
