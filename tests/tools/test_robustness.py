import json

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.cli import main
from sequencer.tools.robustness import ALEXNET_ERRORS, summarize

from .conftest import CLASS_NAMES, make_image, reference_inputs, reference_model, save_training_checkpoint, \
    tiny_model

# AlexNet's mean errors, written out here from Hendrycks & Dietterich's table, independently of the module
ALEXNET_GAUSSIAN_NOISE, ALEXNET_FOG, ALEXNET_CLEAN = 0.886428, 0.819324, 0.43478


@pytest.fixture(scope="module")
def imagenet_c(tmp_path_factory):
    """2 corruptions x 5 severities x 2 classes x 2 images, harder with severity; gaussian_noise sits under a
    grouping folder."""
    root = tmp_path_factory.mktemp("imagenet_c")
    rng = np.random.default_rng(0)
    for corruption in ("noise/gaussian_noise", "fog"):
        for severity in range(1, 6):
            for label, name in enumerate(CLASS_NAMES):
                folder = root / corruption / str(severity) / name
                folder.mkdir(parents=True)
                for i in range(2):
                    # the corruption blends in the other class's colours, more with each severity
                    own = np.asarray(make_image(rng, label), dtype=np.float64)
                    other = np.asarray(make_image(rng, 1 - label), dtype=np.float64)
                    a = np.clip(0.2 * severity + rng.uniform(-0.2, 0.2), 0, 1)
                    pixels = (1 - a) * own + a * other
                    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colour_checkpoint(tmp_path_factory):
    """A tiny model (random weights, seed 0) that happens to tell the red cats from the blue dogs on clean images,
    so its error grows with the noise of the severities instead of being constant."""
    return save_training_checkpoint(tmp_path_factory.mktemp("colour") / "colour.pth", tiny_model(seed=0))


def _hand_error(model, folder):
    files = sorted(folder.rglob("*.png"))
    labels = torch.tensor([CLASS_NAMES.index(f.parent.name) for f in files])
    with torch.no_grad():
        predictions = model(reference_inputs(files)).argmax(-1)
    return (predictions != labels).float().mean().item()


def test_mce_equals_hand_computation(imagenet_c, image_folder, colour_checkpoint, tmp_path, capsys):
    results_file = tmp_path / "r.json"
    assert main(["robustness", str(imagenet_c), "--results-file", str(results_file), "--clean", str(image_folder),
                 "--checkpoint", str(colour_checkpoint), "-j", "0", "-b", "4"]) == 0
    results = json.loads(results_file.read_text())
    assert set(results["corruptions"]) == {"gaussian_noise", "fog"}

    model = reference_model(colour_checkpoint)
    clean = _hand_error(model, image_folder / "val")
    all_errors = [clean]
    ces, rel = [], []
    for name, alexnet, folder in (("gaussian_noise", ALEXNET_GAUSSIAN_NOISE, imagenet_c / "noise" / "gaussian_noise"),
                                  ("fog", ALEXNET_FOG, imagenet_c / "fog")):
        errors = [_hand_error(model, folder / str(s)) for s in range(1, 6)]
        all_errors += errors
        got = results["corruptions"][name]
        assert [got["errors"][str(s)] for s in range(1, 6)] == pytest.approx(errors, abs=1e-9)
        mean = sum(errors) / 5
        assert got["error"] == pytest.approx(mean, abs=1e-9)
        assert got["ce"] == pytest.approx(mean / alexnet, abs=1e-9)
        ces.append(mean / alexnet)
        rel.append((mean - clean) / (alexnet - ALEXNET_CLEAN))
    assert results["mCE"] == pytest.approx(sum(ces) / 2, abs=1e-9)
    assert results["clean_error"] == pytest.approx(clean, abs=1e-9)
    assert results["relative_mCE"] == pytest.approx(sum(rel) / 2, abs=1e-9)
    assert len(set(all_errors)) > 2, all_errors  # the model's errors really vary: a meaningful check
    assert results["mCE_standard15"] is None  # only 2 of the 15 standard corruptions were run
    assert "mCE" in capsys.readouterr().out


def test_alexnet_table_and_corruptions_without_reference():
    assert len(ALEXNET_ERRORS) == 19
    assert ALEXNET_ERRORS["gaussian_noise"] == ALEXNET_GAUSSIAN_NOISE and ALEXNET_ERRORS["saturate"] == 0.658248
    per = {"gaussian_noise": {"errors": {"1": 0.5}, "error": 0.5, "ce": 0.5 / ALEXNET_GAUSSIAN_NOISE},
           "my_warp": {"errors": {"1": 0.25}, "error": 0.25}}
    results = summarize(per)
    assert results["mCE"] == pytest.approx(0.5 / ALEXNET_GAUSSIAN_NOISE)
    assert results["without_ce"] == ["my_warp"]
    assert results["mean_error"] == pytest.approx(0.375)


def test_robustness_errors(tmp_path, tiny_checkpoint, imagenet_c, capsys):
    ck = ["--checkpoint", str(tiny_checkpoint), "--results-file", str(tmp_path / "r.json")]
    assert main(["robustness", str(tmp_path / "missing"), *ck]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["robustness", str(tmp_path / "empty"), *ck]) == 2
    assert "no corruption folders" in capsys.readouterr().err
    assert main(["robustness", str(imagenet_c), "--corruptions", "snow", *ck]) == 2
    assert "snow" in capsys.readouterr().err
    assert main(["robustness", str(imagenet_c), "--clean", str(tmp_path / "nope"), *ck]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["robustness", str(imagenet_c), "--results-file", str(tmp_path / "r.json")]) == 2
    assert "no model given" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
