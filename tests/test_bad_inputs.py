"""Bad input, one case per test, from issue 13's list and from trying every command as a new user.

Every case runs the command the way a user does (``sequencer.cli.main``, in this process: the same code path as
``python -m sequencer`` without the ~4 s import) and asserts the contract of docs/training.md "Bad input": exactly
one line on stderr, a non-zero exit, no traceback, and the disk as it was (no new empty folder, nothing
half-written, no file changed).

Cases from the issue owned elsewhere and guarded there: exports and suffixes (item 5), ``export --opset 99``, random
weights in predict/export (item 10): tests/tools/test_export*.py and test_predict*.py (#14); ``erf`` on unreadable
images and the umask of outputs (item 11): #12; ``--dataset torch/cifar10 --dataset-download`` offline: #10.
The resume cases that need a trained run (extending a run, labels of a split lacking a class, a resume into a new
experiment, a crashed resume) are in tests/engine/test_resume_contract.py.
"""
from __future__ import annotations

import errno
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.cli import main

TINY_KWARGS = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
TINY = ["--model", "sequencer2d_nano", "--model-kwargs", "layers=(1,1)", "patch_sizes=(2,1)", "embed_dims=(16,16)",
        "hidden_sizes=(4,4)", "mlp_ratios=(2,2)"]
TRAIN = [*TINY, "--img-size", "16", "-b", "4", "-j", "0", "--device", "cpu", "--opt", "adamw", "--lr", "1e-3",
         "--warmup-epochs", "0", "--epochs", "1"]


def write_images(root: Path, split: str, classes, per_class: int = 4, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def data(tmp_path):
    """tmp/data/{train,test}/{blue,green,red}: CIFAR-style, no val/ folder."""
    root = tmp_path / "data"
    write_images(root, "train", ("blue", "green", "red"))
    write_images(root, "test", ("blue", "green", "red"), per_class=2)
    return root


@pytest.fixture
def finished_run(tmp_path, data):
    """A run folder as `sequencer train` leaves it (adamw, cosine, 3 classes), without spending a training run."""
    from sequencer.engine.checkpoint import atomic_save
    from sequencer.models import create_model
    folder = tmp_path / "out" / "x"
    folder.mkdir(parents=True)
    model = create_model("sequencer2d_nano", num_classes=3, img_size=16, **TINY_KWARGS)
    args = dict(opt="adamw", sched="cosine", model="sequencer2d_nano", eval_metric="top1", epochs=1, lr=1e-3,
                model_kwargs={k: list(v) for k, v in TINY_KWARGS.items()})
    atomic_save(dict(version=1, arch="sequencer2d_nano", model_kwargs=dict(model.model_kwargs),
                     class_names=["blue", "green", "red"], state_dict=model.state_dict(), epoch=0,
                     epoch_complete=True, args=args), folder / "last.pth.tar")
    (folder / "args.yaml").write_text("opt: adamw\n")
    (folder / "summary.csv").write_text("epoch,train_loss\n0,1.0\n")
    return folder


def tree(root: Path) -> dict:
    """Every folder and file under ``root``: path -> file bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def run_cli(tmp_path, capsys, monkeypatch):
    """Run ``sequencer ARGS`` in tmp_path; assert a clean one-line failure that left tmp_path as it was."""
    monkeypatch.chdir(tmp_path)  # default output folders (./output/...) land where the check sees them

    def run(*args, expect: str = "") -> str:
        before = tree(tmp_path)
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc not in (0, None), err
        assert "Traceback" not in err
        assert len(lines) == 1, err
        assert expect in lines[0], lines[0]
        assert tree(tmp_path) == before, "the failed command changed the disk"
        return lines[0]

    return run


# ---------------------------------------------------------------------------------------------- issue items
def test_resume_with_another_optimizer(run_cli, data, finished_run):
    """Item 3: `--opt sgd` onto an adamw run was KeyError: 'momentum' after overwriting args.yaml."""
    run_cli("train", data, *TRAIN, "--opt", "sgd", "--resume", finished_run / "last.pth.tar", "--epochs", "2",
            expect="--opt sgd vs the checkpoint's adamw")


def test_resume_onto_data_of_other_classes(run_cli, tmp_path, finished_run):
    """Item 3: a 3-class checkpoint onto 2-class data resumed silently."""
    other = tmp_path / "other"
    write_images(other, "train", ("cat", "dog"))
    run_cli("train", other, "--resume", finished_run / "last.pth.tar", "--epochs", "2", "-j", "0",
            expect="3 classes (blue, green, red) vs the training split's 2 (cat, dog)")


def test_held_out_class_unknown_to_training(run_cli, data):
    """Item 2: was an IndexError traceback after a full training epoch."""
    write_images(data, "test", ("purple",), per_class=1)
    run_cli("train", data, *TRAIN, "--experiment", "e", expect="purple")


def test_validate_split_with_a_class_the_checkpoint_lacks(run_cli, data, finished_run):
    """Item 2 for validate: labels come from the checkpoint's class names."""
    write_images(data, "test", ("purple",), per_class=1)
    run_cli("validate", data, "--checkpoint", finished_run / "last.pth.tar", "-j", "0", "--device", "cpu",
            expect="purple")


def test_train_bad_img_size_leaves_no_folder(run_cli, data):
    """Items 7 and 8: a failed start left an empty experiment folder."""
    run_cli("train", data, *TRAIN, "--img-size", "15", "--experiment", "e", expect="--img-size 15")


def test_train_missing_resume_file(run_cli, data):
    run_cli("train", data, *TRAIN, "--resume", "nowhere/last.pth.tar", expect="no such file")


def test_train_resume_of_a_file_that_is_no_checkpoint(run_cli, data, tmp_path):
    """A bad --resume left an empty experiment folder."""
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, weights)
    run_cli("train", data, *TRAIN, "--resume", weights, "--experiment", "e", expect="not a training checkpoint")


def test_train_pretrained_offline(run_cli, data, tmp_path_factory, monkeypatch):
    """Items 8 and 9: offline --pretrained left a folder, and its hint named --checkpoint (train has none)."""
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("hub")))  # the download cache is no debris
    line = run_cli("train", data, "--model", "sequencer2d_s", "--pretrained", "--img-size", "16", "-b", "4", "-j",
                   "0", "--device", "cpu", "--epochs", "1", "--experiment", "e", expect="--initial-checkpoint")
    assert " --checkpoint" not in line.replace("--checkpoint-hist", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_a_gpu(run_cli, data):
    """Item 7: was a traceback (and item 8: an empty folder)."""
    run_cli("train", data, *TRAIN, "--device", "cuda", "--experiment", "e", expect="CUDA is not available")


def test_validate_negative_workers(run_cli, data, finished_run):
    """Item 7: `validate -j -1` was a DataLoader traceback."""
    run_cli("validate", data, "--checkpoint", finished_run / "last.pth.tar", "-j", "-1", expect="-j/--workers -1")


def test_benchmark_data_negative_workers(run_cli, data):
    """`benchmark --data DIR -j -1` was torch's DataLoader ValueError traceback."""
    run_cli("benchmark", "--data", data, "--model", "sequencer2d_nano", "--img-size", "16", "-b", "2", "-j", "-1",
            "--rounds", "1", "--num-iter", "1", "--device", "cpu", expect="-j/--workers -1: must not be negative")


def test_benchmark_image_size_the_model_cannot_take(run_cli):
    """Item 7: `benchmark --img-size 33` was a ValueError traceback."""
    run_cli("benchmark", "--model", "sequencer2d_nano", "--img-size", "33", "--device", "cpu",
            expect="multiple of 4")


@pytest.mark.parametrize("command", [
    ["validate", "--model", "sequencer2d_nano", "--dataset", "digits", "-j", "0", "--device", "cpu"],
    ["robustness", "DATA", "--model", "sequencer2d_nano", "--device", "cpu"],
    ["benchmark", "--model", "sequencer2d_nano", "--device", "cpu"],
])
@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_results_file_checked_before_any_work(run_cli, tmp_path, data, command, where):
    """Item 6: a folder or unwritable --results-file let the whole run go first, then said "free some space"."""
    target = tmp_path / "results.json"
    if where == "folder":
        target.mkdir()
    else:
        target = Path("/proc/results.json")  # cannot be created even by root
    command = [str(data) if c == "DATA" else c for c in command]
    line = run_cli(*command, "--results-file", target, expect="--results-file")
    assert "free some space" not in line


def test_resolution_sweep_checks_data_before_making_its_folder(run_cli, tmp_path, data):
    """Item 8: the output folder was created before the split was looked for."""
    run_cli("resolution-sweep", data, "--split", "nosuch", "--model", "sequencer2d_nano", "--sizes", "16",
            "--device", "cpu", "-o", tmp_path / "sweep", expect="nosuch")


def test_resolution_sweep_negative_workers(run_cli, data):
    run_cli("resolution-sweep", data, "--split", "test", "--model", "sequencer2d_nano", "--sizes", "16", "-j", "-2",
            "--device", "cpu", "-o", "sweep", expect="-j/--workers -2")


def test_experiment_name_with_header_only_summary_is_free(run_cli, data, tmp_path):
    """Item 8: a crashed resume left a header-only summary.csv, after which the name was refused."""
    folder = tmp_path / "output" / "train" / "e"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,epoch_seconds\n")
    # past the "already holds a run" check, the next problem is reported
    run_cli("train", data, *TRAIN, "--img-size", "15", "--experiment", "e", expect="--img-size 15")


def test_unreadable_share_counts_and_lists_every_broken_file(tmp_path):
    """Item 9: the >1% error said "16 of 428" with 22 broken (it stopped counting at the threshold)."""
    from sequencer.data import create_dataset, create_loader
    from sequencer.errors import SequencerError
    write_images(tmp_path, "val", ("a", "b"), per_class=20, size=8)
    broken = []
    for cls in ("a", "b"):
        for i in range(4):
            path = tmp_path / "val" / cls / f"zz_broken_{i}.png"  # sorted after the good files of the class
            path.write_bytes(b"not an image")
            broken.append(str(path))
    loader = create_loader(create_dataset("", root=str(tmp_path), split="val"), (3, 8, 8), 4, False,
                           num_workers=0, device="cpu")
    with pytest.raises(SequencerError) as e:
        list(loader)
    assert "8 of 48 images are unreadable" in str(e.value)
    assert all(path in str(e.value) for path in broken)


def test_one_channel_model_does_not_blame_an_absent_mean():
    """Item 9: `--in-chans 1` failed with "--mean has 3 values" although no --mean was given."""
    from sequencer.data import resolve_data_config
    from sequencer.errors import SequencerError
    from sequencer.models import create_model
    model = create_model("sequencer2d_nano", in_chans=1, img_size=16, **TINY_KWARGS)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    config = resolve_data_config({}, model)
    assert config["mean"] == pytest.approx((0.4,)) and config["std"] == pytest.approx((0.2,))
    with pytest.raises(SequencerError, match="`std` has 3 values for 1 input channels"):
        resolve_data_config({"std": (0.2, 0.2, 0.2)}, model)


def test_train_test_folder_is_validated_without_a_split_flag(data, finished_run, capsys, tmp_path, monkeypatch):
    """Docs item 12: train/ and test/ only used to stop and ask for --split test."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(data), "--checkpoint", str(finished_run / "last.pth.tar"), "-j", "0", "--device",
                 "cpu"]) == 0
    assert "test" in capsys.readouterr().out


# ------------------------------------------------------------------------------- one case per command (own tries)
@pytest.mark.parametrize("args, expect", [
    (["models", "--filter", "nosuchmodel*"], ""),
    (["train", "DATA", "--model", "sequencer2d_nanoo", "--epochs", "1"], "sequencer2d_nano"),
    (["validate", "DATA", "--model", "sequencer2d_nano", "--split", "nosuch"], "nosuch"),
    (["predict", "nosuch.jpg", "--model", "sequencer2d_nano"], "nosuch.jpg"),
    (["erf", "DATA", "--model", "sequencer2d_nano", "--img-size", "33"], "33"),
    (["robustness", "DATA", "--model", "sequencer2d_nano", "--device", "cpu"], ""),
    (["resolution-sweep", "nosuch", "--model", "sequencer2d_nano", "-o", "o"], "nosuch"),
    (["export", "--model", "sequencer2d_nano", "--format", "nosuch", "-o", "m.onnx"], "nosuch"),
    (["checkpoint", "average", "nosuch.pth.tar", "-o", "avg.pth.tar"], "nosuch.pth.tar"),
    (["benchmark", "--model", "sequencer2d_nano", "--batch-size", "0"], "0"),
])
def test_every_command_refuses_bad_input_in_one_line(run_cli, data, args, expect):
    run_cli(*[str(data) if a == "DATA" else a for a in args], expect=expect)


# ---------------------------------------------------------------------------------------- issue 19 item 4
@pytest.mark.parametrize("flag, value", [("--torchcompile", "nosuch"), ("--torchcompile-mode", "fastest"),
                                         ("--opt", "adamz"), ("--sched", "cosin"), ("--aa", "rand-augment-9"),
                                         ("--aa", "rand-m9-mstd0.5-incl"),  # timm read it without inc1
                                         ("--remode", "constant"), ("--train-interpolation", "cubic")])
def test_library_flag_typos_fail_before_anything_is_written(run_cli, data, flag, value):
    line = run_cli("train", data, *TRAIN, "--output", "out", "--experiment", "e", flag, value, expect=flag)
    assert value in line


def test_library_flag_typo_in_a_config_file(run_cli, data, tmp_path):
    (tmp_path / "c.yaml").write_text("torchcompile: nosuch\n")
    run_cli("train", data, *TRAIN, "--config", tmp_path / "c.yaml", expect="--torchcompile nosuch")


def test_config_that_is_a_binary_file(run_cli, data, finished_run):
    """A checkpoint passed as --config (for the args.yaml beside it) was yaml's UnicodeDecodeError traceback."""
    run_cli("train", data, *TRAIN, "--config", finished_run / "last.pth.tar", expect="is not a YAML text file")


def test_class_map_that_is_a_folder(run_cli, data, finished_run):
    """--class-map DIR said "class map DIR does not exist" of a folder that does."""
    run_cli("validate", data, "--checkpoint", finished_run / "last.pth.tar", "--class-map", data, "-j", 0,
            "--device", "cpu", expect="is a folder, not a file")


def test_robustness_data_that_is_a_file(run_cli, tmp_path, finished_run):
    """DATA_C naming a file said "ImageNet-C folder ... does not exist" of a file that does."""
    (tmp_path / "c.tar").write_bytes(b"not a folder")
    run_cli("robustness", tmp_path / "c.tar", "--checkpoint", finished_run / "last.pth.tar", "--results-file",
            tmp_path / "r.json", expect="is a file, not a folder")


@pytest.mark.parametrize("clean", ["missing", "file"])
def test_robustness_clean_that_is_no_folder(run_cli, tmp_path, finished_run, clean):
    """--clean was checked after the corruption folders were scanned, whose warning (14 of the 15 standard
    corruptions missing) came first; a file was said not to exist."""
    write_images(tmp_path / "c" / "gaussian_noise", "1", ("blue", "green", "red"), per_class=1)
    if clean == "file":
        (tmp_path / clean).write_bytes(b"not a folder")
    run_cli("robustness", tmp_path / "c", "--checkpoint", finished_run / "last.pth.tar", "--results-file",
            tmp_path / "r.json", "--clean", tmp_path / clean,
            expect="is a file, not a folder" if clean == "file" else "does not exist")


def test_segment_train_data_that_is_a_file(run_cli, tmp_path):
    """DATA naming a file said "dataset folder ... does not exist" of a file that does."""
    (tmp_path / "voc.tar").write_bytes(b"not a folder")
    run_cli("segment", "train", tmp_path / "voc.tar", "--epochs", 1, "-j", 0, "--device", "cpu", "--output",
            tmp_path / "out", expect="is a file, not a folder")


# ---------------------------------------------------------------------------------------- issue 19 item 9
def test_unknown_flag_points_to_the_subcommand_help(run_cli, data):
    run_cli("predict", data, "--nosuch", expect="unrecognized arguments: --nosuch (see `sequencer predict --help`)")


def test_warmup_note_does_not_precede_a_one_line_error(run_cli, data, recwarn):
    # --warmup-epochs 5 >= --epochs 1 would be shortened with a warning; the batch larger than the data fails later
    run_cli("train", data, *TRAIN, "--warmup-epochs", "5", "-b", "1000", expect="--batch-size 1000")
    assert not [w for w in recwarn if "warmup" in str(w.message)]  # pytest keeps warnings off stderr: check here


# ------------------------------------------------------------------------ an output that is one of the inputs
def test_checkpoint_average_onto_an_input_named_through_a_link(run_cli, finished_run, tmp_path):
    """The output was compared with the inputs by spelling: through a link it replaced the input."""
    (tmp_path / "link.pth.tar").symlink_to(finished_run / "last.pth.tar")
    run_cli("checkpoint", "average", tmp_path / "link.pth.tar", "-o", finished_run / "last.pth.tar",
            expect="is also an input; refusing to overwrite it")


def test_export_onto_its_own_safetensors_checkpoint(run_cli, finished_run, tmp_path):
    """`export --checkpoint m.safetensors -o ./m.safetensors` rewrote the user's file in place (exit 0)."""
    weights = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(finished_run / "last.pth.tar"), "-o", str(weights)]) == 0
    run_cli("export", "--checkpoint", weights, "-o", tmp_path / "." / "m.safetensors",
            expect="is also the --checkpoint file; refusing to overwrite it")


def test_erf_onto_one_of_its_images(run_cli, data, finished_run):
    """`erf DATA -o DATA/.../0.png` replaced the user's image with the heat map (and wrote 0.npy beside it)."""
    run_cli("erf", data / "train", "--checkpoint", finished_run / "last.pth.tar", "-n", 2, "--device", "cpu",
            "-o", data / "train" / "blue" / "0.png", expect="is also one of the images it reads")


@pytest.mark.parametrize("overlay", [[], ["--overlay"]])
def test_segment_predict_into_the_folder_of_its_images(run_cli, tmp_path, overlay):
    """A mask is <stem>.png in --output: predicting x.png into its own folder would replace it (said before the
    checkpoint is read). With --overlay, x_overlay.jpg's would be replaced by x's overlay."""
    folder = tmp_path / "images"
    write_images(folder, "", ["x"], per_class=1)
    image = folder / "x" / ("0.png" if not overlay else "0_overlay.jpg")
    if overlay:
        (folder / "x" / "0.png").rename(folder / "x" / "0.jpg")
        Image.open(folder / "x" / "0.jpg").save(image)  # the image 0.jpg and another, 0_overlay.jpg
    run_cli("segment", "predict", folder / "x", "--checkpoint", tmp_path / "none.pth.tar", "--output", folder / "x",
            *overlay, expect=f"would replace the image {image}")


# ------------------------------------------------------------------------------------------ data without images
@pytest.mark.parametrize("kind", ["folders", "tars"])
def test_class_folders_or_tars_without_images_are_one_line(run_cli, tmp_path, finished_run, kind):
    """A split whose every class folder (or CLASS.tar) is empty: one warning per class ("ignoring class folder ...:
    it holds no image files") came before the error that said it all."""
    import tarfile
    for name in ("blue", "green", "red"):
        (tmp_path / "empty" / "val" / name).mkdir(parents=True)
    data = tmp_path / "empty"
    if kind == "tars":
        data = tmp_path / "tars"
        data.mkdir()
        for name in ("blue", "green", "red"):
            with tarfile.open(data / f"{name}.tar", "w") as tar:
                tar.add(tmp_path / "empty" / "val" / name, arcname=name)
    run_cli("validate", data, *(["--dataset", "tar"] if kind == "tars" else []), "--checkpoint",
            finished_run / "last.pth.tar", "-j", 0, "--device", "cpu", expect="no images found")


# ------------------------------------------------------------------------ a failure after the output folder is made
def test_resolution_sweep_of_unreadable_images_leaves_no_output_folder(run_cli, tmp_path, finished_run):
    """The folders of -o were made before the sweep, which then failed on the images: they stayed, empty."""
    for name in ("blue", "green", "red"):
        (tmp_path / "broken" / "val" / name).mkdir(parents=True)
        (tmp_path / "broken" / "val" / name / "0.png").write_bytes(b"not an image")
    run_cli("resolution-sweep", tmp_path / "broken", "--checkpoint", finished_run / "last.pth.tar", "--sizes", 16,
            "-j", 0, "--device", "cpu", "-o", tmp_path / "sweeps" / "broken", expect="unreadable")


def test_segment_predict_of_an_unreadable_first_image_leaves_no_output_folder(run_cli, tmp_path):
    from sequencer.models.segmentation import create_segmenter
    model = create_segmenter("sequencer2d_nano", 3, head="fpn", head_channels=8, out_channels=8,
                             backbone_kwargs=TINY_KWARGS)
    torch.save(dict(state_dict=model.state_dict(), segmenter=model.config, class_names=["a", "b", "c"],
                    data_config=dict(img_size=32, eval_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)),
               tmp_path / "seg.pth.tar")
    (tmp_path / "x.png").write_bytes(b"not an image")
    run_cli("segment", "predict", tmp_path / "x.png", "--checkpoint", tmp_path / "seg.pth.tar", "--device", "cpu",
            "--output", tmp_path / "masks" / "x", expect="x.png is unreadable")


# ------------------------------------------------------------------------------------------------ conflicting flags
@pytest.mark.parametrize("command", [["validate", "DATA", "-j", "0", "--device", "cpu"], ["predict", "DATA"],
                                     ["export", "-o", "m.safetensors"], ["erf", "DATA", "-o", "erf.png"]])
def test_checkpoint_and_pretrained_together(run_cli, data, finished_run, command):
    """--pretrained beside --checkpoint was ignored without a word: the checkpoint's weights ran."""
    run_cli(*[data if c == "DATA" else c for c in command], "--checkpoint", finished_run / "last.pth.tar",
            "--pretrained", expect="--pretrained and --checkpoint")


@pytest.mark.parametrize("command, output", [(["export"], "m.onnx"), (["erf", "DATA"], "erf.png")])
def test_output_file_that_is_a_folder(run_cli, tmp_path, data, finished_run, command, output):
    """An --output naming a folder was found only when the file was written, after the model was loaded and exported
    (or every image's gradient computed)."""
    (tmp_path / output).mkdir()
    run_cli(*[data if c == "DATA" else c for c in command], "--checkpoint", finished_run / "last.pth.tar", "-o",
            tmp_path / output, expect=f"--output '{tmp_path / output}' is a folder")


def test_validate_results_file_that_is_its_class_map(run_cli, data, finished_run):
    """A .json class map given as --results-file too was replaced by the results."""
    (data / "classes.json").write_text('["blue", "green", "red"]')
    run_cli("validate", data, "--checkpoint", finished_run / "last.pth.tar", "--class-map", data / "classes.json",
            "--results-file", data / "classes.json", "-j", 0, "--device", "cpu", expect="the --class-map file")
