"""Messages that said something untrue (issue 27, "Confusing messages"): each is checked as the user meets it."""
from __future__ import annotations

from run_helpers import TINY_RUN, make_image_folder, train_cli

from sequencer.cli import main


def test_validate_fast_with_onnx_names_only_what_was_given(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"not read: the flags are refused first")
    assert main(["validate", str(tmp_path), "--onnx", str(tmp_path / "m.onnx"), "--fast"]) == 2
    err = capsys.readouterr().err
    assert "--fast does not apply to --onnx" in err and "--amp" not in err


def test_train_resume_of_an_onnx_file_does_not_hint_a_flag_train_lacks(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"an export")
    assert train_cli(["--resume", tmp_path / "m.onnx", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX export, not a checkpoint" in err and "pass the .pth.tar / .safetensors it came from" in err
    assert "pass it as --onnx" not in err and len(err.strip().splitlines()) == 1


def test_resuming_a_finished_run_says_what_it_ran(tmp_path, capsys):
    """A 2-epoch run resumed with --epochs 1: "it ran 2 epochs and this schedule has 1 epoch" (before: "the run
    already finished its 1 epochs"). Its last line gave a best loss (--eval-metric loss) to 2 decimals: 0.004 read
    0.00; now to the epoch lines' 4."""
    import re

    from run_helpers import summary_rows

    data = make_image_folder(tmp_path / "data", {"a": (200, 30, 30), "b": (30, 30, 200)}, 4, 2, size=16)
    run = [data, *TINY_RUN, "-b", "4", "--output", tmp_path / "runs", "--experiment", "e", "--eval-metric", "loss"]
    assert train_cli([*run, "--epochs", "2"]) == 0
    best = re.search(r"best loss (\S+) at epoch (\d)", capsys.readouterr().out)
    lowest = min(summary_rows(tmp_path / "runs" / "e"), key=lambda r: float(r["eval_loss"]))
    assert best.groups() == (f"{float(lowest['eval_loss']):.4f}", lowest["epoch"])
    assert train_cli([*run, "--epochs", "1", "--resume", tmp_path / "runs" / "e" / "last.pth.tar"]) == 0
    out = capsys.readouterr().out
    assert "the run already finished: it ran 2 epochs and this schedule has 1 epoch; nothing to do" in out
