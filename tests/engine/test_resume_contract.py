"""The resume contract and split labelling of `sequencer train` (issue 13, items 1-4 and 8).

One short run on a folder with train/ (3 classes) and test/ (lacking "green") feeds every test; each later start
either fails before training (checked to write nothing) or runs one or two more epochs.
"""
from __future__ import annotations

import csv
import math
import shutil
import warnings

import pytest
import yaml

import sequencer
from run_helpers import TINY_RUN, make_image_folder, summary_rows, train_cli
from sequencer.models.loading import read_checkpoint

pytestmark = pytest.mark.slow  # a few short training runs: about 45 s on 2 busy cores

RUN = TINY_RUN  # adamw, lr 3e-3, no warmup, cosine per epoch
LR = 3e-3
TEST = ["--val-split", "test"]  # explicit, so that these tests also ran against the code before the fix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/{blue,green,red} and test/{blue,red}: the held-out split lacks one training class."""
    root = make_image_folder(tmp_path_factory.mktemp("cifarish"),
                             {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}, 8, 4)
    (root / "val").rename(root / "test")
    shutil.rmtree(root / "test" / "green")
    return root


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-epoch run (output, folder, its stdout)."""
    out = tmp_path_factory.mktemp("runs")
    assert train_cli([data, *RUN, "--epochs", "2", "--val-split", "test", "--output", out, "--experiment", "x"]) == 0
    return out, out / "x"


def _copy_run(finished, tmp_path):
    out, folder = finished
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    return copy, copy / folder.name


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_train_test_folder_needs_no_split_flag(data, tmp_path):
    """Docs item 12: with only train/ and test/, test/ is the held-out split of train and validate."""
    from sequencer.data.datasets import held_out_split
    assert held_out_split(str(data), "validation") == "test"
    assert held_out_split(str(data), "train") == "train"
    (tmp_path / "val").mkdir()
    (tmp_path / "test").mkdir()
    assert held_out_split(str(tmp_path), "validation") == "validation"


def test_held_out_labels_come_from_the_training_classes(finished, data, capsys, tmp_path):
    """Item 2: "green" missing from test/ is reported, and the logged top-1 is validate's on the same checkpoint
    (before, test/'s own indices shifted "red" onto "green"). validate finds test/ without --split."""
    out, folder = finished
    rows = summary_rows(folder)
    from sequencer.cli import main
    results = tmp_path / "r.json"
    capsys.readouterr()
    assert main(["validate", str(data), "--checkpoint", str(folder / "last.pth.tar"), "-j", "0",
                 "--device", "cpu", "--results-file", str(results)]) == 0
    assert "green" in capsys.readouterr().out  # the missing class is reported
    import json
    top1 = json.loads(results.read_text())["top1"]
    assert float(rows[-1]["eval_top1"]) == pytest.approx(top1, abs=1e-2)
    assert read_checkpoint(folder / "last.pth.tar")["class_names"] == ["blue", "green", "red"]


def test_extending_a_finished_run_rebuilds_the_schedule(finished, data, tmp_path, capsys):
    """Item 1: `--epochs 4 --resume auto` after 2 continues on the 4-epoch cosine (lr 0 before)."""
    out, folder = _copy_run(finished, tmp_path)
    capsys.readouterr()
    assert train_cli([data, *TEST, *RUN, "--epochs", "4", "--output", out, "--experiment", "x", "--resume",
                      "auto"]) == 0
    banner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train:"))
    half = LR * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert f"lr {half:.3g}," in banner  # the lr epoch 2 really runs at, not --lr
    rows = summary_rows(folder)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # every epoch once
    lrs = [float(r["lr"]) for r in rows]
    assert all(lr > 0 for lr in lrs)
    assert lrs[2] == pytest.approx(half, rel=1e-4)
    assert lrs[3] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-4)
    assert yaml.safe_load((folder / "args.yaml").read_text())["epochs"] == 4


def test_a_resume_takes_unspecified_settings_from_the_checkpoint(finished, data, tmp_path, capsys):
    """Item 3: without --opt (default sgd) the run's adamw is kept (was KeyError: 'momentum' as a traceback).
    Item 4: `--resume RUN/recovery.pth.tar` without --experiment continues in the run's own folder, also when the
    run has no summary.csv yet (a stop in its first epoch); it went to a new folder named after sequencer2d_s. The
    `--output` it does not use is said (it went unused in silence)."""
    out, folder = _copy_run(finished, tmp_path)
    (folder / "summary.csv").unlink()
    (folder / "last.pth.tar").rename(folder / "recovery.pth.tar")
    with pytest.warns(UserWarning, match="`output=.*elsewhere` is not where a resume without `experiment` writes"):
        assert train_cli([data, *TEST, "--resume", folder / "recovery.pth.tar", "--epochs", "3", "-j", "0",
                          "--device", "cpu", "--output", tmp_path / "elsewhere"]) == 0
    # the rows of epochs 0-1 come back from the checkpoint (issue 19 item 5), epoch 2 is the resumed one
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0, 1, 2]
    assert not (tmp_path / "elsewhere").exists() and sorted(p.name for p in out.iterdir()) == ["x"]
    args = yaml.safe_load((folder / "args.yaml").read_text())
    assert args["opt"] == "adamw" and args["model_kwargs"]["embed_dims"] == [16, 16] and args["epochs"] == 3


@pytest.mark.parametrize("flags, culprit", [
    (["--opt", "sgd"], "--opt sgd vs the checkpoint's adamw"),
    (["--sched", "step"], "--sched step vs the checkpoint's cosine"),
    (["--num-classes", "5"], "--num-classes 5 vs the checkpoint's 3-class head"),
    (["--eval-metric", "loss"], "--eval-metric loss vs the checkpoint's top1"),
])
def test_a_conflicting_flag_is_refused_before_anything_is_written(finished, data, tmp_path, capsys, flags, culprit):
    out, folder = _copy_run(finished, tmp_path)
    before = _snapshot(folder)
    capsys.readouterr()
    assert train_cli([data, *TEST, *RUN, "--epochs", "4", "--output", out, "--experiment", "x", "--resume", "auto",
                      *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0], err
    assert _snapshot(folder) == before  # args.yaml and summary.csv untouched


def test_a_checkpoint_of_other_classes_is_refused(finished, tmp_path, capsys):
    """Item 3: a 3-class checkpoint resumed onto 2-class data (silently before)."""
    other = make_image_folder(tmp_path / "other", {"dark": (40, 40, 40), "light": (220, 220, 220)}, 8, 2)
    out, folder = _copy_run(finished, tmp_path)
    before = _snapshot(folder)
    assert train_cli([other, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device",
                      "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 classes (blue, green, red) vs the training split's 2 (dark, light)" in err[0]
    assert _snapshot(folder) == before


def test_a_resume_into_a_new_experiment_keeps_its_own_best(finished, data, tmp_path, capsys):
    """Item 4: the old run's best metric used to carry over, so model_best was never written in the new folder."""
    out, folder = _copy_run(finished, tmp_path)
    assert train_cli([data, *TEST, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device", "cpu",
                      "--output", out, "--experiment", "y"]) == 0
    new = out / "y"
    assert (new / "model_best.pth.tar").is_file()
    assert read_checkpoint(new / "model_best.pth.tar")["epoch"] == 2
    assert "at epoch 2" in capsys.readouterr().out.strip().splitlines()[-1]


def test_an_unknown_held_out_class_fails_before_training(data, tmp_path, capsys):
    """Item 2: a test/ class that training lacks was an IndexError after a full epoch."""
    root = tmp_path / "d"
    shutil.copytree(data, root)
    shutil.copytree(root / "test" / "red", root / "test" / "purple")
    out = tmp_path / "out"
    assert train_cli([root, *RUN, "--epochs", "1", "--val-split", "test", "--output", out, "--experiment", "z"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "purple" in err[0]
    assert not out.exists()


def test_a_crashed_resume_leaves_no_header_only_summary(finished, data, tmp_path, monkeypatch, capsys):
    """Item 8: a resume into a new folder that crashed in its first epoch left a header-only summary.csv, and the
    name was then refused."""
    out, folder = _copy_run(finished, tmp_path)
    import sequencer.engine.evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(evaluate_module, "evaluate", broken)
    with pytest.raises(RuntimeError):
        train_cli([data, *TEST, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device", "cpu",
                   "--output", out, "--experiment", "crashed"])
    assert not (out / "crashed" / "summary.csv").exists()
    monkeypatch.undo()
    capsys.readouterr()
    # the name is free for a new run: it gets past the "already holds a run" check and fails on the next problem
    assert train_cli([data, *TEST, *RUN, "--epochs", "1", "--output", out, "--experiment", "crashed", "--img-size",
                      "15"]) == 2
    assert "already holds a run" not in capsys.readouterr().err


def test_log_lines_count_readable_images_and_keep_metrics_together(tmp_path, capsys):
    """Item 9: the final line counted 101 held-out images where 100 were readable, and the epoch line printed
    "top1 19.00 skipped 2 unreadable images top5 67.00"."""
    root = make_image_folder(tmp_path / "d", {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)},
                             34, 34, size=16)
    for split in ("train", "val"):
        (root / split / "red" / "zz_broken.png").write_bytes(b"not an image")  # 1 of 103: under the 1% limit
    assert train_cli([root, *RUN, "--epochs", "1", "-b", "16", "--output", tmp_path / "o", "--experiment", "e"]) == 0
    lines = capsys.readouterr().out.splitlines()
    epoch_line = next(line for line in lines if line.startswith("epoch 0:"))
    assert " top5 " in epoch_line.split(" top1 ")[1].split("skipped")[0]  # no note between top1 and top5
    assert epoch_line.endswith("; skipped 1 unreadable training image")
    assert "on 102 held-out images (1 unreadable skipped)" in lines[-1]


@pytest.mark.parametrize("flags", [["--img-size", "32"], ["--input-size", "3", "32", "32"]])
def test_a_new_image_size_on_resume_is_the_models_too(finished, data, tmp_path, flags):
    """A resume at another size trains at it and records one size: the model used to keep the checkpoint's
    model_kwargs (16 px) while the loaders ran at 32 px, and `--input-size` was silently dropped (16 px)."""
    out, folder = _copy_run(finished, tmp_path)
    assert train_cli([data, *TEST, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device", "cpu",
                      *flags]) == 0
    resumed = read_checkpoint(folder / "last.pth.tar")
    assert resumed["epoch"] == 2
    assert (resumed["model_kwargs"]["img_size"], resumed["data_config"]["img_size"], resumed["args"]["img_size"]) == \
        (32, 32, 32)


def test_a_resume_evaluates_on_the_split_its_run_did(finished, data, tmp_path):
    """A run evaluated on test/ (`--val-split test`) and resumed without the flag on DATA that also has val/ used to
    go on evaluating on val/, its best epoch still test/'s; the split names are kept like the other settings, and
    the best goes on from the checkpoint's (nothing is said about the evaluation)."""
    from sequencer.engine.checkpoint import atomic_save
    out, folder = _copy_run(finished, tmp_path)
    root = tmp_path / "data"
    shutil.copytree(data, root)
    shutil.copytree(root / "test", root / "val")
    checkpoint = read_checkpoint(folder / "last.pth.tar")
    atomic_save(dict(checkpoint, best_metric=100.0), folder / "last.pth.tar")  # a best no resumed epoch beats
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_cli([root, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device",
                          "cpu"]) == 0
    assert not [w for w in caught if "were evaluated on" in str(w.message)]
    resumed = read_checkpoint(folder / "last.pth.tar")
    assert resumed["args"]["val_split"] == "test" and resumed["data"]["split"] == "test"
    assert resumed["best_epoch"] == checkpoint["best_epoch"] < 2  # compared with the checkpoint's best, not restarted


def _as_if_started_with_ema_and_amp(folder):
    """The copied run's checkpoint made one of `--model-ema --amp`, whose best no later epoch reaches (top-1 100), so
    that only a restarted best can pick a resumed epoch."""
    from sequencer.engine.checkpoint import atomic_save
    checkpoint = read_checkpoint(folder / "last.pth.tar")
    checkpoint["args"].update(model_ema=True, amp=True, amp_dtype="bfloat16")
    checkpoint.update(evaluated_weights="ema", state_dict_ema=checkpoint["state_dict"], best_metric=100.0)
    atomic_save(checkpoint, folder / "last.pth.tar")
    return checkpoint["best_epoch"]


@pytest.mark.parametrize("flags, before, now", [
    (["--no-model-ema", "--no-amp"], "the EMA weights on split 'test'", "the raw model weights on split 'test'"),
    (["--val-split", "val"], "the EMA weights on split 'test'", "the EMA weights on split 'val'"),
])
def test_a_resume_evaluating_otherwise_picks_its_best_again(finished, data, tmp_path, flags, before, now):
    """`--no-model-ema` and `--no-amp` turn off what the run had on (a `store_true` flag could not), and the resume
    trains without EMA, in float32. Metrics of other weights (`--no-model-ema`) or of another split (`--val-split`)
    do not compare with the checkpoint's best: one line says what was evaluated before and now, the best is picked
    again from the resumed epoch, and the earlier best's checkpoint stays (made from model_best when the history had
    not kept it). A finished run resumed reports that best, not the row with the highest top-1."""
    out, folder = _copy_run(finished, tmp_path)
    root = tmp_path / "data"
    shutil.copytree(data, root)
    shutil.copytree(root / "test", root / "val")
    earlier = _as_if_started_with_ema_and_amp(folder)
    (folder / f"checkpoint-{earlier}.pth.tar").unlink()  # as with `--checkpoint-hist 0`
    said = rf"epochs 0\.\.1 were evaluated on {before}, this run evaluates {now}: .* starts again at epoch 2; " \
           rf"the earlier best, top1 100\.00 at epoch {earlier}, stays as checkpoint-{earlier}\.pth\.tar"
    with pytest.warns(UserWarning, match=said):
        assert train_cli([root, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device", "cpu",
                          *flags]) == 0
    resumed = read_checkpoint(folder / "last.pth.tar")
    assert (resumed["best_epoch"], read_checkpoint(folder / "model_best.pth.tar")["epoch"]) == (2, 2)
    assert read_checkpoint(folder / f"checkpoint-{earlier}.pth.tar")["epoch"] == earlier
    if "--no-model-ema" in flags:
        assert (resumed["args"]["model_ema"], resumed["args"]["amp"]) == (False, False)
        assert "state_dict_ema" not in resumed and resumed["evaluated_weights"] == "model"
        assert resumed["eval_amp_dtype"] is None  # no autocast: float32
        rows = summary_rows(folder)  # as if the earlier epochs' evaluation had been the easier one
        for row in rows[:2]:
            row["eval_top1"] = "100.0"
        with open(folder / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        result = sequencer.train(str(root), resume=str(folder / "last.pth.tar"), epochs=3, device="cpu", workers=0,
                                 progress=False)
        assert result.best_epoch == 2
    else:
        assert resumed["data"]["split"] == "val" and resumed["evaluated_weights"] == "ema"


def test_a_kept_setting_is_checked_with_the_flags_given(finished, data, tmp_path, capsys):
    """The checkpoint's `mixup` with a new odd `-b` is refused in one line before anything is written (it was
    checked before the checkpoint's settings were known: timm's assertion after the folder was claimed)."""
    from sequencer.engine.checkpoint import atomic_save
    out, folder = _copy_run(finished, tmp_path)
    checkpoint = read_checkpoint(folder / "last.pth.tar")
    checkpoint["args"]["mixup"] = 0.5  # as if the run had been started with `--mixup 0.5`
    atomic_save(checkpoint, folder / "last.pth.tar")
    before = _snapshot(folder)
    capsys.readouterr()
    assert train_cli([data, *TEST, "--resume", folder / "last.pth.tar", "--epochs", "3", "-j", "0", "--device", "cpu",
                      "-b", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 7: must be even with --mixup" in err[0], err
    assert _snapshot(folder) == before
