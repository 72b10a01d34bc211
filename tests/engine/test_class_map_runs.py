"""Issue 19 item 6: a --class-map run is validated without the map and gives training's numbers; quiet class
mistakes (a map naming a class with no folder, --num-classes above the folder count, one class) are said."""
from __future__ import annotations

import json

import pytest
import torch

from run_helpers import make_image_folder, TINY_RUN, summary_rows, train_cli
from sequencer.cli import main


@pytest.mark.slow
def test_class_map_run_validates_without_the_map(image_folder, tmp_path, capsys):
    """In this process (a `sequencer` subprocess per command took 9 s of CPU, mostly imports)."""
    (tmp_path / "map.txt").write_text("red\nblue\n")  # green is left out
    out = tmp_path / "out"
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--class-map", tmp_path / "map.txt",
                      "--output", out, "--experiment", "m"]) == 0
    ckpt = torch.load(out / "m" / "last.pth.tar", weights_only=True)
    assert ckpt["class_names"] == ["red", "blue"] and ckpt["ignored_classes"] == ["green"]
    capsys.readouterr()
    assert main(["validate", str(image_folder), "--checkpoint", str(out / "m" / "last.pth.tar"), "--device", "cpu",
                 "-j", "0", "--results-file", str(tmp_path / "r.json")]) == 0
    assert "leaving out 6 image(s) of green" in capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["count"] == 12  # red and blue val images, as training evaluated
    assert results["top1"] == pytest.approx(float(summary_rows(out / "m")[-1]["eval_top1"]), abs=1e-3)


def test_class_map_naming_a_class_without_a_folder_warns(image_folder, tmp_path):
    (tmp_path / "map.txt").write_text("red\ngreen\nblue\npurple\n")
    with pytest.warns(UserWarning, match=r"no images of 1 class\(es\) the class map names \(purple\)"):
        assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--class-map", tmp_path / "map.txt",
                          "--output", tmp_path / "out", "--experiment", "p"]) == 0


def test_num_classes_above_the_folder_count_warns(image_folder, tmp_path):
    with pytest.warns(UserWarning, match=r"`num_classes=5` is larger than the 3 classes.*outputs 3\.\.4 never"):
        assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--num-classes", "5",
                          "--output", tmp_path / "out", "--experiment", "n"]) == 0


def test_single_class_training_set_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "one", {"cat": (200, 30, 30)}, 4, 2)
    capsys.readouterr()
    assert train_cli([data, *TINY_RUN, "--epochs", "1", "--output", tmp_path / "out"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "has a single class" in err[0], err
    assert not (tmp_path / "out").exists()


def test_top5_as_the_best_metric_of_a_five_class_head_is_refused(image_folder, tmp_path, capsys):
    """The top 5 of 3 (or 5) classes hold every class: every epoch scored 100, so model_best stayed epoch 0 (and a
    plateau schedule decayed). Refused before anything is written; a larger head's top-5 means something."""
    capsys.readouterr()
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--eval-metric", "top5",
                      "--output", tmp_path / "out"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--eval-metric top5 with a 3-class head" in err[0], err
    assert "use --eval-metric top1 or --eval-metric loss" in err[0] and not (tmp_path / "out").exists()
    from types import SimpleNamespace

    from sequencer.engine.config import TrainConfig
    from sequencer.engine.train_model import _check_top5_metric
    top5, state = TrainConfig(eval_metric="top5"), SimpleNamespace(start_warnings=[])
    six_outputs = SimpleNamespace(num_classes=6)  # e.g. the caller's module with a larger head: its top 5 can miss
    _check_top5_metric(top5, state, six_outputs, SimpleNamespace(num_classes=3, resume_ckpt=None))
    # an older run of that kind keeps its metric on a resume (a new one is refused): it goes on, with a warning
    _check_top5_metric(top5, state, SimpleNamespace(num_classes=3), SimpleNamespace(num_classes=3, resume_ckpt={}))
    assert state.start_warnings == ["`eval_metric=top5` with a 3-class head: its top 5 hold every class, so every "
                                    "epoch scores 100% and the best checkpoint stays the first epoch"]


def test_a_class_map_of_one_class_is_refused_naming_the_map(image_folder, tmp_path, capsys):
    """The map, not DATA, made the run single-class: the hint says so (it said to point DATA elsewhere)."""
    (tmp_path / "map.txt").write_text("red\n")
    capsys.readouterr()
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--class-map", tmp_path / "map.txt",
                      "--output", tmp_path / "out"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "has a single class (red)" in err[-1] and "list two or more of its classes in --class-map" in err[-1]
    assert not (tmp_path / "out").exists()
