"""Fine-tuning from a checkpoint with class names: the classifier's rows follow the names (issue 27, item 4)."""
from __future__ import annotations

import torch
from run_helpers import TINY_RUN, summary_rows, train_cli


def _head(path):
    state = torch.load(path, weights_only=True)["state_dict"]
    return state["head.fc.weight"], state["head.fc.bias"]


def test_initial_checkpoint_rows_follow_a_reordered_class_map(image_folder, tmp_path, capsys):
    """`--initial-checkpoint` of a (blue, green, red) run with a --class-map listing red, green, blue at lr 1e-9:
    each class keeps its own row, so the run scores what the checkpoint scored, with a WARNING saying so."""
    first = [image_folder, *TINY_RUN, "--epochs", "1", "--output", tmp_path, "--experiment", "a"]
    assert train_cli(first) == 0
    source = tmp_path / "a" / "last.pth.tar"
    (tmp_path / "map.txt").write_text("red\ngreen\nblue\n")
    again = [image_folder, *TINY_RUN, "--epochs", "1", "--lr", "1e-9", "--weight-decay", "0", "-j", "2",
             "--initial-checkpoint", source, "--class-map", tmp_path / "map.txt", "--output", tmp_path,
             "--experiment", "b"]
    capsys.readouterr()
    assert train_cli(again) == 0  # the CLI shows the WARNING on stderr (its logger does not propagate to caplog's)
    assert "the classifier's rows follow the class names: 2 row(s) reordered" in capsys.readouterr().err

    weight, bias = _head(source)  # rows in folder order: blue, green, red
    tuned_weight, tuned_bias = _head(tmp_path / "b" / "last.pth.tar")  # rows in map order: red, green, blue
    torch.testing.assert_close(tuned_weight, weight[[2, 1, 0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(tuned_bias, bias[[2, 1, 0]], atol=1e-6, rtol=0)
    assert summary_rows(tmp_path / "b")[0]["eval_top1"] == summary_rows(tmp_path / "a")[0]["eval_top1"]


def test_rows_of_classes_the_run_lacks_are_dropped_with_a_warning(image_folder, tmp_path, capsys):
    """A (blue, green, red) checkpoint fine-tuned on a map of (green, purple): green keeps its row, purple starts
    fresh (the model's zero row), blue and red are dropped, and the warning names them."""
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--output", tmp_path, "--experiment", "a"]) == 0
    source = tmp_path / "a" / "last.pth.tar"
    (tmp_path / "map.txt").write_text("green\npurple\n")
    again = [image_folder, *TINY_RUN, "--epochs", "1", "--lr", "1e-9", "--weight-decay", "0",
             "--initial-checkpoint", source, "--class-map", tmp_path / "map.txt", "--output", tmp_path,
             "--experiment", "b"]
    capsys.readouterr()
    assert train_cli(again) == 0
    err = capsys.readouterr().err
    assert "dropped the rows of blue, red" in err and "purple start(s) from a fresh row" in err
    weight, _ = _head(source)
    tuned_weight, _ = _head(tmp_path / "b" / "last.pth.tar")
    torch.testing.assert_close(tuned_weight[0], weight[1], atol=1e-6, rtol=0)
    assert tuned_weight[1].abs().max() < 1e-6  # purple: fresh, zero-initialised


def test_checkpoint_of_another_width_is_a_mismatch_error_not_a_crash():
    """`--initial-checkpoint` of a nano run with `--model` of another width and the same class names: the rows are
    not moved (their width differs), and loading names the mismatch (it was a RuntimeError copying a row)."""
    import pytest

    import sequencer
    from sequencer import SequencerError
    from sequencer.engine.head_by_name import head_rows_by_name
    from sequencer.models.loading import load_state_dict_into
    names = ["cat", "dog"]
    state = sequencer.create_model("sequencer2d_nano", num_classes=2).state_dict()
    wider = sequencer.create_model("sequencer2d_nano", num_classes=2, embed_dims=(96, 160, 160))
    moved = head_rows_by_name(state, names, names[::-1], wider, "`initial_checkpoint='a'`")
    assert moved["head.fc.weight"] is state["head.fc.weight"]
    with pytest.raises(SequencerError, match=r"`initial_checkpoint='a'` does not fit model .*shape mismatch"):
        load_state_dict_into(wider, moved, source="`initial_checkpoint='a'`")


def test_a_segmentation_checkpoint_as_initial_checkpoint_is_named_as_such(image_folder, tmp_path, capsys):
    """It said the file "does not fit model 'sequencer2d_s'" (the default model) with a list of missing keys."""
    torch.save({"version": 1, "segmenter": {"backbone": "sequencer2d_nano", "head": "fpn"}, "state_dict": {}},
               tmp_path / "seg.pth.tar")
    capsys.readouterr()
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "1", "--initial-checkpoint", tmp_path / "seg.pth.tar",
                      "--output", tmp_path / "runs", "--experiment", "c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--initial-checkpoint" in err[0] and "is a segmentation model" in err[0], err
    assert not (tmp_path / "runs" / "c").exists()


def test_a_segmentation_run_resumed_by_train_is_named_as_such(image_folder, tmp_path, capsys):
    """`--resume auto` in a `segment train` experiment folder refused its last.pth.tar for its classes (the
    checkpoint's 3 vs the split's) or, with as many classes, with a page of the weights' missing keys."""
    folder = tmp_path / "runs" / "seg"
    folder.mkdir(parents=True)
    torch.save({"version": 1, "segmenter": {"backbone": "sequencer2d_nano", "head": "fpn"}, "state_dict": {},
                "epoch": 0, "class_names": ["a", "b"]}, folder / "last.pth.tar")
    capsys.readouterr()
    assert train_cli([image_folder, *TINY_RUN, "--epochs", "2", "--resume", "auto", "--output", tmp_path / "runs",
                      "--experiment", "seg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sequencer train: error: --resume {folder / 'last.pth.tar'} is a segmentation model (written by "
                   f"`sequencer segment train`), not a classifier (hint: resume it with `sequencer segment train` "
                   f"(train_segmenter))"], err
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth.tar"]
