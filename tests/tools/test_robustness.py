import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sequencer.tools.robustness as robustness
from sequencer.cli import main
from sequencer.data import create_transform, load_image
from sequencer.tools.robustness import ALEXNET_ERRORS, summarize

from .conftest import CLASS_NAMES, TINY_DATA_CONFIG, make_image, reference_model, save_training_checkpoint, \
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
    """A tiny model (random weights, seed 0) whose head bias is shifted to put the decision boundary halfway between
    the red cats and the blue dogs, so its error grows with the blending of the severities instead of being
    constant. Its own eval preprocessing crops (crop_pct 0.875), which the ImageNet-C protocol must not use."""
    model = tiny_model(seed=0)
    rng = np.random.default_rng(123)
    probes = [[make_image(rng, label) for _ in range(4)] for label in (0, 1)]
    with torch.no_grad():
        margins = [(lambda z: (z[:, 1] - z[:, 0]).mean())(model(_inputs_of_images(images, 1.0))) for images in probes]
        model.head.fc.bias[1] -= (margins[0] + margins[1]) / 2
    path = save_training_checkpoint(tmp_path_factory.mktemp("colour") / "colour.pth", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["data_config"]["crop_pct"] = 0.875
    torch.save(checkpoint, path)
    return path


def _inputs_of_images(images, crop_pct):
    cfg = TINY_DATA_CONFIG
    transform = create_transform((3, 32, 32), False, mean=cfg["mean"], std=cfg["std"], crop_pct=crop_pct,
                                 interpolation=cfg["interpolation"])
    return torch.stack([transform(image) for image in images])


def _inputs(files, crop_pct):
    return _inputs_of_images([load_image(p) for p in files], crop_pct)


def _hand_error(model, folder, crop_pct=1.0):
    files = sorted(folder.rglob("*.png"))
    labels = torch.tensor([CLASS_NAMES.index(f.parent.name) for f in files])
    with torch.no_grad():
        predictions = model(_inputs(files, crop_pct)).argmax(-1)
    return (predictions != labels).float().mean().item()


def test_mce_equals_hand_computation(imagenet_c, image_folder, colour_checkpoint, tmp_path, capsys):
    results_file = tmp_path / "r.json"
    assert main(["robustness", str(imagenet_c), "--results-file", str(results_file), "--clean", str(image_folder),
                 "--checkpoint", str(colour_checkpoint), "-j", "0", "-b", "4"]) == 0
    results = json.loads(results_file.read_text())
    assert set(results["corruptions"]) == {"gaussian_noise", "fog"}

    model = reference_model(colour_checkpoint)
    clean = _hand_error(model, image_folder / "val", crop_pct=0.875)  # clean images: the model's own crop
    all_errors = [clean]
    ces, rel, mean_errors = [], [], []
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
        mean_errors.append(mean)
        rel.append((mean - clean) / (alexnet - ALEXNET_CLEAN))
    assert results["mCE"] == pytest.approx(sum(ces) / 2, abs=1e-9)
    assert results["unnormalized_mCE"] == pytest.approx(sum(mean_errors) / 2, abs=1e-9)
    assert results["protocol"] == {"crop_pct": 1.0, "corruptions": ["gaussian_noise", "fog"],
                                   "severities": [1, 2, 3, 4, 5], "missing_severities": {},
                                   "normaliser": "alexnet"}
    assert results["clean_error"] == pytest.approx(clean, abs=1e-9)
    assert results["relative_mCE"] == pytest.approx(sum(rel) / 2, abs=1e-9)
    assert len(set(all_errors)) > 2, all_errors  # the model's errors really vary: a meaningful check
    assert results["mCE_standard15"] is None  # only 2 of the 15 standard corruptions were run
    assert "mCE" in capsys.readouterr().out


def test_a_missing_severity_is_recorded_and_the_printed_errors_are_labelled(imagenet_c, colour_checkpoint,
                                                                            tmp_path, capsys):
    """fog without severity 4 (the default data-loader workers): the JSON says fog used 1, 2, 3, 5 and lacks 4,
    and the printed line labels each error with its severity and names the missing one."""
    data = tmp_path / "c"
    shutil.copytree(imagenet_c, data)
    shutil.rmtree(data / "fog" / "4")
    results_file = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="fog: only severities 1, 2, 3, 5 present"):
        assert main(["robustness", str(data), "--results-file", str(results_file),
                     "--checkpoint", str(colour_checkpoint), "-b", "4"]) == 0
    results = json.loads(results_file.read_text())
    fog = results["corruptions"]["fog"]
    assert fog["severities"] == [1, 2, 3, 5] and sorted(fog["errors"]) == ["1", "2", "3", "5"]
    assert results["corruptions"]["gaussian_noise"]["severities"] == [1, 2, 3, 4, 5]
    assert results["protocol"]["missing_severities"] == {"fog": [4]}
    assert results["protocol"]["severities"] == [1, 2, 3, 4, 5]  # gaussian_noise used all five
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("fog:"))
    expected = " ".join(f"s{s} {fog['errors'][s]:.3f}" for s in ("1", "2", "3", "5"))
    assert line.endswith(f"errors by severity {expected} (no s4)")


def test_alexnet_table_and_corruptions_without_reference():
    assert len(ALEXNET_ERRORS) == 19
    assert ALEXNET_ERRORS["gaussian_noise"] == ALEXNET_GAUSSIAN_NOISE and ALEXNET_ERRORS["saturate"] == 0.658248
    per = {"gaussian_noise": {"errors": {"1": 0.5}, "error": 0.5, "ce": 0.5 / ALEXNET_GAUSSIAN_NOISE},
           "my_warp": {"errors": {"1": 0.25}, "error": 0.25}}
    results = summarize(per)
    assert results["mCE"] == pytest.approx(0.5 / ALEXNET_GAUSSIAN_NOISE)
    assert results["without_ce"] == ["my_warp"]
    assert results["mean_error"] == pytest.approx(0.375)


def test_mce_standard15_needs_every_standard_corruption_at_every_severity():
    """mCE_standard15 is the number papers report: all 15 standard corruptions averaged over severities 1-5 each;
    with a severity missing anywhere it is None (mCE stays the mean over what ran)."""
    standard = list(ALEXNET_ERRORS)[:15]
    full = {n: robustness.corruption_summary({s: 0.5 for s in "12345"}, n) for n in standard}
    expected = sum(0.5 / ALEXNET_ERRORS[n] for n in standard) / 15
    assert summarize(full)["mCE_standard15"] == pytest.approx(expected)
    short = dict(full, fog=robustness.corruption_summary({s: 0.5 for s in "1245"}, "fog"))
    results = summarize(short)
    assert results["mCE_standard15"] is None and results["protocol"]["missing_severities"] == {"fog": [3]}
    assert results["mCE"] == pytest.approx(expected)


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
    assert main(["robustness", str(imagenet_c), "-j", "-1", *ck]) == 2  # was DataLoader's traceback
    err = capsys.readouterr().err
    assert "-j/--workers -1: must not be negative" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_an_empty_severity_folder_is_refused_before_anything_is_evaluated(tmp_path, tiny_checkpoint, imagenet_c,
                                                                          capsys):
    # it was found when fog's turn came, after gaussian_noise had been evaluated (hours, on ImageNet-C)
    data = tmp_path / "imagenet_c"
    shutil.copytree(imagenet_c, data)
    for image in (data / "fog" / "2").rglob("*.png"):
        image.unlink()
    results = tmp_path / "r.json"
    code = main(["robustness", str(data), "--corruptions", "gaussian_noise", "fog", "--checkpoint",
                 str(tiny_checkpoint), "--results-file", str(results)])
    out, err = capsys.readouterr()
    assert code == 2 and f"no images found in {str(data / 'fog' / '2')!r}" in err and "Traceback" not in err
    assert "gaussian_noise: error" not in out + err and not results.exists()


def test_corrupted_images_are_resized_not_cropped(tmp_path, colour_checkpoint, monkeypatch):
    """A probe whose 4 px red border a 0.875 crop would cut reaches the model whole, resized to 32 px."""
    pixels = np.full((40, 40, 3), 128, np.uint8)
    pixels[:4], pixels[-4:], pixels[:, :4], pixels[:, -4:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    for severity in range(1, 6):
        (tmp_path / "c" / "fog" / str(severity) / "cat").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "c" / "fog" / str(severity) / "cat" / "probe.png")
    seen = []

    def record(model, loader, device):
        seen.extend(images for images, _ in loader)
        return {"count": 1, "top1": 0.0, "top5": 0.0, "loss": 0.0}

    monkeypatch.setattr(robustness, "evaluate", record)
    assert main(["robustness", str(tmp_path / "c"), "--results-file", str(tmp_path / "r.json"),
                 "--checkpoint", str(colour_checkpoint), "-j", "0", "--device", "cpu"]) == 0
    assert len(seen) == 5
    # by hand: bicubic resize of the whole 40 px image to 32 px, then (x - 0.5) / 0.5
    resized = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(seen[0][0], expected, atol=0.02, rtol=0)
    assert seen[0][0, 0, 16, 0] > 0.9 and seen[0][0, 1, 16, 0] < -0.9  # the red border is there
    assert json.loads((tmp_path / "r.json").read_text())["protocol"]["crop_pct"] == 1.0


def test_only_the_standard_corruptions_by_default(tmp_path, colour_checkpoint, capsys):
    for name in ("fog", "speckle_noise"):  # speckle_noise is one of ImageNet-C's 4 extra corruptions
        for severity in range(1, 6):
            folder = tmp_path / "c" / name / str(severity) / "cat"
            folder.mkdir(parents=True)
            make_image(np.random.default_rng(severity), 0).save(folder / "0.png")
    args = ["robustness", str(tmp_path / "c"), "--checkpoint", str(colour_checkpoint), "-j", "0", "--device", "cpu"]
    assert main([*args, "--results-file", str(tmp_path / "a.json")]) == 0
    out, err = capsys.readouterr()
    assert "skipping speckle_noise" in out
    # the standard corruptions the folder lacks are named: the mCE is not over the 15 a published one averages
    absent = [n for n in ALEXNET_ERRORS if n != "fog"][:14]
    assert "14 of the 15 standard corruptions are not in" in err and ", ".join(absent) in err
    assert list(json.loads((tmp_path / "a.json").read_text())["corruptions"]) == ["fog"]
    assert main([*args, "--results-file", str(tmp_path / "b.json"), "--corruptions", "fog", "speckle_noise"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["protocol"]["corruptions"] == ["fog", "speckle_noise"]


def test_hidden_folders_are_not_a_second_copy_of_a_corruption(tmp_path):
    """ImageNet-C unzipped from a macOS zip has __MACOSX/fog/3/... beside fog/3/...: the run stopped on
    "corruption 'fog' found twice" (.ipynb_checkpoints/fog/ likewise)."""
    for top in ("", "__MACOSX/", ".ipynb_checkpoints/"):
        (tmp_path / f"{top}fog" / "3" / "cat").mkdir(parents=True)
    assert robustness.find_corruptions(str(tmp_path)) == {"fog": tmp_path / "fog"}


def test_class_folders_named_like_severities(tmp_path):
    """Class folders named 1, 2, ... (CIFAR-10-C saved by class index): two corruptions stopped on "corruption '1'
    found twice", one on "the images in 'fog/1/1' are not in class sub-folders" (the severity's class "1" was taken
    for its split); the errors are now the hand-computed ones."""
    names = ["1", "2"]
    rng = np.random.default_rng(0)
    for corruption in ("fog", "noise/gaussian_noise"):
        for severity in range(1, 6):
            for label, name in enumerate(names):
                (tmp_path / "c" / corruption / str(severity) / name).mkdir(parents=True)
                make_image(rng, label if severity < 4 else 1 - label).save(
                    tmp_path / "c" / corruption / str(severity) / name / "0.png")
    checkpoint = save_training_checkpoint(tmp_path / "m.pth", tiny_model(seed=0), class_names=names)
    found = robustness.find_corruptions(str(tmp_path / "c"))
    assert found == {"fog": tmp_path / "c" / "fog", "gaussian_noise": tmp_path / "c" / "noise" / "gaussian_noise"}
    assert main(["robustness", str(tmp_path / "c"), "--results-file", str(tmp_path / "r.json"),
                 "--checkpoint", str(checkpoint), "-j", "0", "--device", "cpu"]) == 0
    model = reference_model(checkpoint)
    for corruption, folder in found.items():
        for severity in "12345":
            files = sorted((folder / severity).rglob("*.png"))
            labels = torch.tensor([names.index(f.parent.name) for f in files])
            with torch.no_grad():
                expected = (model(_inputs(files, 1.0)).argmax(-1) != labels).float().mean().item()
            errors = json.loads((tmp_path / "r.json").read_text())["corruptions"][corruption]["errors"]
            assert errors[severity] == pytest.approx(expected)


def test_the_printed_mce_says_whether_it_is_the_published_kind(capsys):
    """The printed mCE named only a count of corruptions: with speckle_noise added it was the mean over 16, with a
    severity missing a mean over fewer severities, each printed as plainly as the published 15-corruption mCE."""
    from sequencer.commands.robustness import _print_summary

    standard = {n: robustness.corruption_summary({s: 0.5 for s in "12345"}, n) for n in list(ALEXNET_ERRORS)[:15]}
    published = sum(0.5 / ALEXNET_ERRORS[n] for n in standard) / 15
    cases = [(standard, "(the 15 standard corruptions, all five severities)"),
             (dict(standard, speckle_noise=robustness.corruption_summary({s: 0.1 for s in "12345"}, "speckle_noise")),
              f"over the 15 standard corruptions alone (the published mCE): {published:.4f}"),
             (dict(standard, fog=robustness.corruption_summary({s: 0.5 for s in "1245"}, "fog")),
              "not comparable to a published mCE (15 of the 15 standard corruptions; fog lacking severities)")]
    for per_corruption, expected in cases:
        results = summarize(per_corruption)
        _print_summary(results, len(per_corruption))
        assert capsys.readouterr().out.rstrip().endswith(expected)
