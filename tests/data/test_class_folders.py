"""Issue 19 items 2-3: the split's top-level folders are the classes, in folders, tars, validate and predict.

Layouts as users keep them: classes sorted into year sub-folders, deeper nesting, Jupyter's .ipynb_checkpoints,
macOS dot-files, and a tar holding train/ and val/. JPEGs are written with PIL; tars with `tarfile`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.data import create_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "sequencer2d_nano", "--model-kwargs", "layers=(1,1)", "patch_sizes=(2,1)", "embed_dims=(16,16)",
        "hidden_sizes=(4,4)", "mlp_ratios=(2,2)", "--img-size", "16", "--device", "cpu"]


def jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def nested_dataset(root: Path) -> Path:
    """train: cat and dog sorted by year (4 each), ship 2 levels deep (2), plus hidden entries; val: 1 per class."""
    seed = iter(range(1000))
    for animal in ("cat", "dog"):
        for year in ("2019", "2020"):
            for i in range(2):
                jpeg(root / "train" / animal / year / f"{i}.jpg", next(seed))
    for i in range(2):
        jpeg(root / "train" / "ship" / "sub" / "deeper" / f"{i}.JPG", next(seed))
    jpeg(root / "train" / ".ipynb_checkpoints" / "0.jpg", next(seed))  # not a class
    jpeg(root / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.jpg", next(seed))  # not data
    jpeg(root / "train" / "dog" / "._0.jpg", next(seed))  # macOS AppleDouble: not data
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    # a Synology NAS's thumbnails of each photo: were a class "@eaDir", and 1 more cat (5)
    jpeg(root / "train" / "@eaDir" / "SYNOFILE_THUMB_M.jpg", next(seed))
    jpeg(root / "train" / "cat" / "2019" / "@eaDir" / "0.jpg" / "SYNOPHOTO_THUMB_M.jpg", next(seed))
    for animal in ("cat", "dog", "ship"):
        jpeg(root / "val" / animal / "0.jpg", next(seed))
    return root


def as_tar(folder: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w") as tf:
        for split in ("train", "val"):
            tf.add(folder / split, arcname=split)
    return tar_path


def counts(ds) -> dict:
    found = {name: 0 for name in ds.class_names}
    for i in range(len(ds)):
        found[ds.class_names[ds[i][1]]] += 1
    return found


@pytest.fixture
def nested(tmp_path):
    return nested_dataset(tmp_path / "pets")


@pytest.mark.parametrize("form", ["folder", "tar"])
def test_top_level_folders_are_the_classes(nested, tmp_path, form):
    root = nested if form == "folder" else as_tar(nested, tmp_path / "pets.tar")
    train = create_dataset("", root=str(root), split="train")
    assert train.class_names == ["cat", "dog", "ship"]
    assert counts(train) == {"cat": 4, "dog": 4, "ship": 2}
    val = create_dataset("", root=str(root), split="validation")
    assert counts(val) == {"cat": 1, "dog": 1, "ship": 1}


def test_tar_of_a_whole_dataset_folder_and_folder_of_class_tars(nested, tmp_path):
    wrapped = tmp_path / "wrapped.tar"
    with tarfile.open(wrapped, "w") as tf:  # `tar cf wrapped.tar pets`
        tf.add(nested, arcname="pets")
    assert counts(create_dataset("", root=str(wrapped), split="train")) == {"cat": 4, "dog": 4, "ship": 2}
    per_class = tmp_path / "per_class"
    per_class.mkdir()
    for name in ("cat", "dog", "ship"):
        with tarfile.open(per_class / f"{name}.tar", "w") as tf:
            tf.add(nested / "train" / name, arcname=name)
    assert counts(create_dataset("tar", root=str(per_class))) == {"cat": 4, "dog": 4, "ship": 2}


def test_tar_without_the_split_names_the_splits_it_has(nested, tmp_path):
    from sequencer.errors import SequencerError
    tar = as_tar(nested, tmp_path / "pets.tar")
    with pytest.raises(SequencerError, match="split 'test' not found.*splits found: train, val"):
        create_dataset("", root=str(tar), split="test")


@pytest.mark.slow
def test_train_validate_predict_a_tar_with_splits(nested, tmp_path, monkeypatch, capsys):
    """The three commands in this process (cli.main; a `python -m sequencer` subprocess each took 13.6 s of CPU,
    mostly imports)."""
    from sequencer.cli import main
    monkeypatch.chdir(tmp_path)
    tar = as_tar(nested, tmp_path / "pets.tar")
    capsys.readouterr()
    assert main(["train", str(tar), *TINY, "-b", "4", "-j", "0", "--epochs", "1", "--warmup-epochs", "0",
                 "--output", str(tmp_path / "out"), "--experiment", "t"]) == 0
    said = capsys.readouterr()
    assert "on 10 images" in said.out + said.err and "3 classes" in said.out + said.err
    ckpt = torch.load(tmp_path / "out" / "t" / "last.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog", "ship"]
    assert main(["validate", str(tar), "--checkpoint", str(tmp_path / "out" / "t" / "last.pth.tar"), "--device",
                 "cpu", "-j", "0", "--results-file", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 3  # val/ only, not all 13 images
    # predict on a class folder: the images of both years, none of the hidden ones
    capsys.readouterr()
    assert main(["predict", str(nested / "train" / "cat"), "--checkpoint", str(tmp_path / "out" / "t" / "last.pth.tar"),
                 "--device", "cpu", "--json"]) == 0
    images = sorted(Path(json.loads(line)["image"]).relative_to(nested / "train" / "cat").as_posix()
                    for line in capsys.readouterr().out.splitlines())
    assert images == ["2019/0.jpg", "2019/1.jpg", "2020/0.jpg", "2020/1.jpg"]


def test_class_order_of_names_alike_in_natural_order_is_the_same_in_every_process(tmp_path):
    """class01/class1 and Dog/dog compare equal in natural order; they were ordered as a set happened to iterate,
    which the hash seed of each process decides: under torchrun two ranks gave one class two labels. Ties now go by
    the names themselves."""
    for name in ("class1", "class01", "dog", "Dog", "class2"):
        jpeg(tmp_path / "train" / name / "0.jpg", seed=0)
    expected = ["class01", "class1", "class2", "Dog", "dog"]
    assert create_dataset("", root=str(tmp_path), split="train").class_names == expected
    script = f"from sequencer.data import create_dataset; print(create_dataset('', root={str(tmp_path)!r}, split='train').class_names)"
    env = dict(os.environ, PYTHONHASHSEED="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"),
                                                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == str(expected), out.stderr[-2000:]  # seed 1 gave class1, class01, ..., dog, Dog
