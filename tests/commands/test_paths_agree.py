"""One checkpoint with its own preprocessing and class order, every way a user asks it about the same images: the
numbers agree with a reference computed by hand from the checkpoint's record (torchvision, not our transforms)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

import sequencer
from sequencer.cli import main
from sequencer.data.datasets import ClassificationDataset
from sequencer.data.imagenet_classes import IMAGENET_CLASSES
from sequencer.engine.inference import LoadedModel, label_with_model_classes

TINY = dict(layers=(1, 1, 1), embed_dims=(16, 16, 16), hidden_sizes=(4, 4, 4))
# none of it the model's defaults: its own statistics, a crop, bilinear resizing, 16 px, classes not in folder order
RECORD = dict(mean=[0.3, 0.45, 0.6], std=[0.2, 0.3, 0.25], crop_pct=0.8, interpolation="bilinear", img_size=16)
CLASSES = ["c", "a", "b"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, val folder, image files, hand logits (N, 3), labels (N,) by class name)."""
    root = tmp_path_factory.mktemp("agree")
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_nano", num_classes=3, img_size=16, **TINY)
    torch.nn.init.normal_(model.head.fc.weight, std=2.0)
    checkpoint = root / "ckpt.pth.tar"
    torch.save({"version": 1, "arch": model.model_name, "model_kwargs": model.model_kwargs, "class_names": CLASSES,
                "data_config": RECORD, "state_dict": model.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    files = []
    for name in sorted(CLASSES):
        (root / "data" / "val" / name).mkdir(parents=True)
        for i in range(3):  # not square, so the resize and the crop matter
            files.append(root / "data" / "val" / name / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (18 + 2 * i, 27, 3), dtype=np.uint8)).save(files[-1])
    by_hand = T.Compose([T.Resize(int(RECORD["img_size"] / RECORD["crop_pct"]),
                                  interpolation=T.InterpolationMode.BILINEAR),
                         T.CenterCrop(RECORD["img_size"]), T.ToTensor(), T.Normalize(RECORD["mean"], RECORD["std"])])
    with torch.no_grad():
        logits = model.eval()(torch.stack([by_hand(Image.open(f).convert("RGB")) for f in files]))
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    return SimpleNamespace(checkpoint=checkpoint, data=root / "data", files=files, logits=logits, labels=labels)


def _loaded_as_a_user_does(trained) -> torch.nn.Module:
    kwargs = torch.load(trained.checkpoint, weights_only=True)["model_kwargs"]
    return sequencer.create_model("sequencer2d_nano", checkpoint_path=str(trained.checkpoint), **kwargs).eval()


def test_predict_and_validate_give_the_hand_computed_numbers(trained, capsys):
    assert main(["predict", *map(str, trained.files), "--checkpoint", str(trained.checkpoint), "--json", "-b", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == list(map(str, trained.files))  # in the order given
    probs = trained.logits.softmax(-1)
    for row, record in zip(probs, records):
        assert [p["index"] for p in record["predictions"]] == row.argsort(descending=True).tolist()
        assert all(p["label"] == CLASSES[p["index"]] for p in record["predictions"])
        assert [p["prob"] for p in record["predictions"]] == pytest.approx(row.sort(descending=True).values.tolist(),
                                                                             abs=2e-6)
    result = sequencer.validate(trained.checkpoint, trained.data, workers=0, progress=False)
    hand_top1 = 100 * (trained.logits.argmax(-1) == trained.labels).double().mean().item()
    assert 0 < hand_top1 < 100  # folders mapped by index instead of by name would give another number
    assert result.top1 == pytest.approx(hand_top1, abs=1e-3)
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(trained.logits, trained.labels).item(),
                                        abs=1e-4)


def test_a_module_loaded_from_the_checkpoint_validates_as_the_checkpoint_does(trained):
    """create_model(checkpoint_path=...) gave the model's default preprocessing and validate(model=...) mapped the
    folders alphabetically: loss 6.56 for the checkpoint's 5.06 here (top-1 33.3% both, by chance)."""
    from_file = sequencer.validate(trained.checkpoint, trained.data, workers=0, progress=False)
    in_memory = sequencer.validate(model=_loaded_as_a_user_does(trained), data=trained.data, workers=0,
                                   progress=False)
    assert (in_memory.top1, in_memory.loss) == (from_file.top1, from_file.loss)
    assert (in_memory.img_size, in_memory.crop_pct, in_memory.interpolation) == (16, 0.8, "bilinear")
    # built without the record's model_kwargs (img_size left at the model's default, 32): the record's size still
    default_size = sequencer.create_model("sequencer2d_nano", checkpoint_path=str(trained.checkpoint), num_classes=3,
                                          **TINY)
    assert default_size.img_size != 16
    result = sequencer.validate(model=default_size, data=trained.data, workers=0, progress=False)
    assert (result.img_size, result.loss) == (16, from_file.loss)


def test_timms_data_config_of_a_loaded_checkpoint_is_its_record(trained):
    """timm's idiom (resolve_data_config + create_transform) on a model create_model or torch.hub loads from a
    checkpoint gives its numbers; before, the model's defaults (max logit error 9.8, top-1 agreeing on 3 of 9)."""
    model = _loaded_as_a_user_does(trained)
    cfg = timm.data.resolve_data_config(model=model)
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"], cfg["input_size"]) == (
        tuple(RECORD["mean"]), tuple(RECORD["std"]), 0.8, "bilinear", (3, 16, 16))
    assert model.pretrained_cfg["label_names"] == CLASSES
    transform = timm.data.create_transform(**cfg)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in trained.files]))
    torch.testing.assert_close(logits, trained.logits, rtol=1e-5, atol=1e-5)
    # what the caller says stays theirs
    mine = sequencer.create_model("sequencer2d_nano", checkpoint_path=str(trained.checkpoint), img_size=32,
                                  pretrained_cfg_overlay=dict(crop_pct=0.9), **{**TINY, "num_classes": 3})
    assert (mine.pretrained_cfg["input_size"], mine.pretrained_cfg["crop_pct"]) == ((3, 32, 32), 0.9)
    assert mine.pretrained_cfg["interpolation"] == "bilinear"


@pytest.mark.parametrize("names", [list(IMAGENET_CLASSES), None], ids=["imagenet-readable", "none"])
def test_imagenet_synset_folders_label_an_export_of_a_1000_class_model(names):
    """An ONNX or safetensors export of a 1000-class model records ImageNet's readable names (predict's labels);
    `validate IMAGENET --onnx` refused all 1000 synset folders as classes the model was not trained on, where
    `--checkpoint` evaluated them."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    stand_in = {"class_names": names} if names else None  # what load_onnx passes for the file's names
    loaded = LoadedModel(SimpleNamespace(num_classes=1000), "m", names, (3, 16, 16), checkpoint=stand_in)
    every = ClassificationDataset(synsets, "imagenet/val")
    label_with_model_classes(every, loaded)
    assert every.target_transform is None and every.class_names == synsets  # folder i is class i
    some = ClassificationDataset([synsets[7], synsets[500]], "imagenet/val")
    label_with_model_classes(some, loaded)
    assert [some.target_transform(0), some.target_transform(1)] == [7, 500]


def test_a_module_loaded_from_the_checkpoint_leaves_out_its_ignored_classes(trained, tmp_path):
    """A class-map run records the class folders it left out (`ignored_classes`): validate --checkpoint leaves them
    out; validate(model=create_model(checkpoint_path=...)) refused the folder ("classes the model was not trained
    on") before create_model kept that record on the module."""
    import shutil

    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    checkpoint["ignored_classes"] = ["d"]
    torch.save(checkpoint, tmp_path / "mapped.pth.tar")
    shutil.copytree(trained.data, tmp_path / "data")
    shutil.copytree(tmp_path / "data" / "val" / "a", tmp_path / "data" / "val" / "d")  # a folder the map left out
    from_file = sequencer.validate(tmp_path / "mapped.pth.tar", tmp_path / "data", workers=0, progress=False)
    model = sequencer.create_model("sequencer2d_nano", checkpoint_path=str(tmp_path / "mapped.pth.tar"),
                                   **checkpoint["model_kwargs"])
    in_memory = sequencer.validate(model=model, data=tmp_path / "data", workers=0, progress=False)
    assert (in_memory.images, in_memory.top1, in_memory.loss) == (from_file.images, from_file.top1, from_file.loss)
    assert from_file.images == len(trained.files)
    assert model.ignored_classes == ["d"] and "ignored_classes" not in model.pretrained_cfg  # timm refuses the key


def test_a_module_loaded_from_a_val_fraction_checkpoint_evaluates_its_held_out_images(trained, tmp_path):
    """A `--val-fraction` run records the images it held out of its training folder: validate --checkpoint, given
    that folder or no data, evaluates those; validate(model=create_model(checkpoint_path=...)) refused both (a folder
    with only train/: "split 'validation' not found"; no data: "does not record the data") before create_model kept
    the record."""
    import shutil

    from sequencer.data import create_dataset
    from sequencer.data.splits import sample_keys

    shutil.copytree(trained.data / "val", tmp_path / "data" / "train")
    held_out = sample_keys(create_dataset("", root=str(tmp_path / "data")))[::3]  # one image of each class
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    checkpoint["data"] = {"dataset": "", "root": str(tmp_path / "data"), "split": "train", "files": held_out,
                          "files_in": str(tmp_path / "data" / "train")}
    torch.save(checkpoint, tmp_path / "carved.pth.tar")
    from_file = sequencer.validate(tmp_path / "carved.pth.tar", tmp_path / "data", workers=0, progress=False)
    assert from_file.images == len(held_out) == 3
    model = sequencer.create_model("sequencer2d_nano", checkpoint_path=str(tmp_path / "carved.pth.tar"),
                                   **checkpoint["model_kwargs"])
    for data in (tmp_path / "data", None):
        in_memory = sequencer.validate(model=model, data=data, workers=0, progress=False)
        assert (in_memory.images, in_memory.top1, in_memory.loss) == (from_file.images, from_file.top1,
                                                                      from_file.loss), data
    assert model.training_data == checkpoint["data"]
