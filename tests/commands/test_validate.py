import csv
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sequencer.cli import main
from sequencer.data import create_dataset, create_loader, resolve_data_config
from sequencer.engine.evaluate import evaluate
from sequencer.errors import SequencerError
from sequencer.models import create_model
from sequencer.models.kernels import onednn_bf16_supported

TINY = dict(layers=(1, 1, 1), embed_dims=(16, 16, 16), hidden_sizes=(4, 4, 4))
MEAN, STD = (0.4, 0.5, 0.6), (0.3, 0.2, 0.25)


def _write_checkpoint(path, class_names, img_size=8, seed=0, data=None):
    """A checkpoint as `sequencer train` writes it (contract 1), with a random (not zero-initialised) head;
    ``data``: its record of the data it was trained on (none by default)."""
    torch.manual_seed(seed)
    model = create_model("sequencer2d_nano", num_classes=len(class_names), img_size=img_size, **TINY)
    torch.nn.init.normal_(model.head.fc.weight, std=2.0)
    torch.nn.init.normal_(model.head.fc.bias, std=0.5)
    torch.save({
        "version": 1, "arch": model.model_name, "model_kwargs": model.model_kwargs,
        "class_names": list(class_names),
        "data_config": {"mean": list(MEAN), "std": list(STD), "crop_pct": 1.0, "interpolation": "bilinear",
                        "img_size": img_size},
        "state_dict": model.state_dict(), "epoch": 3, "metric": None, "args": {},
        **({"data": data} if data else {}),
    }, path)
    return model.eval()


def _write_folder(root, classes=("a", "b", "c"), per_class=4, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def _reference(model, root, class_index):
    """Top-1 and mean cross-entropy computed by hand: read each PNG, normalise, one image at a time."""
    hits = total = loss = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for png in sorted(folder.glob("*.png")):
            x = TF.normalize(TF.to_tensor(Image.open(png).convert("RGB")), MEAN, STD)
            target = class_index[folder.name]
            with torch.no_grad():
                logits = model(x[None])[0]
            hits += int(logits.argmax().item() == target)
            loss += float(torch.logsumexp(logits, 0) - logits[target])
            total += 1
    return 100.0 * hits / total, loss / total, total


def test_validate_checkpoint_on_folder_matches_reference(tmp_path, capsys):
    _write_folder(tmp_path / "data" / "val")
    _write_folder(tmp_path / "data" / "train", per_class=1)
    model = _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.json"
    rc = main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "-b", "5",
               "-j", "0", "--results-file", str(results)])
    assert rc == 0
    got = json.loads(results.read_text())
    ref_top1, ref_loss, count = _reference(model, tmp_path / "data" / "val", {"a": 0, "b": 1, "c": 2})
    assert got["count"] == count == 12
    assert got["top1"] == pytest.approx(ref_top1, abs=1e-3) and 0 < ref_top1 < 100
    assert got["loss"] == pytest.approx(ref_loss, abs=1e-4)  # same preprocessing as the checkpoint's
    assert got["model"] == "sequencer2d_nano" and got["img_size"] == 8 and got["dataset"].endswith("val")
    assert got["param_count"] == sum(p.numel() for p in model.parameters())
    assert got["images_per_sec"] > 0 and got["top5"] == 100.0  # 3 classes
    out = capsys.readouterr().out
    assert f"Acc@1 {got['top1']:.3f}" in out and "sequencer2d_nano" in out

    # the training engine's eval path (same loader + evaluate) gives the same number
    ds = create_dataset("", root=str(tmp_path / "data"), split="validation")
    loader = create_loader(ds, (3, 8, 8), 4, False, mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear")
    assert evaluate(model, loader, "cpu")["top1"] == pytest.approx(got["top1"], abs=1e-3)


def test_paper_style_flags_and_csv_results(tmp_path):
    _write_folder(tmp_path / "data" / "val")
    _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.csv"
    rc = main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "-b", "16",
               "--input-size", "3", "8", "8", "--amp", "--crop-pct", "1.0", "--split", "val", "-j", "1",
               "--results-file", str(results)])
    assert rc == 0
    rows = list(csv.DictReader(results.open()))
    # --amp is bfloat16 on the CPU; without native bf16 kernels (AVX2-only CPUs) it runs, and says, float32
    assert len(rows) == 1 and rows[0]["count"] == "12"
    assert rows[0]["amp"] == ("bfloat16" if onednn_bf16_supported() else "")
    assert 0 <= float(rows[0]["top1"]) <= 100
    # so does --fast, which runs a bfloat16 copy there (its results said "", a float32 evaluation)
    assert main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "--fast",
                 "--input-size", "3", "8", "8", "--split", "val", "-j", "0", "--results-file", str(results)]) == 0
    assert list(csv.DictReader(results.open()))[0]["amp"] == ("bfloat16" if onednn_bf16_supported() else "")


def test_one_channel_input_on_an_rgb_checkpoint_averages_its_recorded_statistics(tmp_path, capsys):
    """``--input-size 1 H W`` on a checkpoint trained on RGB: the stem is adapted (one warning) and the checkpoint's
    recorded mean/std, defaults rather than options, are averaged as the model's own would be. This was a second
    line blaming a --mean the user never gave."""
    _write_folder(tmp_path / "data" / "val")
    _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="the stem made for 3 input channels is adapted to 1"):
        rc = main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "-j", "0",
                   "--input-size", "1", "8", "8", "--results-file", str(results)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert json.loads(results.read_text())["count"] == 12
    assert "error" not in err and "--mean" not in err

    model = create_model("sequencer2d_nano", num_classes=3, img_size=8, **TINY)
    got = resolve_data_config({"input_size": (1, 8, 8)}, model, recorded={"mean": MEAN, "std": STD})
    assert got["mean"] == pytest.approx((sum(MEAN) / 3,)) and got["std"] == pytest.approx((sum(STD) / 3,))
    with pytest.raises(SequencerError, match="`mean` has 3 values for 1 input channels"):
        resolve_data_config({"input_size": (1, 8, 8), "mean": MEAN}, model, recorded={"mean": MEAN})


def test_validate_defaults_to_embedded_digits(tmp_path):
    """Without DATA, a digits checkpoint is evaluated on the digits' val split (a folder one: test_checkpoint_data)."""
    _write_checkpoint(tmp_path / "digits.pth.tar", [str(i) for i in range(10)],
                      data={"dataset": "digits", "root": None, "split": "validation"})
    results = tmp_path / "r.json"
    assert main(["validate", "--checkpoint", str(tmp_path / "digits.pth.tar"), "-b", "120",
                 "--results-file", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["dataset"] == "digits/val" and got["count"] == 360


def test_dataset_with_some_of_the_checkpoint_classes_is_mapped_by_name(tmp_path):
    _write_folder(tmp_path / "data", classes=("c",))
    model = _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.json"
    assert main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"),
                 "--results-file", str(results), "-j", "0"]) == 0
    ref_top1, ref_loss, _ = _reference(model, tmp_path / "data", {"c": 2})
    got = json.loads(results.read_text())
    assert got["top1"] == pytest.approx(ref_top1, abs=1e-3) and got["loss"] == pytest.approx(ref_loss, abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    ([], "does not record the data it was trained on: DATA is needed"),
    (["--results-file", "out.txt"], "unknown format"),
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}/data", "--split", "test"], "splits found: train"),
    (["--batch-size", "0"], "expected a positive integer"),
    (["{tmp}/data", "--split", "train", "--img-size", "9"], "input size 9x9"),
    (["{tmp}/data", "--split", "train", "--mean", "0.1", "0.2"], "--mean has 2 values"),
    (["{tmp}/data", "--device", "nope"], "--device 'nope' is not a device"),
    (["{tmp}/data", "--onnx", "{tmp}/m.onnx", "--torchcompile"], "--torchcompile does not apply to --onnx"),
    (["{tmp}/data", "--split", "train", "--fast", "--amp"], "--fast picks the precision itself"),
])
def test_user_errors_are_one_line(tmp_path, capsys, extra, message):
    _write_folder(tmp_path / "data" / "train", per_class=1)
    _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    argv = ["validate", "--checkpoint", str(tmp_path / "ckpt.pth.tar")] + [a.format(tmp=tmp_path) for a in extra]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects bad flag values itself
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_paper_command_uses_released_weights(monkeypatch, tmp_path):
    """`validate DATA --model sequencer2d_s ...` with no --checkpoint means the released weights, as in timm."""
    import sequencer.engine.validation as validation
    from sequencer.errors import SequencerError

    seen = {}

    def fake_load(checkpoint, model, pretrained, input_size, **kwargs):
        seen.update(model=model, pretrained=pretrained, input_size=input_size)
        raise SequencerError("stop here: no download in tests")

    monkeypatch.setattr(validation, "load_model", fake_load)
    _write_folder(tmp_path / "imagenet" / "val")
    rc = main(["validate", str(tmp_path / "imagenet"), "--model", "sequencer2d_s", "-b", "16",
               "--input-size", "3", "224", "224", "--amp"])
    assert rc == 2 and seen == dict(model="sequencer2d_s", pretrained=True, input_size=[3, 224, 224])


@pytest.mark.parametrize("flags", [["--fast"], ["--amp-dtype", "bfloat16"]], ids=["fast", "amp-bf16"])
def test_without_native_bf16_fast_and_amp_bf16_run_float32(tmp_path, monkeypatch, capsys, flags):
    """The bf16 check says no (as on AVX2 CPUs): --fast runs float32, --amp-dtype bfloat16 too, with a note."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # what every caller asks
    _write_folder(tmp_path / "data" / "val")
    model = _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.json"
    assert main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "-b", "5",
                 "--results-file", str(results), "-j", "0"] + flags) == 0
    ref_top1, ref_loss, _ = _reference(model, tmp_path / "data" / "val", {"a": 0, "b": 1, "c": 2})
    got = json.loads(results.read_text())
    assert got["top1"] == pytest.approx(ref_top1, abs=1e-3) and got["loss"] == pytest.approx(ref_loss, abs=1e-4)
    notes = [line for line in capsys.readouterr().err.splitlines() if "no native bf16 kernels" in line]
    assert len(notes) == (1 if "--amp-dtype" in flags else 0)


def test_fast_on_two_threads_runs_streams_with_the_same_numbers(tmp_path, monkeypatch):
    """--fast with 2 intra-op threads: each batch of 5 runs as two streams (3 + 2 images), and top-1 and loss are
    the plain float32 model's."""
    from sequencer.tools import optimize
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # fp32: exact numbers
    chunks = []
    run_stream = optimize._run_stream
    monkeypatch.setattr(optimize, "_run_stream",
                        lambda m, x, t: (chunks.append((x.shape[0], t)), run_stream(m, x, t))[1])
    _write_folder(tmp_path / "data" / "val")
    model = _write_checkpoint(tmp_path / "ckpt.pth.tar", ["a", "b", "c"])
    results = tmp_path / "r.json"
    torch.set_num_threads(2)
    try:
        assert main(["validate", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "-b", "5",
                     "--results-file", str(results), "-j", "0", "--fast"]) == 0
    finally:
        torch.set_num_threads(1)
    ref_top1, ref_loss, _ = _reference(model, tmp_path / "data" / "val", {"a": 0, "b": 1, "c": 2})
    got = json.loads(results.read_text())
    assert got["top1"] == pytest.approx(ref_top1, abs=1e-3) and got["loss"] == pytest.approx(ref_loss, abs=1e-4)
    assert chunks and all(threads == 1 for _, threads in chunks) and (3, 1) in chunks


@pytest.mark.parametrize("command", [["validate", "{tmp}"], ["predict", "{tmp}/a.png"]])
def test_a_segmentation_checkpoint_is_named_as_such(tmp_path, capsys, command):
    """`validate`/`predict --checkpoint` of a `segment train` checkpoint said "no model given" (a checkpoint was
    given): it names the file as a segmentation model and the command that runs it."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    torch.save({"version": 1, "segmenter": {"backbone": "sequencer2d_nano", "head": "fpn"}, "state_dict": {}},
               tmp_path / "seg.pth.tar")
    argv = [a.format(tmp=tmp_path) for a in command] + ["--checkpoint", str(tmp_path / "seg.pth.tar")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a segmentation model" in err and "sequencer segment validate" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_released_weights_with_another_class_count_are_refused_before_loading(tmp_path, monkeypatch, capsys,
                                                                            command):
    """--pretrained (or --model alone) with --num-classes 3: the released 1000-class head would be replaced by an
    untrained one, and validate scored its all-equal logits (66.667% top-1: every image read as the first class,
    two thirds of them of it) behind a warning about transfer learning. One line, and nothing is downloaded."""
    import sequencer.models.hub as hub

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(hub, "download_weights", no_download)
    _write_folder(tmp_path / "data" / "val")
    data = [str(tmp_path / "data")] if command == "validate" else [str(next((tmp_path / "data").rglob("*.png")))]
    capsys.readouterr()
    assert main([command, *data, "--model", "sequencer2d_s", "--pretrained", "--num-classes", "3"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained with --num-classes 3: sequencer2d_s's released weights have a 1000-class head, so a " \
           "3-class one would be untrained" in err and len(err.strip().splitlines()) == 1
