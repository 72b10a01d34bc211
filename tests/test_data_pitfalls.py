"""Issue 27's data items, each run the way a user runs it (``sequencer ...`` in this process, or the API), with
data-loader workers where the default uses them: held-out splits, symlink loops, unusable class folders, split
names, EXIF orientation, experiment names, unreadable images with workers, NFC/NFD class names."""
from __future__ import annotations

import json
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sequencer.cli import main
from sequencer.errors import SequencerError
from test_bad_inputs import TRAIN, data, run_cli, write_images  # noqa: F401  (fixtures)
from tools.conftest import save_training_checkpoint, tiny_model


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny (cat, dog) training checkpoint at 32 px."""
    return save_training_checkpoint(tmp_path / "cat_dog.pth.tar", tiny_model())


def cli(capsys, *args) -> tuple[int, str, str]:
    """``sequencer ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------- item 12: unreadable + workers
def _with_one_text_file(root: Path, split: str) -> Path:
    """40 images per class and one text file named .jpg: 1 of 81 unreadable, over the 1% limit."""
    write_images(root, split, ("cat", "dog"), per_class=40, size=8)
    broken = root / split / "cat" / "notes.jpg"
    broken.write_text("not an image")
    return broken


def test_validate_with_workers_reports_unreadable_share_in_one_line(run_cli, tmp_path, checkpoint):  # noqa: F811
    """With workers (validate's default) the check crashed: TypeError: list indices must be integers, not tuple."""
    broken = _with_one_text_file(tmp_path / "data", "val")
    line = run_cli("validate", tmp_path / "data", "--checkpoint", checkpoint, "--device", "cpu", "-j", "2",
                   expect="1 of 81 images are unreadable")
    assert str(broken) in line


def test_train_with_workers_reports_unreadable_share_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = _with_one_text_file(tmp_path / "data", "train")
    write_images(tmp_path / "data", "val", ("cat", "dog"), per_class=2, size=8)
    rc, _, err = cli(capsys, "train", tmp_path / "data", *TRAIN, "-j", "2")
    assert rc == 2 and "Traceback" not in err and "TypeError" not in err, err
    assert f"1 of 81 images are unreadable (more than 1%): {broken}" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- item 11: --experiment names
@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "/tmp/abs"])
def test_experiment_name_with_a_path_is_refused(run_cli, data, name):  # noqa: F811
    run_cli("train", data, *TRAIN, "--experiment", name, expect=f"--experiment {name!r}")


def test_experiment_name_with_a_path_is_refused_by_the_api(data, tmp_path):  # noqa: F811
    import sequencer
    with pytest.raises(SequencerError, match="without a path separator"):
        sequencer.train(data, experiment="../escaped", output=str(tmp_path / "out"), epochs=1, device="cpu")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- item 5: DATA and --data-dir
def test_data_and_another_data_dir_is_refused(run_cli, data, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    write_images(other, "train", ("x", "y"))
    run_cli("train", data, "--data-dir", other, *TRAIN, expect="--data-dir")


# ------------------------------------------------------------------------------- item 8: split name case
def test_exact_split_name_wins_and_a_case_only_ambiguity_is_reported(run_cli, tmp_path, checkpoint, capsys):  # noqa: F811
    root = tmp_path / "data"
    write_images(root, "Val", ("cat", "dog"), per_class=3, size=8)
    write_images(root, "val", ("cat", "dog"), per_class=2, size=8)
    for split, count in (("Val", 6), ("val", 4)):
        rc, out, err = cli(capsys, "validate", root, "--checkpoint", checkpoint, "--split", split, "--device", "cpu",
                           "-j", "0")
        assert rc == 0, err
        assert f"on {root / split}: {count} images" in out
    run_cli("validate", root, "--checkpoint", checkpoint, "--split", "VAL", "--device", "cpu", "-j", "0",
            expect="split 'VAL' is ambiguous")


# ------------------------------------------------------------------------------- NFC / NFD class names
def test_decomposed_class_folder_names_match_composed_checkpoint_names(tmp_path, capsys):
    """A macOS zip spells "café" decomposed (NFD); the checkpoint trained on a composed (NFC) "café"."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    ckpt = save_training_checkpoint(tmp_path / "c.pth.tar", tiny_model(), class_names=[nfc, "tea"])
    write_images(tmp_path / "data", "val", (nfd, "tea"), per_class=2, size=8)
    rc, out, err = cli(capsys, "validate", tmp_path / "data", "--checkpoint", ckpt, "--device", "cpu", "-j", "0")
    assert rc == 0 and "4 images" in out, err

    from sequencer.data import create_dataset, load_class_map
    assert create_dataset("", root=str(tmp_path / "data"), split="val").class_names == [nfc, "tea"]
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        tar.add(tmp_path / "data" / "val" / nfd, arcname=nfd)
        tar.add(tmp_path / "data" / "val" / "tea", arcname="tea")
    assert create_dataset("", root=str(tmp_path / "val.tar")).class_names == [nfc, "tea"]
    (tmp_path / "map.txt").write_text(f"tea\n{nfd}\n", encoding="utf-8")
    assert load_class_map(str(tmp_path / "map.txt")) == {"tea": 0, nfc: 1}


# ------------------------------------------------------------------------------- item 10: EXIF orientation
def _phone_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 64 wide x 32 high with EXIF orientation 6 (shown turned 90 degrees clockwise: 32x64); returns
    the upright pixels, decoded from the stored ones and turned by hand."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").transpose(Image.Transpose.ROTATE_270))


def test_exif_orientation_is_applied_on_every_decode_path(tmp_path, capsys):
    from sequencer.data import create_dataset
    from sequencer.engine.inference import read_images

    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "val" / "dog").mkdir(parents=True)
    upright = _phone_jpeg(tmp_path / "data" / "val" / "cat" / "phone.jpg")
    Image.fromarray(upright).save(tmp_path / "data" / "val" / "dog" / "upright.png")  # the same picture, lossless
    assert upright.shape == (64, 32, 3)
    dataset = create_dataset("", root=str(tmp_path / "data"), split="val")  # train and validate read this way
    image, _ = dataset[0]
    assert image.size == (32, 64) and np.array_equal(np.asarray(image), upright)
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        tar.add(tmp_path / "data" / "val", arcname=".")
    image, _ = create_dataset("", root=str(tmp_path / "val.tar"))[0]
    assert image.size == (32, 64)
    ok, tensors, _ = read_images([tmp_path / "data" / "val" / "cat" / "phone.jpg"], lambda img: img)  # predict's
    assert tensors[0].size == (32, 64)

    # predict as a user runs it: the phone's JPEG and the upright PNG of the same pixels get the same scores
    ckpt = save_training_checkpoint(tmp_path / "c.pth.tar", tiny_model())
    rc, out, err = cli(capsys, "predict", tmp_path / "data" / "val", "--checkpoint", ckpt, "--json", "--device",
                       "cpu")
    assert rc == 0, err
    scores = [json.loads(line)["predictions"] for line in out.splitlines()]
    assert len(scores) == 2 and scores[0] == scores[1]


# ------------------------------------------------------------------------------- item 2: symbolic links
def test_symlink_loop_counts_each_file_once_and_shared_splits_warn(tmp_path, capsys, monkeypatch):
    """`ln -s .. train/cat/up` made 12 images "732", every one reached through cat/up labelled cat; a val/dog
    that is a link to train/dog evaluated training images as held-out."""
    import os
    import warnings
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    write_images(root, "train", ("cat", "dog"), per_class=6, size=16)
    write_images(root, "val", ("cat",), per_class=2, size=16)
    os.symlink("..", root / "train" / "cat" / "up")
    os.symlink("../dog", root / "train" / "cat" / "more")  # dog's images, inside the split anyway
    os.symlink("../train/dog", root / "val" / "dog")

    from sequencer.data import create_dataset
    dataset = create_dataset("", root=str(root), split="train")
    assert len(dataset) == 12 and [t for _, t in dataset.samples] == [0] * 6 + [1] * 6

    rc, out, err = cli(capsys, "predict", root / "train", "--checkpoint",
                       save_training_checkpoint(tmp_path / "c.pth.tar", tiny_model()), "--json", "--device", "cpu")
    assert rc == 0 and len(out.splitlines()) == 12, err
    assert err.count("a loop") == 1 and f"skipped symbolic link {root / 'train' / 'cat' / 'up'}" in err
    assert err.count("read once, at their own path") == 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli(capsys, "train", root, *TRAIN)
    assert rc == 0, err
    assert "on 12 images" in out
    shared = [str(w.message) for w in caught if "share files" in str(w.message)]
    assert len(shared) == 1 and str(root / "train" / "dog") in shared[0]


# ------------------------------------------------------------------------------- item 6: unusable class folders
def test_empty_class_folders_are_named_once_each(tmp_path, capsys, monkeypatch):
    """An empty class folder in train and val gave "2 classes" with no word."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    write_images(root, "train", ("cat", "dog"), per_class=4, size=16)
    write_images(root, "val", ("cat", "dog"), per_class=2, size=16)
    for split in ("train", "val"):
        (root / split / "bird").mkdir()
    rc, out, err = cli(capsys, "train", root, *TRAIN)
    assert rc == 0, err
    assert "2 classes" in out
    for split in ("train", "val"):
        assert err.count(f"ignoring class folder {root / split / 'bird'}: it holds no image files") == 1


@pytest.mark.parametrize("archive", ["cat.tar", "cat.zip"])
def test_an_archive_beside_class_folders_is_refused_naming_the_class(run_cli, tmp_path, archive):  # noqa: F811
    """train/cat.tar beside train/{dog,bird}/ trained a 2-class model without a word."""
    root = tmp_path / "data"
    write_images(root, "train", ("bird", "dog"), per_class=4, size=16)
    write_images(root, "val", ("bird", "cat", "dog"), per_class=2, size=16)
    (root / "train" / archive).write_bytes(b"an archive of cat images")
    run_cli("train", root, *TRAIN, expect=f"{str(root / 'train' / archive)!r} is an archive beside the class "
                                          f"folders of {str(root / 'train')!r}: class 'cat' would be lost")


def test_a_zip_among_class_tars_is_refused(run_cli, tmp_path):  # noqa: F811
    write_images(tmp_path / "src", "x", ("dog", "bird"), per_class=4, size=16)
    tars = tmp_path / "tars"
    tars.mkdir()
    for name in ("dog", "bird"):
        with tarfile.open(tars / f"{name}.tar", "w") as tar:
            tar.add(tmp_path / "src" / "x" / name, arcname=name)
    (tars / "cat.zip").write_bytes(b"zip")
    run_cli("train", tars, "--dataset", "tar", *TRAIN, expect="class 'cat' would be lost")


def test_a_class_folder_link_to_nothing_is_refused_and_a_deeper_one_named(run_cli, tmp_path_factory, caplog):  # noqa: F811
    """``train/bird -> /mnt/usb/birds`` with the drive unmounted trained a 2-class model without a word (the link is
    neither a folder nor an image); a ``cat/2019 -> ...`` link to nothing lost its images silently."""
    import os
    root = tmp_path_factory.mktemp("links") / "data"  # outside run_cli's tmp_path, whose check reads every file
    write_images(root, "train", ("cat", "dog"), per_class=4, size=16)
    write_images(root, "val", ("cat", "dog"), per_class=2, size=16)
    os.symlink(root / "unmounted" / "birds", root / "train" / "bird")
    run_cli("train", root, *TRAIN, expect=f"{str(root / 'train' / 'bird')!r} is a symbolic link to "
                                          f"{str(root / 'unmounted' / 'birds')!r}, which does not exist: class 'bird' "
                                          f"would be lost")
    os.remove(root / "train" / "bird")
    os.symlink(root / "unmounted" / "2019", root / "train" / "cat" / "2019")
    from sequencer.data import create_dataset
    assert len(create_dataset("", root=str(root), split="train")) == 8
    assert caplog.text.count(f"skipped symbolic link {root / 'train' / 'cat' / '2019'}: it leads to") == 1


def test_a_data_folder_name_that_is_not_utf8_is_logged_escaped(tmp_path, capsys, checkpoint):  # noqa: F811
    """validate on a Latin-1 ``d\\xe9/`` lost its result line to a '--- Logging error ---' traceback on a UTF-8
    stdout (pytest's, like a terminal's, refuses the lone surrogate Python holds for the byte)."""
    import os
    root = os.path.join(os.fsencode(tmp_path), b"d\xe9")
    try:
        os.mkdir(root)
    except OSError:  # a file system that refuses names that are not UTF-8 (macOS)
        pytest.skip("this file system refuses names that are not UTF-8")
    write_images(Path(os.fsdecode(root)), "val", ("cat", "dog"), per_class=1, size=32)
    rc, out, err = cli(capsys, "validate", os.fsdecode(root), "--checkpoint", checkpoint, "-j", "0", "--device", "cpu")
    assert rc == 0 and "Logging error" not in err, err
    assert f"on {tmp_path}/d\\xe9/val: 2 images" in out


def test_val_fraction_lists_a_file_name_that_is_not_utf8_as_its_bytes(tmp_path, capsys, monkeypatch):
    """`train --val-fraction` on a Latin-1 ``caf\\xe9`` class ended in a UnicodeEncodeError traceback writing
    val_files.txt, leaving an experiment folder holding only args.yaml."""
    import os
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    write_images(root, "x", ("cat", "dog"), per_class=4, size=16)
    try:
        os.rename(root / "x" / "cat", os.path.join(os.fsencode(root / "x"), b"caf\xe9"))
    except OSError:  # a file system that refuses names that are not UTF-8 (macOS)
        pytest.skip("this file system refuses names that are not UTF-8")
    rc, out, err = cli(capsys, "train", root / "x", *TRAIN, "--val-fraction", "0.5", "--output", tmp_path / "out")
    assert rc == 0, err
    listing, = (tmp_path / "out").glob("*/val_files.txt")
    held_out = listing.read_bytes().splitlines()
    assert len(held_out) == 4 and sum(name.startswith(b"caf\xe9/") for name in held_out) == 2
