"""`sequencer train`: short versions of the paper's three recipes, config replay, flag checks, the digits demo."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

from run_helpers import REPO, TINY_RUN, subprocess_env, summary_epochs, summary_rows, train_cli
from sequencer.models import create_model
from sequencer.models.loading import read_checkpoint

CONTRACT_KEYS = {"version", "arch", "model_kwargs", "class_names", "data_config", "state_dict", "optimizer",
                 "scheduler", "scaler", "epoch", "metric", "args", "rng_state"}


@pytest.fixture(scope="module")
def scratch_run(image_folder, tmp_path_factory):
    """Recipe 1 (from scratch) shrunk: every augmentation/regularisation flag of the paper's command."""
    out = tmp_path_factory.mktemp("scratch")
    rc = train_cli([image_folder, *TINY_RUN, "--output", out, "--experiment", "scratch",
                    "--opt", "adamw", "--epochs", "2", "--sched", "cosine", "--native-amp", "--drop-path", "0.1",
                    "--lr", "2e-3", "--weight-decay", "0.05", "--remode", "pixel", "--reprob", "0.25",
                    "--aa", "rand-m9-mstd0.5-inc1", "--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0",
                    "--warmup-lr", "1e-6", "--warmup-epochs", "1", "--model-ema", "--model-ema-decay", "0.9",
                    "--checkpoint-hist", "1"])
    assert rc == 0
    return out / "scratch"


def test_scratch_recipe_writes_timm_outputs(scratch_run, image_folder):
    folder = scratch_run
    for name in ("args.yaml", "summary.csv", "summary.png", "last.pth.tar", "model_best.pth.tar"):
        assert (folder / name).is_file(), name
    assert len(list(folder.glob("checkpoint-*.pth.tar"))) == 1  # --checkpoint-hist 1
    assert not list(folder.glob(".*tmp*"))
    rows = summary_rows(folder)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "epoch_seconds"]
    assert all(0 <= float(r["eval_top1"]) <= 100 and float(r["epoch_seconds"]) > 0 for r in rows)
    args = yaml.safe_load((folder / "args.yaml").read_text())
    assert args["mixup"] == 0.8 and args["cutmix"] == 1.0 and args["aa"] == "rand-m9-mstd0.5-inc1"
    assert args["amp"] is True and args["reprob"] == 0.25

    ckpt = read_checkpoint(folder / "last.pth.tar")  # weights_only=True: every value must be plain
    assert CONTRACT_KEYS <= set(ckpt)
    assert ckpt["version"] == 1 and ckpt["arch"] == "sequencer2d_nano" and ckpt["epoch"] == 1
    assert ckpt["class_names"] == ["blue", "green", "red"]
    assert ckpt["data_config"]["img_size"] == 16 and set(ckpt["data_config"]) >= {"mean", "std", "crop_pct",
                                                                                  "interpolation"}
    assert "state_dict_ema" in ckpt and isinstance(ckpt["rng_state"], list)
    assert ckpt["probabilities"] == "softmax"  # cross-entropy trained (predict's softmax; sigmoid for --bce-loss)
    assert ckpt["metric"] == pytest.approx(float(rows[-1]["eval_top1"]), abs=1e-3)
    # the checkpoint alone rebuilds the model
    model = create_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    assert model.num_classes == 3 and model.model_kwargs["drop_path_rate"] == 0.1


def test_validate_reproduces_logged_top1(scratch_run, image_folder, tmp_path, capsys):
    """... in float32, with a note that the run evaluated under autocast (bf16 on the CPU, where it has the kernels:
    --native-amp) and how to evaluate as it did; which then gives no note."""
    from sequencer.cli import main
    from sequencer.models.kernels import onednn_bf16_supported
    results = tmp_path / "r.json"
    validate = ["validate", str(image_folder), "--checkpoint", str(scratch_run / "last.pth.tar"), "--split", "val",
                "-b", "5", "-j", "0", "--device", "cpu"]
    assert main([*validate, "--results-file", str(results)]) == 0
    logged = float(summary_rows(scratch_run)[-1]["eval_top1"])
    assert json.loads(results.read_text())["top1"] == pytest.approx(logged, abs=0.01)
    note = "note: the checkpoint's run evaluated under bfloat16 autocast"
    out = capsys.readouterr().out
    assert (note in out and "--amp-dtype bfloat16 evaluates as the run did" in out) == onednn_bf16_supported()
    if onednn_bf16_supported():
        assert main([*validate, "--amp-dtype", "bfloat16"]) == 0
        assert note not in capsys.readouterr().out


def test_finetune_recipe_at_larger_size(scratch_run, image_folder, tmp_path):
    """Recipe 2: start from the 16 px weights, train at 32 px with --crop-pct 1.0 (model taken from the file)."""
    base = read_checkpoint(scratch_run / "last.pth.tar")
    rc = train_cli([image_folder, *TINY_RUN[TINY_RUN.index("--img-size"):], "--initial-checkpoint",
                    scratch_run / "last.pth.tar", "--output", tmp_path, "--experiment", "ft", "--epochs", "1",
                    "--sched", "cosine", "--input-size", "3", "32", "32", "--img-size", "32", "--crop-pct", "1.0",
                    "--drop-path", "0.4", "--lr", "5e-5", "--weight-decay", "1e-8", "--reprob", "0.25",
                    "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--warmup-epochs", "0",
                    "--cooldown-epochs", "0", "--amp"])
    assert rc == 0
    ckpt = read_checkpoint(tmp_path / "ft" / "last.pth.tar")
    assert ckpt["model_kwargs"]["img_size"] == 32 and ckpt["data_config"]["img_size"] == 32
    assert ckpt["data_config"]["crop_pct"] == 1.0
    assert ckpt["model_kwargs"]["embed_dims"] == [16, 16] or tuple(ckpt["model_kwargs"]["embed_dims"]) == (16, 16)
    # started from the base weights (EMA preferred, as validate loads them): a tiny lr moved them very little
    start = base["state_dict_ema"]
    w0, w1 = start["stem.proj.weight"], ckpt["state_dict"]["stem.proj.weight"]
    assert (w1 - w0).abs().max() < 0.05 * w0.abs().max()


def test_transfer_recipe_other_class_count(scratch_run, image_folder_2cls, tmp_path, monkeypatch):
    """Recipe 3: a 3-class checkpoint fine-tuned to 2 classes (head re-initialised) with --clip-grad 1."""
    import timm.utils
    clips = []
    real_clip = timm.utils.dispatch_clip_grad
    monkeypatch.setattr(timm.utils, "dispatch_clip_grad",
                        lambda params, value, mode="norm", **kw: clips.append((value, mode)) or
                        real_clip(params, value, mode, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = train_cli([image_folder_2cls, *TINY_RUN, "--num-classes", "2", "--initial-checkpoint",
                        scratch_run / "last.pth.tar", "--output", tmp_path, "--experiment", "tl", "--epochs", "1",
                        "--sched", "cosine", "--clip-grad", "1", "--drop-path", "0.1", "--lr", "1e-4",
                        "--weight-decay", "1e-4", "--remode", "pixel", "--aa", "rand-m9-mstd0.5-inc1",
                        "--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--warmup-lr", "1e-6",
                        "--warmup-epochs", "1", "--native-amp"])
    assert rc == 0
    assert any("re-initialised" in str(w.message) for w in caught)
    assert clips and all(c == (1.0, "norm") for c in clips)
    ckpt = read_checkpoint(tmp_path / "tl" / "last.pth.tar")
    assert ckpt["state_dict"]["head.fc.weight"].shape[0] == 2 and ckpt["class_names"] == ["dark", "light"]
    base = read_checkpoint(scratch_run / "last.pth.tar")["state_dict_ema"]
    assert torch.allclose(ckpt["state_dict"]["norm.weight"], base["norm.weight"], atol=0.05)


def test_config_replays_a_run_and_flags_override(scratch_run, image_folder, tmp_path):
    rc = train_cli(["--config", scratch_run / "args.yaml", "--output", tmp_path, "--experiment", "replay",
                    "--epochs", "1"])
    assert rc == 0
    old = yaml.safe_load((scratch_run / "args.yaml").read_text())
    new = yaml.safe_load((tmp_path / "replay" / "args.yaml").read_text())
    differ = {k for k in old if old[k] != new.get(k)}
    assert old["warmup_epochs"] >= 1  # so the 1-epoch replay must shorten it: warmup would fill the whole run
    assert differ == {"epochs", "output", "experiment", "config", "warmup_epochs"}
    assert new["warmup_epochs"] == 0
    assert summary_epochs(tmp_path / "replay") == [0]


@pytest.mark.parametrize("flags, culprit", [
    (["--lr", "-1"], "--lr -1"),
    (["--epochs", "0"], "--epochs 0"),
    (["-b", "0"], "--batch-size 0"),
    (["--reprob", "1.5"], "--reprob 1.5"),
    (["--smoothing", "1"], "--smoothing 1"),
    (["--mixup", "0.8", "-b", "7"], "must be even"),
    (["--scale", "0.9", "0.1"], "--scale"),
    (["--cutmix-minmax", "0.9", "0.2"], "--cutmix-minmax 0.9 0.2: needs two values"),  # was timm's traceback
    (["--interpolation", "random"], "--interpolation random: the evaluation resize"),  # was timm's KeyError
    (["--model-ema-decay", "1.5"], "--model-ema-decay"),
    (["--resume", "auto"], "--experiment"),
    (["--resume", "/nonexistent/last.pth.tar"], "no such file"),
])
def test_bad_flag_values_fail_cleanly(flags, culprit, capsys, tmp_path):
    assert train_cli(["--output", tmp_path, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sequencer train: error:") and culprit in err and "Traceback" not in err


@pytest.mark.parametrize("minmax", [(0.0, 1.0), (0.2, 0.6)])
def test_cutmix_minmax_timm_draws_from_passes_the_checks(minmax):
    """A box side from 0 (timm's numpy randint draws from it; the check refused 0.0 1.0 as 'needs 0 < MIN')."""
    from sequencer.engine.config import RunState, TrainConfig
    from sequencer.engine.config_checks import check_config
    assert check_config(TrainConfig(data="x", cutmix_minmax=minmax, batch_size=2), RunState()).cutmix_minmax == minmax


def test_user_errors_name_the_culprit(image_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        ([image_folder, *TINY_RUN, "--output", tmp_path / "file" / "sub"], "not writable"),
        ([image_folder, *TINY_RUN, "--img-size", "15", "--output", tmp_path], "--img-size 15"),
        ([image_folder, *TINY_RUN, "-b", "64", "--output", tmp_path], "batch"),
        ([image_folder, "--model", "sequencer2d_nan", "--output", tmp_path], "sequencer2d_nano"),
        ([tmp_path / "missing", *TINY_RUN, "--output", tmp_path], "missing"),
        ([image_folder, *TINY_RUN, "--opt", "nosuchopt", "--output", tmp_path], "nosuchopt"),
    ]
    for args, culprit in cases:
        assert train_cli(args) == 2, args
        err = capsys.readouterr().err
        assert "error:" in err and culprit in err and "Traceback" not in err, err


@pytest.mark.slow
def test_digits_demo_reaches_96_percent(tmp_path):
    """The README's first command: `sequencer train` with no data trains sequencer2d_nano on the digits."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "sequencer", "train", "--output", str(tmp_path)],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (folder,) = tmp_path.iterdir()
    assert "sequencer2d_nano" in folder.name
    top1 = float(summary_rows(folder)[-1]["eval_top1"])
    assert top1 >= 96.0, proc.stdout[-3000:]
    assert "digits demo: eval top-1" in proc.stdout
    print(f"digits demo: {top1:.2f}% in {time.time() - t0:.0f}s")


@pytest.mark.parametrize("epochs, warmup, on_updates, expected",
                         [(4, 5, False, 0), (4, 5, True, 1), (8, 10, False, 2), (3, 5, True, 0)])
def test_a_warmup_filling_the_run_is_shortened(epochs, warmup, on_updates, expected):
    """timm's default 5 warmup epochs on a short run: a quarter of the run, never a lone per-epoch warmup epoch
    (stepped per epoch, warmup's first epoch runs entirely at --warmup-lr)."""
    from sequencer.engine.config import RunState, TrainConfig
    from sequencer.engine.config_checks import check_config
    cfg = TrainConfig(data="x", epochs=epochs, warmup_epochs=warmup, sched_on_updates=on_updates)
    state = RunState()
    run_cfg = check_config(cfg, state)  # the note is kept for the start of the run (issue 19: never before an error)
    assert state.start_warnings[-1].endswith(f"using `warmup_epochs={expected}`")
    assert run_cfg.warmup_epochs == expected and cfg.warmup_epochs == warmup  # a new config; the given one stays
