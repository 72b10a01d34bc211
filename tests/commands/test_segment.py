"""`sequencer segment train | validate | predict` as a user runs them, on a synthetic VOC-layout set of shapes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation_helpers import TINY_SEGMENTER, make_ade20k, make_voc, palette_png, signal_in_training_step
from sequencer.cli import main
from sequencer.models.loading import read_checkpoint

# a clear margin over the trivial baseline (all background: about 26 % mIoU on this data, computed in the test)
MIOU_THRESHOLD = 60.0


def segment(*args) -> int:
    return main(["segment", *map(str, args)])


def _summary(folder):
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _background_only_miou(voc) -> float:
    """mIoU of predicting background everywhere: IoU background = its share of labelled pixels, others 0."""
    masks = [np.array(Image.open(p)) for p in sorted((voc / "SegmentationClass").glob("val_*.png"))]
    labelled = np.concatenate([m[m != 255] for m in masks])
    return 100 * float((labelled == 0).mean()) / 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI training run (data loaded in the main process; `test_train_with_workers` runs the workers' path)."""
    root = tmp_path_factory.mktemp("segment")
    voc = make_voc(root / "voc")
    code = segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 8, "--epochs", 16,
                   "--lr", 8e-3, "--warmup-iters", 4, "--eval-interval", 4, "-j", 0, "--device", "cpu",
                   "--output", root / "out", "--experiment", "shapes", "--log-interval", 1000)
    assert code == 0
    return voc, root / "out" / "shapes"


def test_train_reaches_well_above_chance(trained):
    voc, folder = trained
    rows = _summary(folder)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(16)]
    assert {"eval_miou", "eval_pixel_acc", "iou_class_0", "iou_class_1", "iou_class_2"} <= set(rows[0])
    best = max(float(r["eval_miou"]) for r in rows if r["eval_miou"])
    chance = _background_only_miou(voc)
    assert 20 < chance < 33
    assert best >= MIOU_THRESHOLD, (best, chance)
    assert (folder / "model_best.pth.tar").is_file() and (folder / "last.pth.tar").is_file()
    assert (folder / "args.yaml").is_file() and not (folder / ".run.lock").exists()


def test_validate_reproduces_the_logged_miou_exactly(trained, tmp_path, capsys):
    voc, folder = trained
    rows = _summary(folder)
    best = max((r for r in rows if r["eval_miou"]), key=lambda r: float(r["eval_miou"]))
    results = tmp_path / "results.json"
    capsys.readouterr()
    assert segment("validate", voc, "--checkpoint", folder / "model_best.pth.tar", "-j", 0, "--device", "cpu",
                   "--results-file", results) == 0
    out = capsys.readouterr().out
    metrics = json.loads(results.read_text())
    assert f"{metrics['miou']:.4f}" == best["eval_miou"]
    assert f"{metrics['pixel_acc']:.4f}" == best["eval_pixel_acc"]
    for name, iou in metrics["per_class_iou"].items():
        assert f"{iou:.4f}" == best[f"iou_{name}"]
    assert metrics["images"] == 12
    assert f"mIoU {best['eval_miou']}" in out


def test_validate_sliding_window_scores_what_predict_writes(trained, tmp_path):
    """validate's mIoU is the one computed here, independently, from the masks `segment predict` writes for the
    split's images in the same mode (the PNGs read back, a confusion matrix of their pixels against the labels)."""
    voc, folder = trained
    results = tmp_path / "slide.json"
    flags = ["--checkpoint", folder / "last.pth.tar", "--device", "cpu", "--eval-mode", "slide", "--stride", 16]
    assert segment("validate", voc, "-j", 0, "--results-file", results, *flags) == 0
    metrics = json.loads(results.read_text())
    assert metrics["eval_mode"] == "slide" and metrics["miou"] >= MIOU_THRESHOLD - 10
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert segment("predict", *(voc / "JPEGImages" / f"{i}.png" for i in ids), "--output", tmp_path / "pred",
                   *flags) == 0
    confusion = np.zeros((3, 3), np.int64)
    for i in ids:
        truth = np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")).astype(np.int64)
        pred = np.array(Image.open(tmp_path / "pred" / f"{i}.png")).astype(np.int64)
        labelled = truth != 255
        np.add.at(confusion, (truth[labelled], pred[labelled]), 1)
    hits, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert metrics["pixels"] == confusion.sum() and metrics["images"] == len(ids)
    assert metrics["miou"] == pytest.approx(100 * np.mean(hits[union > 0] / union[union > 0]), abs=1e-9)
    assert metrics["pixel_acc"] == pytest.approx(100 * hits.sum() / confusion.sum(), abs=1e-9)


def test_predict_writes_palette_masks_and_overlays(trained, tmp_path):
    voc, folder = trained
    images = [voc / "JPEGImages" / f"val_{i:03d}.png" for i in range(4)]
    out = tmp_path / "pred"
    assert segment("predict", *images, "--checkpoint", folder / "model_best.pth.tar", "--output", out,
                   "--overlay", "--device", "cpu") == 0
    agree = total = 0
    for image in images:
        mask = Image.open(out / f"{image.stem}.png")
        overlay = Image.open(out / f"{image.stem}_overlay.jpg")
        picture = Image.open(image)
        assert mask.mode == "P" and mask.size == picture.size == overlay.size and overlay.mode == "RGB"
        pred = np.array(mask)
        assert set(np.unique(pred)) <= {0, 1, 2}
        assert mask.getpalette()[3:6] == [128, 0, 0]  # VOC colours: class 1 dark red
        truth = np.array(Image.open(voc / "SegmentationClass" / f"{image.stem}.png"))
        labelled = truth != 255
        agree += int((pred[labelled] == truth[labelled]).sum())
        total += int(labelled.sum())
    assert agree / total > 0.8
    first = (out / f"{images[0].stem}.png").read_bytes()
    # a second run into the folder replaces its own masks and overlays (their files say predict wrote them)
    assert segment("predict", *images, "--checkpoint", folder / "model_best.pth.tar", "--output", out,
                   "--overlay", "--device", "cpu") == 0
    assert (out / f"{images[0].stem}.png").read_bytes() == first and len(list(out.iterdir())) == 8


def test_predict_files_keeps_the_callers_random_state(trained, tmp_path):
    """Building the checkpoint's segmenter draws initial weights: a seeded caller's next draws changed."""
    from sequencer.engine.segmentation_eval import predict_files

    voc, folder = trained
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    predict_files(str(folder / "model_best.pth.tar"), [voc / "JPEGImages" / "val_000.png"], str(tmp_path / "out"),
                  device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_bad_mask_is_one_line_before_anything_is_written(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    mask = np.array(Image.open(voc / "SegmentationClass" / "val_001.png"))
    mask[3, 3] = 9
    palette_png(mask).save(voc / "SegmentationClass" / "val_001.png")
    capsys.readouterr()
    code = segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 2, "--epochs", 1,
                   "-j", 0, "--device", "cpu", "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sequencer segment: error: mask ")
    assert "val_001.png holds value 9" in err
    assert not (tmp_path / "out").exists()


def test_pretrained_without_published_weights_names_the_backbone_checkpoint_flag(tmp_path, capsys):
    """The hint named --checkpoint, a flag segment train does not have."""
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1)
    capsys.readouterr()
    assert segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--pretrained", "--epochs", 1, "--device", "cpu",
                   "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pretrained weights are published for 'sequencer2d_nano'" in err
    assert "(hint: train it, or pass --backbone-checkpoint)" in err and not (tmp_path / "out").exists()


def test_bad_setting_names_the_parameter_in_the_api_and_the_flag_on_the_command_line(tmp_path, capsys):
    """The library's message names SegmentConfig's field; the command shows the flag that sets it."""
    from sequencer.engine.segmentation import SegmentConfig, train_segmenter
    from sequencer.errors import SequencerError

    voc = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    with pytest.raises(SequencerError, match=r"^`warmup_iters=-1`: must not be negative$"):
        train_segmenter(SegmentConfig(data=str(voc), epochs=1, warmup_iters=-1, output=str(tmp_path / "out")))
    capsys.readouterr()
    code = segment("train", voc, "--epochs", 1, "--warmup-iters", -1, "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert err == "sequencer segment: error: --warmup-iters -1: must not be negative\n"
    assert not (tmp_path / "out").exists()


def test_train_with_workers(tmp_path, capsys):
    """Two data-loader workers for training and evaluation (the default uses workers); validate in the main
    process gives the same numbers."""
    voc = make_voc(tmp_path / "voc", n_train=8, n_val=3)
    assert segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 4, "--epochs", 1,
                   "-j", 2, "--device", "cpu", "--output", tmp_path / "out", "--experiment", "w") == 0
    row = _summary(tmp_path / "out" / "w")[0]
    results = tmp_path / "r.json"
    assert segment("validate", voc, "--checkpoint", tmp_path / "out" / "w" / "last.pth.tar", "-j", 0,
                   "--device", "cpu", "--results-file", results) == 0
    assert f"{json.loads(results.read_text())['miou']:.4f}" == row["eval_miou"]


def test_ade20k_layout_trains_and_validates_with_reduce_zero_label(tmp_path):
    ade = make_ade20k(tmp_path / "ade")
    assert segment("train", ade, "--num-classes", 2, *TINY_SEGMENTER, "--img-size", 32, "-b", 3, "--epochs", 1,
                   "--train-split", "training", "--val-split", "validation", "-j", 0, "--device", "cpu",
                   "--output", tmp_path / "out", "--experiment", "ade") == 0
    folder = tmp_path / "out" / "ade"
    ckpt = read_checkpoint(folder / "last.pth.tar")
    assert ckpt["data_config"]["layout"] == "ade20k" and ckpt["data_config"]["reduce_zero_label"] is True
    assert ckpt["segmenter"]["num_classes"] == 2
    row = _summary(folder)[0]
    assert {"iou_class_0", "iou_class_1"} <= set(row) and "iou_class_2" not in row
    results = tmp_path / "r.json"
    assert segment("validate", ade, "--checkpoint", folder / "last.pth.tar", "--split", "validation", "-j", 0,
                   "--device", "cpu", "--results-file", results) == 0
    metrics = json.loads(results.read_text())
    assert f"{metrics['miou']:.4f}" == row["eval_miou"]
    # "other" (0) is ignored: the pixels scored are the shapes' only
    masks = [np.array(Image.open(p)) for p in (ade / "annotations" / "validation").iterdir()]
    assert metrics["pixels"] == sum(int((m > 0).sum()) for m in masks)


def test_ade20k_names_with_spaces_through_train_resume_validate_and_predict(tmp_path, capsys):
    """150 classes (ADE20K's default): the SceneParsing names, `chest of drawers` among them, are summary.csv's
    iou_<name> columns (read back by a resume), the checkpoint's names, validate's table and results-file keys;
    predict's files are named by the images only. The resume builds the checkpoint's model without its flags (it
    built the defaults' and was refused), and says that `--pretrained` does nothing there (it was silent)."""
    from sequencer.data.ade20k import ADE20K_CLASSES

    ade = make_ade20k(tmp_path / "ade", n_train=3, n_val=2)
    common = ["--train-split", "training", "--val-split", "validation", "--img-size", 32, "-b", 3,
              "-j", 0, "--device", "cpu", "--output", tmp_path / "out", "--experiment", "ade", "--resume", "auto"]
    assert segment("train", ade, "--epochs", 1, *TINY_SEGMENTER, *common) == 0
    with pytest.warns(UserWarning) as said:
        assert segment("train", ade, "--epochs", 2, "--pretrained", *common) == 0  # resumed: reads summary.csv back
    assert ["`pretrained=True` sets a new run's weights; a resume continues from its checkpoint's; it has no effect "
            "in this run"] == [str(w.message) for w in said if "pretrained" in str(w.message)]
    folder = tmp_path / "out" / "ade"
    rows = _summary(folder)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert [k for k in rows[0] if k.startswith("iou_")] == [f"iou_{n}" for n in ADE20K_CLASSES]
    assert all(r["iou_chest of drawers"] == "nan" and r["iou_wall"] != "nan" for r in rows)  # absent / present
    assert read_checkpoint(folder / "last.pth.tar")["class_names"] == list(ADE20K_CLASSES)
    results = tmp_path / "r.json"
    capsys.readouterr()
    assert segment("validate", ade, "--checkpoint", folder / "last.pth.tar", "--split", "validation", "-j", 0,
                   "--device", "cpu", "--results-file", results) == 0
    out = capsys.readouterr().out
    assert "\n  chest of drawers: IoU nan\n" in out and "\n  wall: IoU " in out
    per_class = json.loads(results.read_text())["per_class_iou"]
    assert list(per_class) == list(ADE20K_CLASSES)
    assert f"{per_class['wall']:.4f}" == rows[-1]["iou_wall"]
    image = next((ade / "images" / "validation").iterdir())
    assert segment("predict", image, "--checkpoint", folder / "last.pth.tar", "--output", tmp_path / "pred",
                   "--overlay", "--device", "cpu") == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{image.stem}.png", f"{image.stem}_overlay.jpg"]
    # the mask holds ADE20K's own label ids, as its annotations: the model's class k (0 = wall) is id k + 1 (it
    # wrote k, so every class read as the one before it, wall as "other")
    from sequencer.data.segmentation import EvalTransform
    from sequencer.engine.segmentation_eval import inference_settings, load_segmenter, predict_mask
    from torchvision.transforms.v2 import functional as TF
    loaded = load_segmenter(str(folder / "last.pth.tar"))
    cfg, picture = loaded.data_config, Image.open(image).convert("RGB")
    with torch.inference_mode():
        classes = predict_mask(loaded.model, EvalTransform(cfg["eval_size"], cfg["mean"], cfg["std"]).image(
            TF.pil_to_tensor(picture))[None], (picture.height, picture.width),
            inference_settings(cfg, None, None, torch.device("cpu")))
    assert np.array_equal(np.array(Image.open(tmp_path / "pred" / f"{image.stem}.png")), classes.numpy() + 1)


def test_ctrl_c_exits_130_with_a_recovery_checkpoint(tmp_path, monkeypatch, capsys):
    """The command returns the stop (the library call raises TrainingInterrupted instead): exit 130, the recovery
    checkpoint written, the best line of the epoch finished before, no traceback or "interrupted" line."""
    import signal

    signal_in_training_step(monkeypatch, signal.SIGINT)  # epoch 1, step 0 (8 images, batch 4)
    voc = make_voc(tmp_path / "voc", n_train=8, n_val=2)
    capsys.readouterr()
    code = segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 4, "--epochs", 3,
                   "-j", 0, "--device", "cpu", "--output", tmp_path / "out", "--experiment", "c")
    out, err = capsys.readouterr()
    assert code == 130
    assert read_checkpoint(tmp_path / "out" / "c" / "recovery.pth.tar")["epoch"] == 1
    assert "best mIoU " in out and "at epoch 0:" in out
    assert "Traceback" not in err and "interrupted" not in err


def test_length_is_required():
    with pytest.raises(SystemExit) as e:
        segment("train", "somewhere")
    assert e.value.code == 2


def test_backbone_checkpoint_starts_from_classification_weights(tmp_path):
    """--backbone-checkpoint takes a classification checkpoint (ours here; the loader is the models layer's, which
    also reads the release's and timm's layouts): the trunk starts from its weights, its classifier is dropped."""
    from sequencer.models import create_model

    torch.manual_seed(3)
    classifier = create_model("sequencer2d_nano", num_classes=5, layers=(1, 1), patch_sizes=(2, 1),
                              embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
    torch.save({"state_dict": classifier.state_dict(), "arch": "sequencer2d_nano"}, tmp_path / "cls.pth.tar")
    voc = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    assert segment("train", voc, "--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 4, "--iters", 1,
                   "--lr", 1e-12, "--warmup-iters", 0, "-j", 0, "--device", "cpu", "--output", tmp_path / "out",
                   "--experiment", "ft", "--backbone-checkpoint", tmp_path / "cls.pth.tar") == 0
    trained = read_checkpoint(tmp_path / "out" / "ft" / "last.pth.tar")["state_dict"]
    trunk = {k[len("backbone.trunk."):]: v for k, v in trained.items() if k.startswith("backbone.trunk.")}
    source = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == source.keys()
    for key, value in source.items():  # one update at lr 1e-12 moves nothing visible
        torch.testing.assert_close(trunk[key], value, rtol=0, atol=1e-6)


def test_predict_into_a_file_is_one_line_before_any_work(tmp_path, capsys):
    """`segment predict ... --output FILE` (a checkpoint named by mistake) was a FileExistsError traceback."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "model.pth.tar").write_bytes(b"not touched")
    assert segment("predict", tmp_path / "a.png", "--checkpoint", tmp_path / "missing.pth.tar",
                   "--output", tmp_path / "model.pth.tar") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0] and "is a file, not a folder" in err[0], err
    assert (tmp_path / "model.pth.tar").read_bytes() == b"not touched"


def test_two_images_of_one_mask_name_are_one_line_before_any_work(tmp_path, capsys):
    """a/x.png and b/x.jpg both became OUTPUT/x.png: one mask silently replaced the other ("wrote 2 masks", 1 file)."""
    for folder, suffix in (("a", ".png"), ("b", ".jpg")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / f"x{suffix}")
    assert segment("predict", tmp_path / "a", tmp_path / "b", "--checkpoint", tmp_path / "missing.pth.tar",
                   "--output", tmp_path / "masks") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"images {tmp_path}/a/x.png and {tmp_path}/b/x.jpg would both be written to " \
        f"{tmp_path}/masks/x.png" in err[0] and "(hint: predict them into separate --output folders" in err[0], err
    assert not (tmp_path / "masks").exists()


@pytest.mark.parametrize("existing", ["x.png", "x_overlay.jpg"])
def test_a_file_no_predict_wrote_is_not_replaced(tmp_path, capsys, existing):
    """Predicting VOC's JPEGImages/x.jpg into its SegmentationClass/ replaced the ground-truth x.png with the
    prediction, exit 0; so did an overlay a user's x_overlay.jpg. Refused before the checkpoint is read."""
    (tmp_path / "images").mkdir()
    (tmp_path / "truth").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "x.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "truth" / existing)
    before = (tmp_path / "truth" / existing).read_bytes()
    assert segment("predict", tmp_path / "images", "--checkpoint", tmp_path / "missing.pth.tar", "--overlay",
                   "--output", tmp_path / "truth") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}/truth/{existing} exists and is not marked as written by `sequencer " \
        "segment predict` (nor are its files from before 2026-12-07); refusing to replace it" in err[0], err
    assert (tmp_path / "truth" / existing).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == [existing]


def test_a_new_run_without_the_model_flags_gets_the_documented_model(monkeypatch):
    """The model flags default to "not given" so that a resume takes its checkpoint's; a new run still gets
    SegmentConfig's documented model (the --help defaults), recorded as not given, and what a flag gives is taken."""
    import sequencer.commands.segment as segment_command
    import sequencer.engine.segmentation as segment_engine
    from sequencer.engine.segmentation_config import SegmentConfig

    got = []
    for module in (segment_engine, segment_command):  # the command imports it at its top, or inside its run
        monkeypatch.setattr(module, "run_segmentation", lambda cfg: got.append(cfg) or _stop(),
                            raising=module is segment_engine)
    model = ("backbone", "backbone_kwargs", "head", "head_channels", "out_channels", "aux_head")
    for flags, expected in [((), {}), (("--head", "fpn", "--backbone-kwargs", "layers=(1,1)"),
                                       dict(head="fpn", backbone_kwargs={"layers": (1, 1)})),
                            (("--no-aux-head",), dict(aux_head=False))]:
        with pytest.raises(_Stopped):
            segment("train", "somewhere", "--epochs", 1, *flags)
        cfg = got.pop()
        assert {k: getattr(cfg, k) for k in model} == {**{k: getattr(SegmentConfig(), k) for k in model}, **expected}
        assert set(cfg._given) & set(model) == set(expected)


class _Stopped(Exception):
    pass


def _stop():
    raise _Stopped


def test_validate_without_workers_uses_the_cpus_this_process_may_run_on(monkeypatch):
    """`segment validate` without -j gets classification validate's default: at most 4 workers, no more than the
    CPUs in this process's affinity (torch's DataLoader warns past it); before, the training default 4 always."""
    import os

    import sequencer.engine.segmentation_eval as segment_eval

    got = []
    monkeypatch.setattr(segment_eval, "validate_segmenter", lambda *a, **kw: got.append(kw["workers"]) or _stop())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    for flags, expected in [((), 1), (("-j", 3), 3)]:
        with pytest.raises(_Stopped):
            segment("validate", "somewhere", "--checkpoint", "c.pth", *flags)
        assert got.pop() == expected
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    with pytest.raises(_Stopped):
        segment("validate", "somewhere", "--checkpoint", "c.pth")
    assert got.pop() == 4


@pytest.mark.slow
def test_torchcompile_trains_compiled_and_validates_to_the_logged_miou(tmp_path, capsys):
    """`--torchcompile BACKEND`, as `sequencer train` has it (it was an unrecognized argument here): the training
    steps run through torch.compile (aot_eager: its graph capture without inductor's C++ build) with eager's loss;
    evaluation stays eager, so `segment validate` gives the logged mIoU. An unknown backend is one line before
    anything is written."""
    voc = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    flags = ("--num-classes", 3, *TINY_SEGMENTER, "--img-size", 32, "-b", 2, "--epochs", 1, "--warmup-iters", 1,
             "-j", 0, "--device", "cpu", "--output", tmp_path / "out")
    assert segment("train", voc, *flags, "--torchcompile", "nosuch", "--experiment", "bad") == 2
    assert capsys.readouterr().err.startswith("sequencer segment: error: --torchcompile nosuch: unknown "
                                              "torch.compile backend (hint: backends: ")
    assert not (tmp_path / "out").exists()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert segment("train", voc, *flags, "--torchcompile", "aot_eager", "--experiment", "compiled") == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the steps ran compiled graphs
    assert segment("train", voc, *flags, "--experiment", "eager") == 0
    compiled, eager = (_summary(tmp_path / "out" / name)[0] for name in ("compiled", "eager"))
    assert float(compiled["train_loss"]) == pytest.approx(float(eager["train_loss"]), rel=1e-4)
    results = tmp_path / "r.json"
    assert segment("validate", voc, "--checkpoint", tmp_path / "out" / "compiled" / "last.pth.tar", "-j", 0,
                   "--device", "cpu", "--results-file", results) == 0
    assert f"{json.loads(results.read_text())['miou']:.4f}" == compiled["eval_miou"]
