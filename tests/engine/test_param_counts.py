"""Parameter counts name the classifier head they include (issue 27): `sequencer models` and `benchmark` count
sequencer2d_nano with ImageNet's 1000-class head (0.71M), `train` with its data's (0.58M for 10 classes)."""
from __future__ import annotations

from run_helpers import make_image_folder, train_cli

from sequencer.cli import main


def test_models_benchmark_and_train_name_the_head_their_parameter_count_includes(tmp_path, capsys):
    assert main(["models", "sequencer2d_nano"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "params (M, 1000-class head)" in header and row.split()[:2] == ["sequencer2d_nano", "0.71"]

    assert main(["benchmark", "--model", "sequencer2d_nano", "-b", "2", "--img-size", "32", "--mode", "infer",
                 "--num-warmup", "0", "--num-iter", "1", "--memory-iter", "0", "--gemm-size", "64",
                 "--device", "cpu"]) == 0
    assert "params 0.71M with a 1000-class head" in capsys.readouterr().out

    data = make_image_folder(tmp_path / "data", {str(i): (25 * i, 40, 200 - 15 * i) for i in range(10)}, 1, 1,
                             size=16)
    assert train_cli([data, "--model", "sequencer2d_nano", "--img-size", "16", "--epochs", "1", "-b", "2",
                      "-j", "0", "--device", "cpu", "--output", tmp_path / "runs"]) == 0
    assert "sequencer2d_nano (0.58M params with a 10-class head)" in capsys.readouterr().out
