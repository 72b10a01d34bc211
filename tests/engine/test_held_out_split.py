"""Issue 27 item 1: data without a held-out split is never evaluated on its training images and called held-out;
``--val-fraction`` carves a seeded, stratified held-out split that ``validate`` and ``--resume`` reuse."""
from __future__ import annotations

import json
import logging
import os
import tarfile
import warnings

import pytest
import torch
from run_helpers import TINY_RUN, make_image_folder, summary_rows, train_cli

import sequencer
from sequencer.cli import main
from sequencer.errors import SequencerError

COLOURS = {"bird": (200, 30, 30), "cat": (30, 200, 30), "dog": (30, 30, 200)}
# TINY_RUN as sequencer.train keywords
TINY_KW = dict(model="sequencer2d_nano", model_kwargs=dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16),
                                                           hidden_sizes=(4, 4), mlp_ratios=(2, 2)),
               img_size=16, batch_size=8, workers=0, device="cpu", opt="adamw", lr=3e-3, warmup_epochs=0, hflip=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/{train,val}/{bird,cat,dog}: 8 train and 2 val images per class."""
    return make_image_folder(tmp_path_factory.mktemp("held_out"), COLOURS, 8, 2, size=16)


def _run(capsys, *args) -> tuple[int, str, str]:
    """`sequencer train ARGS`: (exit status, stdout, stderr with the warnings as the command shows them)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = train_cli([*args])
    out, err = capsys.readouterr()
    return rc, out, err + "".join(f"warning: {w.message}\n" for w in caught)


def test_class_folders_without_split_folders_train_without_evaluation(data, tmp_path, capsys):
    """`sequencer train DATA/train`: one warning, no evaluation, checkpoints by epoch, nothing called held-out."""
    rc, out, err = _run(capsys, data / "train", *TINY_RUN, "--epochs", "3", "--checkpoint-hist", "2",
                        "--output", tmp_path, "--experiment", "e")
    assert rc == 0, err
    assert err.count("no held-out split: training without evaluation") == 1 and "warning:" in err
    assert "held-out images" not in out and "top1" not in out and "eval top-1" not in out
    assert "trained 3 epochs" in out.splitlines()[-1] and "without evaluation" in out.splitlines()[-1]
    folder = tmp_path / "e"
    assert not (folder / "model_best.pth.tar").exists()
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]
    assert all(r["eval_top1"] == "" and r["eval_loss"] == "" for r in summary_rows(folder))
    ckpt = torch.load(folder / "last.pth.tar", weights_only=True)
    assert ckpt["best_metric"] is None and ckpt["best_epoch"] is None and ckpt["data"]["split"] is None

    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(folder / "last.pth.tar"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "(no held-out split): DATA is needed" in err and len(err.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="these are its training images, not held-out ones"):
        assert main(["validate", str(data / "train"), "--checkpoint", str(folder / "last.pth.tar"), "--device",
                     "cpu"]) == 0


def test_the_api_reports_no_best_without_a_held_out_split(data, tmp_path):
    # progress=False prints nothing: the note is a WARNING record of the "sequencer" logger (a warning otherwise)
    records, logger = [], logging.getLogger("sequencer")
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        result = sequencer.train(data / "train", progress=False, output=str(tmp_path), experiment="api", epochs=1,
                                 **TINY_KW)
    finally:
        logger.removeHandler(handler)
    assert any(r.levelname == "WARNING" and "no held-out split" in r.getMessage() for r in records)
    assert result.best_top1 is None and result.best_epoch is None
    assert result.checkpoint == tmp_path / "api" / "last.pth.tar"


def test_a_folder_of_class_tars_trains_without_evaluation(data, tmp_path, capsys):
    tars = tmp_path / "tars"
    tars.mkdir()
    for name in COLOURS:
        with tarfile.open(tars / f"{name}.tar", "w") as tar:
            tar.add(data / "train" / name, arcname=name)
    rc, out, err = _run(capsys, tars, "--dataset", "tar", *TINY_RUN, "--epochs", "1", "--output", tmp_path,
                        "--experiment", "t")
    assert rc == 0, err
    assert "no held-out split" in err and "held-out images" not in out
    assert not (tmp_path / "t" / "model_best.pth.tar").exists()


def test_val_fraction_carves_a_stratified_split_that_validate_and_resume_reuse(data, tmp_path, capsys):
    rc, out, err = _run(capsys, data / "train", *TINY_RUN, "--epochs", "1", "--val-fraction", "0.25", "-j", "2",
                        "--output", tmp_path, "--experiment", "v")
    assert rc == 0, err
    assert "no held-out split" not in err
    folder = tmp_path / "v"
    files = (folder / "val_files.txt").read_text().split()
    assert len(files) == 6 and sorted({f.split("/")[0] for f in files}) == sorted(COLOURS)  # 2 of 8 per class
    assert all(files.count(f) == 1 for f in files)
    assert "on 6 held-out images" in out.splitlines()[-1]
    record = torch.load(folder / "model_best.pth.tar", weights_only=True)["data"]
    assert record["files"] == files and record["files_in"] == str(data / "train")
    logged = float(summary_rows(folder)[-1]["eval_top1"])

    # validate without DATA, and with the same DATA, evaluates the held-out files only (default workers)
    for data_arg in ([], [str(data / "train")]):
        results = tmp_path / "r.json"
        assert main(["validate", *data_arg, "--checkpoint", str(folder / "model_best.pth.tar"), "--device", "cpu",
                     "--results-file", str(results)]) == 0
        got = json.loads(results.read_text())
        assert got["count"] == 6 and abs(got["top1"] - logged) < 1e-3
    # so does the resolution sweep at its size (it evaluated all 24 images, 18 of them training images)
    assert main(["resolution-sweep", str(data / "train"), "--checkpoint", str(folder / "model_best.pth.tar"),
                 "--sizes", "16", "-j", "0", "--device", "cpu", "-o", str(tmp_path / "sweep")]) == 0
    row = (tmp_path / "sweep" / "resolution.csv").read_text().splitlines()[1].split(",")
    assert int(row[-1]) == 6 and abs(float(row[1]) - logged) < 1e-3

    # a resume (another --seed would carve other files) holds out the same files
    rc, out, err = _run(capsys, data / "train", *TINY_RUN, "--epochs", "2", "--seed", "7",
                        "--resume", folder / "last.pth.tar")
    assert rc == 0, err
    assert (folder / "val_files.txt").read_text().split() == files
    assert torch.load(folder / "last.pth.tar", weights_only=True)["data"]["files"] == files
    assert "on 6 held-out images" in out.splitlines()[-1]


def test_val_fraction_is_refused_where_data_has_its_own_held_out_split(data, tmp_path):
    with pytest.raises(SequencerError, match="has a held-out split of its own"):
        sequencer.train(data, progress=False, output=str(tmp_path), epochs=1, val_fraction=0.2, **TINY_KW)
    assert not any(tmp_path.iterdir())


def test_validate_finds_files_carved_from_a_train_folder(data, tmp_path, capsys):
    """DATA with only train/: `validate DATA --checkpoint` evaluates the held-out files of train/ (there is no
    val/ to find by name); so does `validate --onnx` of its export, with DATA or without (given train/, it
    evaluated all 24 images, 18 of them training images, with no word of it; given DATA, it refused)."""
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train").symlink_to(data / "train", target_is_directory=True)
    rc, _, err = _run(capsys, only_train, *TINY_RUN, "--epochs", "1", "--val-fraction", "0.25", "--output", tmp_path,
                      "--experiment", "t")
    assert rc == 0, err
    results = tmp_path / "r.json"
    assert main(["validate", str(only_train), "--checkpoint", str(tmp_path / "t" / "last.pth.tar"), "--device", "cpu",
                 "-j", "0", "--results-file", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["count"] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its held-out files alone, named train/: no word of training images
        assert main(["validate", str(only_train), "--split", "train", "--checkpoint", str(tmp_path / "t" /
                     "last.pth.tar"), "--device", "cpu", "-j", "0", "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["count"] == 6
    # so do the resolution sweep and the relative mCE's clean error without a split named (both looked for val/
    # and stopped: "split 'val' not found")
    assert main(["resolution-sweep", str(only_train), "--checkpoint", str(tmp_path / "t" / "last.pth.tar"),
                 "--sizes", "16", "-j", "0", "--device", "cpu", "-o", str(tmp_path / "sweep")]) == 0
    row = (tmp_path / "sweep" / "resolution.csv").read_text().splitlines()[1].split(",")
    assert int(row[-1]) == 6 and abs(float(row[1]) - got["top1"]) < 1e-3
    from sequencer.engine.inference import load_model
    from sequencer.tools.robustness import mean_corruption_error
    loaded = load_model(checkpoint=str(tmp_path / "t" / "last.pth.tar"), device="cpu")
    corrupted = tmp_path / "corrupted" / "fog" / "3"
    corrupted.parent.mkdir(parents=True)
    corrupted.symlink_to(data / "val", target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one severity of five: not comparable, as it warns
        summary = mean_corruption_error(loaded, {"fog": corrupted.parent}, clean=str(only_train))
    assert abs(100 * (1 - summary["clean_error"]) - got["top1"]) < 1e-3
    onnx = tmp_path / "t.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "t" / "last.pth.tar"), "-o", str(onnx)]) == 0
    for data_arg in ([str(only_train / "train")], [str(only_train)], []):
        assert main(["validate", *data_arg, "--onnx", str(onnx), "-j", "0", "--results-file", str(results)]) == 0
        from_onnx = json.loads(results.read_text())
        assert from_onnx["count"] == 6 and abs(from_onnx["top1"] - got["top1"]) < 1e-3
    # export --verify scores its top-1 on the same 6 held-out files, DATA or train/ given (it scored all 24, 18 of
    # them training images); the agreement is over all 24
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "t" / "last.pth.tar"), "-o", str(tmp_path / "t8.onnx"),
                 "--quantize", "int8", "--verify", str(only_train)]) == 0
    assert "of 24 images (top-1 on 6 of them: fp32 " in capsys.readouterr().out
    from sequencer.tools.export import top1_agreement
    verified = top1_agreement(onnx, onnx, str(only_train / "train"))
    assert verified["count"] == 24 and verified["scored"] == 6
    assert abs(100 * verified["fp32_top1"] - got["top1"]) < 1e-3
    # a run's DATA with split folders: its top-1 is on the 6 images of the split it evaluated on (it scored
    # train/'s 24 besides them)
    import onnx as onnx_package
    proto = onnx_package.load(str(onnx))
    onnx_package.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                "data": json.dumps({"dataset": "", "root": str(data), "split": "val"})})
    onnx_package.save(proto, str(tmp_path / "plain_run.onnx"))
    verified = top1_agreement(tmp_path / "plain_run.onnx", tmp_path / "plain_run.onnx", str(data))
    assert verified["count"] == 30 and verified["scored"] == 6
    # nor the images of a class its class map left out, as validate (it gave no top-1 at all, and no word why)
    onnx_package.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                "ignored_classes": json.dumps(["bird"])})
    onnx_package.save(proto, str(tmp_path / "plain_run.onnx"))
    verified = top1_agreement(tmp_path / "plain_run.onnx", tmp_path / "plain_run.onnx", str(data))
    assert verified["count"] == 30 and verified["scored"] == 4


def test_a_torchvision_dataset_at_a_carved_runs_folder_is_read_as_itself(tmp_path, monkeypatch):
    """validate DATA --dataset torch/cifar10, DATA also the image-folder DATA a --val-fraction run carved its
    held-out files from (train/): the CIFAR split evaluated is its validation one (its 12 test images). The carved
    run's "train" was taken for it, and CIFAR's 24 training images were scored as held-out ones."""
    import os

    import torchvision.datasets.cifar as cifar
    from cifar_files import write_cifar10

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    root = write_cifar10(tmp_path / "data", n_train=24, n_test=12)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    model = sequencer.create_model("sequencer2d_nano", num_classes=10, **TINY_KW["model_kwargs"])
    carved = {"dataset": "", "root": str(root), "split": "train", "files": ["cat/1.png"],
              "files_in": str(root / "train")}
    torch.save({"version": 1, "arch": model.model_name, "model_kwargs": model.model_kwargs, "class_names": names,
                "data_config": {"img_size": 16}, "data": carved, "state_dict": model.state_dict()},
               tmp_path / "c.pth.tar")
    results = tmp_path / "r.json"
    assert main(["validate", str(root), "--dataset", "torch/cifar10", "--checkpoint", str(tmp_path / "c.pth.tar"),
                 "-j", "0", "--device", "cpu", "--results-file", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["count"] == 12 and got["dataset"] == "torch/cifar10[validation]"


def test_held_out_files_moved_away_are_said_not_scored_as_zero(tmp_path, capsys):
    """A --val-fraction run's held-out images since moved or renamed: validate said 'Acc@1 0.000' on 0 images (exit
    0) where none is left; now one line says so. Where some are gone, a warning says how many, and the top-1 is on
    the rest."""
    only_train = make_image_folder(tmp_path / "data", {"cat": (30, 200, 30), "dog": (30, 30, 200)}, 3, 0)
    model = sequencer.create_model("sequencer2d_nano", num_classes=2, **TINY_KW["model_kwargs"])
    record = {"dataset": "", "root": str(only_train), "split": "train", "files_in": str(only_train / "train")}
    checkpoint = tmp_path / "c.pth.tar"
    for files, rc in ((["cat/0.png", "dog/0.png", "dog/gone.png"], 0), (["cat/gone.png"], 2)):
        torch.save({"version": 1, "arch": model.model_name, "model_kwargs": model.model_kwargs,
                    "class_names": ["cat", "dog"], "data_config": {"img_size": 16}, "data": dict(record, files=files),
                    "state_dict": model.state_dict()}, checkpoint)
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["validate", "--checkpoint", str(checkpoint), "-j", "0", "--device", "cpu",
                         "--results-file", str(tmp_path / "r.json")]) == rc
        said = capsys.readouterr().err + "".join(str(w.message) for w in caught)
        if rc == 0:
            assert json.loads((tmp_path / "r.json").read_text())["count"] == 2
            assert "1 of the 3 images the checkpoint's run held out of" in said and "on the 2 left" in said
        else:
            assert "none of the 1 images the checkpoint's run held out of" in said and "is there any more" in said


def test_validate_on_a_runs_own_data_evaluates_the_split_it_evaluated_on(data, tmp_path, capsys):
    """A run of `--val-split test` on DATA with train/, val/ and test/: `validate DATA --checkpoint` (DATA by another
    path too) evaluates test/, reproducing the logged top-1 (it evaluated val/'s 6 images, not test/'s 3); an
    explicit --split wins; a copy of DATA evaluates its val/ with a note naming the run's split (it said nothing);
    --split train (by any name) or DATA/train warns that these are the run's training images (it said nothing),
    from an older checkpoint's `args` too, and nothing where nothing records the training split."""
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "val"):
        (root / split).symlink_to(data / split, target_is_directory=True)
    (root / "test").symlink_to(make_image_folder(tmp_path / "other", COLOURS, 0, 1, size=16, seed=1) / "val",
                               target_is_directory=True)
    rc, _, err = _run(capsys, root, *TINY_RUN, "--epochs", "1", "--val-split", "test", "--output", tmp_path,
                      "--experiment", "t")
    assert rc == 0, err
    checkpoint = tmp_path / "t" / "last.pth.tar"
    logged = float(summary_rows(tmp_path / "t")[-1]["eval_top1"])
    results = tmp_path / "r.json"

    def validate(*args) -> tuple[dict, str]:
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["validate", *map(str, args), "-j", "0", "--device", "cpu", "--results-file",
                         str(results)]) == 0
        return json.loads(results.read_text()), "".join(f"{w.message}\n" for w in caught)

    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    for spelling in (root, link, f"{tmp_path}/./data/"):
        got, warned = validate(spelling, "--checkpoint", checkpoint)
        assert got["count"] == 3 and abs(got["top1"] - logged) < 1e-3 and not warned
    got, warned = validate(root, "--checkpoint", checkpoint, "--split", "val")
    assert got["count"] == 6 and not warned
    # a copy of DATA is not the run's: its val/, with a note naming the split the run evaluated on (it said nothing)
    copy = tmp_path / "copy"
    copy.mkdir()
    for split in ("train", "val", "test"):
        (copy / split).symlink_to(root / split, target_is_directory=True)
    got, _ = validate(copy, "--checkpoint", checkpoint)
    assert got["count"] == 6 and f"note: the checkpoint's run evaluated on split 'test' of {root}, not {copy}: " \
        "evaluating its 'validation' (--split test for that split of it)" in "".join(capsys.readouterr())
    for split in ("train", "Training"):
        got, warned = validate(root, "--checkpoint", checkpoint, "--split", split)
        assert got["count"] == 24 and "is the split the checkpoint's run trained on: these are its training images" \
            in warned
    got, warned = validate("--checkpoint", checkpoint, "--split", "train")
    assert got["count"] == 24 and "its training images" in warned
    # its training split's folder given as DATA (it said nothing); another split's says nothing
    got, warned = validate(link / "train", "--checkpoint", checkpoint)
    assert got["count"] == 24 and f"{link / 'train'} is the split the checkpoint's run trained on" in warned
    got, warned = validate(root / "val", "--checkpoint", checkpoint)
    assert got["count"] == 6 and not warned
    # an older checkpoint: no `train_split` in its `data` entry, the one its `args` record; none at all: no word
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["data"]["train_split"]
    torch.save(ckpt, tmp_path / "older.pth.tar")
    assert "its training images" in validate(root, "--checkpoint", tmp_path / "older.pth.tar", "--split", "train")[1]
    del ckpt["args"]
    torch.save(ckpt, tmp_path / "bare.pth.tar")
    got, warned = validate(root, "--checkpoint", tmp_path / "bare.pth.tar", "--split", "train")
    assert got["count"] == 24 and not warned
    got, _ = validate(root, "--checkpoint", tmp_path / "bare.pth.tar")
    assert got["count"] == 3
    # the sweep picks the same split
    assert main(["resolution-sweep", str(link), "--checkpoint", str(checkpoint), "--sizes", "16", "-j", "0",
                 "--device", "cpu", "-o", str(tmp_path / "sweep")]) == 0
    row = (tmp_path / "sweep" / "resolution.csv").read_text().splitlines()[1].split(",")
    assert int(row[-1]) == 3 and abs(float(row[1]) - logged) < 1e-3


def test_validate_warns_of_the_digits_training_split(tmp_path, caplog):
    """A digits run validated on --dataset digits --split train warns that these are its training images (it said
    nothing: the digits were read before the checkpoint that says so); its validation split says nothing."""
    result = sequencer.train(progress=False, output=str(tmp_path), experiment="d", epochs=1, **TINY_KW)
    for split, count, warned in (("train", 1437, True), (None, 360, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sequencer"):
            got = sequencer.validate(result.checkpoint, dataset="digits", split=split, workers=0, progress=False)
        assert got.images == count
        said = [r.getMessage() for r in caplog.records if "training images" in r.getMessage()]
        assert said == (["split 'train' of digits is the split the checkpoint's run trained on: these are its "
                         "training images, not held-out ones"] if warned else []), said


def test_training_on_the_split_a_named_dataset_evaluates_is_said(capsys, tmp_path, monkeypatch):
    """--train-split test on torch/cifar10 (whose validation split is its test set; or --train-split val on the
    digits) trained on the 8 test images it then evaluated as held-out, with no word: a folder's splits sharing
    files are warned about. Now the same warning names what both read."""
    import torchvision.datasets.cifar as cifar
    from cifar_files import write_cifar10

    from sequencer.data import create_dataset
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # hand-written files
    root = write_cifar10(tmp_path / "cifar")
    train, val = (create_dataset("torch/cifar10", root=str(root), split=s) for s in ("train", "validation"))
    assert train.real_dirs and not train.real_dirs & val.real_dirs  # the usual run shares nothing
    rc, out, err = _run(capsys, root, "--dataset", "torch/cifar10", "--train-split", "test", *TINY_RUN,
                        "--epochs", "1", "-b", "4", "--output", tmp_path / "out")
    assert rc == 0, err
    assert (f"the training split and split 'validation' share files (both read {os.path.realpath(root)} (CIFAR10 "
            f"train=False)): its top-1 is not held-out") in err
