"""A checkpoint records the data it was trained on, and `validate` without DATA evaluates that data (issue 27,
item 3): never the digits for a folder model, a one-line error where the data is gone."""
from __future__ import annotations

import json

import torch
from run_helpers import TINY_RUN, make_image_folder, summary_rows, train_cli

import sequencer
from sequencer.cli import main

DIGIT_NAMED = {str(i): (25 * i, 255 - 25 * i, (97 * i) % 256) for i in range(10)}


def test_validate_without_data_uses_the_checkpoints_folder(tmp_path, capsys):
    """A 10-class folder model named 0..9 is evaluated on its own val split (as `train` logged it), by the CLI
    and by `sequencer.validate(ckpt)`, with the default data-loader workers; without the folder, one line."""
    data = make_image_folder(tmp_path / "data", DIGIT_NAMED, 2, 2, size=16)
    args = [data, *TINY_RUN, "--epochs", "1", "-b", "4", "-j", "2", "--output", tmp_path / "runs",
            "--experiment", "e"]
    assert train_cli(args) == 0
    folder = tmp_path / "runs" / "e"
    ckpt = folder / "model_best.pth.tar"
    record = torch.load(ckpt, weights_only=True)["data"]
    # val/ by the split rules
    assert record == {"dataset": "", "root": str(data), "split": "validation", "train_split": "train"}
    logged = float(summary_rows(folder)[-1]["eval_top1"])

    results = tmp_path / "r.json"
    assert main(["validate", "--checkpoint", str(ckpt), "--results-file", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["dataset"] != "digits/val" and got["count"] == 20
    assert abs(got["top1"] - logged) < 1e-3
    assert abs(sequencer.validate(ckpt, progress=False)["top1"] - logged) < 1e-3

    # a checkpoint from before the entry was recorded (its data only in its run's args): `checkpoint average`
    # keeps the record the args give, so its average too is evaluated on that data (it was refused: no record)
    older = {k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "data"}
    torch.save(older, tmp_path / "older.pth.tar")
    assert main(["checkpoint", "average", str(tmp_path / "older.pth.tar"), str(folder / "last.pth.tar"),
                 "-o", str(tmp_path / "avg.pth")]) == 0
    assert main(["validate", "--checkpoint", str(tmp_path / "avg.pth"), "--results-file", str(results)]) == 0
    assert abs(json.loads(results.read_text())["top1"] - logged) < 1e-3

    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"was trained on {data}, which no longer exists here: DATA is needed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
