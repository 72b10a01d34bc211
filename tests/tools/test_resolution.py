import csv

import pytest
import torch

from sequencer.cli import main
from sequencer.models import create_model
from sequencer.tools.resolution import default_sizes

from .conftest import reference_inputs, reference_model, save_training_checkpoint
from .png_checks import assert_real_png


def test_resolution_sweep_csv_matches_hand_accuracy(image_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["resolution-sweep", str(image_folder), "--split", "val", "--sizes", "32", "16", "48",
                 "--output", str(out), "--checkpoint", str(tiny_checkpoint), "-j", "0", "-b", "4"]) == 0
    with open(out / "resolution.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["img_size"]) for r in rows] == [16, 32, 48]
    model = reference_model(tiny_checkpoint)
    files = sorted((image_folder / "val").rglob("*.png"))
    labels = torch.tensor([0 if f.parent.name == "cat" else 1 for f in files])
    for row in rows:
        size = int(row["img_size"])
        with torch.no_grad():
            logits = model(reference_inputs(files, size))
        assert float(row["top1"]) == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean().item(), abs=1e-3)
        assert float(row["top5"]) == pytest.approx(100.0)  # two classes: always in the top 5
        assert int(row["count"]) == len(files)
    assert_real_png(out / "resolution.png", (640, 400))


def test_resolution_sweep_errors(image_folder, tiny_checkpoint, tmp_path, capsys):
    ck = ["--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "o")]
    assert main(["resolution-sweep", str(image_folder), "--sizes", "32", "33", *ck]) == 2
    err = capsys.readouterr().err
    assert "33x33" in err and err.count("\n") == 1
    assert main(["resolution-sweep", str(tmp_path / "missing"), "--sizes", "32", *ck]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["resolution-sweep", str(image_folder), "--split", "test", "--sizes", "32", *ck]) == 2
    assert "split 'test' not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["resolution-sweep", str(tmp_path / "empty"), "--sizes", "32", *ck]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "o" / "resolution.csv").exists()


def test_default_sizes_are_ones_the_model_takes(image_folder, tiny_checkpoint, tmp_path):
    """Without --sizes: half to twice the model's size in quarter steps, each a multiple of its patch reduction (the
    old fixed 160..320 list was refused by Sequencer2D-S/M/L, whose reduction is 14)."""
    assert default_sizes(224, 14) == [112, 168, 224, 280, 336, 392, 448]
    assert all(size % 14 == 0 for size in default_sizes(392, 14))
    out = tmp_path / "sweep"
    assert main(["resolution-sweep", str(image_folder), "--output", str(out), "--checkpoint", str(tiny_checkpoint),
                 "-j", "0", "-b", "6"]) == 0  # the tiny model: 32 px, patch reduction 2
    with open(out / "resolution.csv") as f:
        assert [int(r["img_size"]) for r in csv.DictReader(f)] == [16, 24, 32, 40, 48, 56, 64]


PE_KWARGS = dict(layers=(1, 1, 1, 1), patch_sizes=(4, 1, 1, 1), embed_dims=(16,) * 4, hidden_sizes=(8,) * 4,
                 num_classes=2, img_size=32)


def test_img_size_leaves_the_native_size_and_the_weights_as_trained(image_folder, tmp_path, capsys, monkeypatch):
    """`--img-size 48` on a checkpoint trained at 32 px: the native size marked (plot, console) is 32, and a
    position-embedding model (v_sequencer_s_pe) gives, at 32 px and at 48 px, the logits of the model built at 32 px
    (its embedding interpolated once from the checkpoint's own grid, not resized at load and again in forward)."""
    from sequencer.engine.inference import load_model
    from sequencer.tools import resolution

    torch.manual_seed(0)
    source = create_model("v_sequencer_s_pe", **PE_KWARGS)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ckpt = save_training_checkpoint(tmp_path / "pe.pth.tar", source.eval())
    reference = reference_model(ckpt)
    loaded = load_model(str(ckpt), img_size=48)
    assert loaded.input_size == (3, 48, 48) and loaded.trained_size == 32
    with torch.no_grad():
        for px in (32, 48):
            x = torch.randn(2, 3, px, px)
            torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    marked = []
    monkeypatch.setattr(resolution, "plot_resolution", lambda rows, path, title, train_size: marked.append(train_size))
    out = tmp_path / "sweep"
    assert main(["resolution-sweep", str(image_folder), "--sizes", "32", "48", "--img-size", "48", "--output",
                 str(out), "--checkpoint", str(ckpt), "-j", "0", "-b", "6"]) == 0
    assert marked == [32] and "(native size 32 px)" in capsys.readouterr().out
    files = sorted((image_folder / "val").rglob("*.png"))
    labels = torch.tensor([0 if f.parent.name == "cat" else 1 for f in files])
    with open(out / "resolution.csv") as f:
        for row in csv.DictReader(f):
            with torch.no_grad():
                logits = reference(reference_inputs(files, int(row["img_size"])))
            loss = torch.nn.functional.cross_entropy(logits, labels).item()
            assert float(row["loss"]) == pytest.approx(loss, abs=2e-5), row["img_size"]


def test_an_export_at_another_size_keeps_the_size_its_weights_were_trained_at(image_folder, tiny_checkpoint,
                                                                              tmp_path, capsys, monkeypatch):
    """`export --img-size 48` of a checkpoint trained at 32 px: the file runs at 48 px (predict, validate, the ONNX
    graph) and still says its weights were trained at 32 px, so resolution-sweep marks 32 as native, also after a
    second export of the export; a file that records no trained size (older exports) reads its img_size, as before."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sequencer.engine.inference import load_model
    from sequencer.tools import resolution
    from sequencer.tools.onnx_runtime import load_onnx

    first, second = tmp_path / "at48.safetensors", tmp_path / "at40.safetensors"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--img-size", "48", "-o", str(first)]) == 0
    assert main(["export", "--checkpoint", str(first), "--img-size", "40", "-o", str(second)]) == 0
    for path, size in ((first, 48), (second, 40)):
        loaded = load_model(str(path))
        assert (loaded.input_size, loaded.trained_size) == ((3, size, size), 32)
        assert loaded.data_config["img_size"] == size
    marked = []
    monkeypatch.setattr(resolution, "plot_resolution", lambda rows, path, title, train_size: marked.append(train_size))
    assert main(["resolution-sweep", str(image_folder), "--sizes", "32", "40", "--output", str(tmp_path / "sweep"),
                 "--checkpoint", str(second), "-j", "0", "-b", "6"]) == 0
    assert marked == [32] and "(native size 32 px)" in capsys.readouterr().out
    onnx_file = tmp_path / "at40.onnx"
    assert main(["export", "--checkpoint", str(first), "--img-size", "40", "-o", str(onnx_file)]) == 0
    loaded = load_onnx(onnx_file)
    assert (loaded.input_size, loaded.trained_size, loaded.data_config["img_size"]) == ((3, 40, 40), 32, 40)
    # an older export: no `trained_size` entry; it loads, and its img_size stands for both, as it did
    with safe_open(str(second), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    assert json.loads(meta.pop("trained_size")) == 32
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = load_model(str(tmp_path / "old.safetensors"))
    assert (loaded.input_size, loaded.trained_size) == ((3, 40, 40), 40)


def test_train_and_test_only_data_is_evaluated_on_test_by_every_tool(image_folder, tiny_checkpoint, tmp_path,
                                                                     capsys):
    """DATA of train/ and test/ only (CIFAR-style): validate evaluates test/, as training does; the resolution sweep
    and robustness's clean error, without a split named, evaluate the same images (they looked for val/ and stopped:
    "split 'val' not found")."""
    import json
    import warnings

    from sequencer.engine.inference import load_model
    from sequencer.tools.robustness import mean_corruption_error

    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(image_folder / "train", target_is_directory=True)
    (data / "test").symlink_to(image_folder / "val", target_is_directory=True)
    results = tmp_path / "r.json"
    assert main(["validate", str(data), "--checkpoint", str(tiny_checkpoint), "-j", "0",
                 "--results-file", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["count"] == len(list((image_folder / "val").rglob("*.png")))
    assert main(["resolution-sweep", str(data), "--sizes", "32", "-j", "0", "--checkpoint", str(tiny_checkpoint),
                 "-o", str(tmp_path / "sweep")]) == 0
    row = next(csv.DictReader(open(tmp_path / "sweep" / "resolution.csv")))
    assert int(row["count"]) == got["count"] and float(row["top1"]) == pytest.approx(got["top1"], abs=1e-3)
    corrupted = tmp_path / "c" / "fog"
    corrupted.mkdir(parents=True)
    (corrupted / "3").symlink_to(image_folder / "val", target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one severity of five: not comparable, as it warns
        summary = mean_corruption_error(load_model(checkpoint=str(tiny_checkpoint), device="cpu"),
                                        {"fog": corrupted}, clean=str(data))
    assert 100 * (1 - summary["clean_error"]) == pytest.approx(got["top1"], abs=1e-3)


def test_resolution_sweep_reads_a_torchvision_dataset_as_validate_does(tmp_path, capsys, monkeypatch):
    """`--dataset torch/cifar10` on torchvision's own files (no download): each size's top-1 is validate's at that
    size on the same split (resolution-sweep had no --dataset: it read DATA as image folders only)."""
    import json
    import os

    import torchvision.datasets.cifar as cifar

    from cifar_files import write_cifar10
    # the hand-made files cannot match the real release's md5s, which torchvision checks
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    root = write_cifar10(tmp_path / "cifar", n_test=12)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    torch.manual_seed(0)
    model = create_model("sequencer2d_nano", num_classes=10, img_size=32, layers=(1, 1), patch_sizes=(2, 1),
                         embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
    torch.nn.init.normal_(model.head.fc.weight, std=2.0)
    checkpoint = tmp_path / "c.pth.tar"
    torch.save({"version": 1, "arch": model.model_name, "model_kwargs": model.model_kwargs, "class_names": names,
                "state_dict": model.state_dict()}, checkpoint)
    common = [str(root), "--dataset", "torch/cifar10", "--checkpoint", str(checkpoint), "-j", "0", "-b", "5"]
    assert main(["resolution-sweep", *common, "--sizes", "16", "32", "-o", str(tmp_path / "sweep")]) == 0
    with open(tmp_path / "sweep" / "resolution.csv") as f:
        rows = {int(r["img_size"]): r for r in csv.DictReader(f)}
    for size in (16, 32):
        results = tmp_path / f"v{size}.json"
        assert main(["validate", *common, "--img-size", str(size), "--results-file", str(results)]) == 0
        validated = json.loads(results.read_text())
        assert int(rows[size]["count"]) == validated["count"] == 12
        assert float(rows[size]["top1"]) == pytest.approx(validated["top1"], abs=1e-3)
