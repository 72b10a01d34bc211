import json
import os

import pytest
import torch
from PIL import Image

from sequencer.cli import main
from sequencer.models import create_model

from tools.conftest import TINY_ARCH, TINY_KWARGS, reference_inputs, reference_model


def test_predict_json_files_and_folders(image_folder, tiny_checkpoint, capsys):
    single = image_folder / "val" / "cat" / "cat_0.png"
    assert main(["predict", str(single), str(image_folder / "val"), "--checkpoint", str(tiny_checkpoint),
                 "--json", "--topk", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6  # cat_0.png given twice counts once
    assert {r["image"] for r in records} == {str(p) for p in (image_folder / "val").rglob("*.png")}
    with torch.no_grad():
        expected = reference_model(tiny_checkpoint)(reference_inputs([r["image"] for r in records])).softmax(-1)
    for r, exp in zip(records, expected):
        preds = r["predictions"]
        assert len(preds) == 2  # topk is capped at the class count
        assert {p["label"] for p in preds} == {"cat", "dog"}
        assert preds[0]["prob"] >= preds[1]["prob"]
        assert sum(p["prob"] for p in preds) == pytest.approx(1.0, abs=1e-5)
        for p in preds:
            assert p["label"] == ["cat", "dog"][p["index"]]
            assert p["prob"] == pytest.approx(exp[p["index"]].item(), abs=1e-5)


def test_predict_imagenet_names_for_1000_class_model(tmp_path, capsys):
    from sequencer.data.imagenet_classes import IMAGENET_CLASSES

    torch.manual_seed(0)
    model = create_model(TINY_ARCH, **dict(TINY_KWARGS, num_classes=1000))
    torch.nn.init.normal_(model.head.fc.weight)
    torch.save({"arch": TINY_ARCH, "model_kwargs": model.model_kwargs, "state_dict": model.state_dict()},
               tmp_path / "in1k.pth")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", str(tmp_path / "red.png"), "--checkpoint", str(tmp_path / "in1k.pth"), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == f"{tmp_path / 'red.png'}:" and len(lines) == 4
    for line in lines[1:]:
        index = int(line.split("(")[-1].split(")")[0])
        assert IMAGENET_CLASSES[index] in line


def test_predict_unreadable_image_warns_and_continues(image_folder, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    good = image_folder / "val" / "dog" / "dog_1.png"
    assert main(["predict", str(bad), str(good), "--checkpoint", str(tiny_checkpoint), "--json"]) == 1
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "warning" in captured.err
    records = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["image"] for r in records] == [str(good)]


def test_predict_errors(tmp_path, tiny_checkpoint, capsys):
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "missing.png" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "no image files" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no model given" in err and err.count("\n") == 1


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("command, suffix, named", [("predict", ".pt", "is a TorchScript export"),
                                                    ("validate", ".pt", "is a TorchScript export"),
                                                    ("predict", ".pt2", "is a torch.export program")])
def test_our_torchscript_export_as_checkpoint_is_named(tiny_checkpoint, tmp_path, capsys, command, suffix, named):
    """Issue 19 item 7: our own export passed as --checkpoint says what it is and what to pass instead (an
    exported program, .pt2, too: it was called corrupt)."""
    ts = tmp_path / f"tiny{suffix}"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(ts)]) == 0
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "data" / "cat" / "a.jpg")
    capsys.readouterr()
    target = [str(tmp_path / "data")] + (["--device", "cpu"] if command == "validate" else [])
    assert main([command, *target, "--checkpoint", str(ts)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and named in err[0] and ".pth.tar" in err[0], err


def test_predict_fast_gives_the_same_answers(image_folder, tiny_checkpoint, capsys, monkeypatch):
    """--fast on a CPU whose "auto" path is float32 (the bf16 check is made to say no): the same probabilities."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # what every caller asks
    argv = ["predict", str(image_folder / "val"), "--checkpoint", str(tiny_checkpoint), "--json"]
    assert main(argv) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(argv + ["--fast"]) == 0
    fast = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["image"] for r in fast] == [r["image"] for r in plain]
    for a, b in zip(fast, plain):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [p["prob"] for p in a["predictions"]] == pytest.approx([p["prob"] for p in b["predictions"]], abs=1e-5)
    assert main(argv + ["--fast", "--onnx", "x.onnx"]) == 2
    assert "--fast does not apply to --onnx" in capsys.readouterr().err


def test_outputs_without_a_class_are_labelled_as_such(image_folder, tmp_path, capsys):
    """A 5-output checkpoint trained on 3 classes (train --num-classes 5): `predict --num-classes 5` labels outputs
    3 and 4 '(no class: output N)' with one warning, not "3" and "4" as if they were class names; and
    --num-classes 5 on a 3-output checkpoint is refused in one line."""
    from tools.conftest import save_training_checkpoint, tiny_model
    model = tiny_model()
    model.reset_classifier(5)
    with torch.no_grad():
        model.head.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 50.0]))  # output 4 wins every image
    five = save_training_checkpoint(tmp_path / "five.pth", model, class_names=["a", "b", "c"])
    image = image_folder / "val" / "cat" / "cat_0.png"
    assert main(["predict", str(image), "--checkpoint", str(five), "--num-classes", "5", "--json"]) == 0
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)["predictions"]
    assert predictions[0] == {"label": "(no class: output 4)", "index": 4, "prob": pytest.approx(1.0, abs=1e-6)}
    assert {p["label"] for p in predictions} == {"a", "b", "c", "(no class: output 3)", "(no class: output 4)"}
    assert "the model has 5 outputs but 3 class names: outputs 3..4 belong to no class" in captured.err

    three = tiny_model()
    three.reset_classifier(3)
    save_training_checkpoint(tmp_path / "three.pth", three, class_names=["a", "b", "c"])
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "three.pth"), "--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert "has a 3-class head but --num-classes is 5" in err and len(err.strip().splitlines()) == 1


def test_one_channel_run_of_an_rgb_checkpoint_averages_its_statistics(image_folder, tmp_path, capsys):
    """``--input-size 1 H W`` on an RGB checkpoint normalises with the average of its recorded mean/std, as validate
    does (predict, erf, robustness and resolution-sweep crashed: 3 statistics for 1 channel)."""
    from sequencer.data import create_transform, load_image
    from tools.conftest import TINY_DATA_CONFIG, save_training_checkpoint, tiny_model

    mean, std = (0.2, 0.5, 0.8), (0.1, 0.2, 0.6)
    path = save_training_checkpoint(tmp_path / "rgb.pth", tiny_model(seed=0))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["data_config"].update(mean=mean, std=std)
    torch.save(checkpoint, path)
    files = sorted(str(p) for p in (image_folder / "val").rglob("*.png"))
    with pytest.warns(UserWarning, match="adapted to 1"):
        assert main(["predict", *files, "--checkpoint", str(path), "--input-size", "1", "32", "32", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    with pytest.warns(UserWarning, match="adapted to 1"):
        model = create_model(TINY_ARCH, checkpoint_path=str(path), **dict(TINY_KWARGS, in_chans=1)).eval()
    transform = create_transform((1, 32, 32), False, mean=(0.5,), std=(0.3,), crop_pct=TINY_DATA_CONFIG["crop_pct"],
                                 interpolation=TINY_DATA_CONFIG["interpolation"])
    with torch.no_grad():
        expected = model(torch.stack([transform(load_image(f)) for f in files])).softmax(-1)
    assert [r["image"] for r in records] == files
    for r, exp in zip(records, expected):
        for p in r["predictions"]:
            assert p["prob"] == pytest.approx(exp[p["index"]].item(), abs=1e-5)


def test_a_file_name_that_is_not_utf8_is_printed_escaped(tiny_checkpoint, tmp_path, capsys):
    """A Latin-1 ``caf\\xe9.png`` (from an old zip) ended predict in a UnicodeEncodeError traceback on a UTF-8 stdout
    (pytest's, like a terminal's, refuses the lone surrogate Python holds for the byte); the JSON output kept it."""
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        Image.new("RGB", (40, 40), (200, 30, 30)).save(name, format="PNG")  # pillow 10.0 reads no suffix of bytes
    except OSError:  # a file system that refuses names that are not UTF-8 (macOS) cannot hold such a file
        pytest.skip("this file system refuses names that are not UTF-8")
    assert main(["predict", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--topk", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{tmp_path}/caf\\xe9.png:"
    assert main(["predict", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert os.fsencode(record["image"]) == name  # the JSON names the file itself


def test_a_bce_trained_model_gets_each_class_sigmoid(image_folder, tmp_path, capsys):
    """--bce-loss trains one sigmoid per class: predict printed the softmax of the logits (0.79 for a class whose
    sigmoid is 0.0006). A training checkpoint (here an older one, whose run's settings say bce_loss) and its cleaned
    file give each class's sigmoid, with a note (test_export: an ONNX export records it); a cleaned file from before
    it was recorded gets softmax, with a note saying the file does not say."""
    from tools.conftest import save_training_checkpoint, tiny_model

    model = tiny_model()
    checkpoint = save_training_checkpoint(tmp_path / "bce.pth", model)
    record = torch.load(checkpoint, weights_only=True)
    record["args"]["bce_loss"] = True
    torch.save(record, checkpoint)
    image = image_folder / "val" / "cat" / "cat_0.png"
    with torch.no_grad():
        logits = model(reference_inputs([image]))[0]
    cleaned = tmp_path / "clean.pth"
    assert main(["checkpoint", "clean", str(checkpoint), "--no-ema", "-o", str(cleaned)]) == 0
    capsys.readouterr()
    for source in (checkpoint, cleaned):
        assert main(["predict", str(image), "--checkpoint", str(source), "--json"]) == 0
        captured = capsys.readouterr()
        for p in json.loads(captured.out)["predictions"]:
            assert p["prob"] == pytest.approx(logits.sigmoid()[p["index"]].item(), abs=1e-6)
        assert "trained with a binary cross-entropy loss (--bce-loss): each probability is its class's sigmoid" in \
            captured.err
    old = torch.load(cleaned, weights_only=True)
    del old["probabilities"]
    torch.save(old, cleaned)
    assert main(["predict", str(image), "--checkpoint", str(cleaned), "--json"]) == 0
    captured = capsys.readouterr()
    for p in json.loads(captured.out)["predictions"]:
        assert p["prob"] == pytest.approx(logits.softmax(-1)[p["index"]].item(), abs=1e-6)
    assert "does not record whether its run trained with --bce-loss" in captured.err
    # timm train.py's checkpoints record their flags as an argparse.Namespace
    import argparse
    from sequencer.models.loading import recorded_probabilities
    assert recorded_probabilities({"args": argparse.Namespace(model=TINY_ARCH, bce_loss=True)}) == "sigmoid"
