"""Segmentation from Python as classification is: ``sequencer.train_segmenter`` takes a SegmentConfig and/or
keywords (checked as ``sequencer.train``'s, the caller's config never changed, callbacks after every epoch),
``sequencer.validate_segmenter`` returns a typed result for a checkpoint or a model in memory, and
docs/segmentation.md's "From Python" example runs exactly as written."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import sequencer
from segmentation_helpers import make_voc
from sequencer.engine.segmentation import SegmentConfig, SegmentResult, train_segmenter
from sequencer.engine.segmentation_eval import SegmentValidationResult, validate_segmenter
from sequencer.models.loading import read_checkpoint
from sequencer.models.segmentation import create_segmenter

DOCS = Path(__file__).resolve().parents[2] / "docs" / "segmentation.md"
MARKER = "tests/engine/test_segmentation_api.py"
TINY_BACKBONE = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
TINY = dict(num_classes=3, backbone="sequencer2d_nano", backbone_kwargs=TINY_BACKBONE, head_channels=16,
            out_channels=16, img_size=32, batch_size=4, lr=6e-3, warmup_iters=2, workers=0, device="cpu",
            log_interval=1000)


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("seg") / "voc", n_train=8, n_val=3)


def _state_dict(path) -> dict:
    return read_checkpoint(path)["state_dict"]


# ------------------------------------------------------------------------------------------------- settings
def test_keywords_and_a_config_give_the_same_run_and_the_config_is_not_changed(voc, tmp_path):
    cfg = SegmentConfig(data=str(voc), epochs=1, output=str(tmp_path), experiment="from-config", **TINY)
    before, given = copy.deepcopy(dataclasses.asdict(cfg)), set(cfg._given)
    from_config = train_segmenter(cfg, progress=False)
    # the data positionally, everything else as keywords; keywords win over a config's fields
    from_keywords = train_segmenter(voc, epochs=1, output=tmp_path, experiment="from-keywords", progress=False,
                                    **TINY)
    overridden = train_segmenter(cfg, experiment="overridden", img_size=16, progress=False)
    assert dataclasses.asdict(cfg) == before and cfg._given == given  # never changed, nor its given fields
    assert isinstance(from_config, SegmentResult) and from_config.output_dir == tmp_path / "from-config"

    def numbers(result):  # repr: a class without IoU is nan in both, and nan != nan
        return [{k: repr(v) for k, v in row.items() if k != "epoch_seconds"} for row in result.summary]
    assert numbers(from_config) == numbers(from_keywords)
    a, b = _state_dict(from_config.checkpoint), _state_dict(from_keywords.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(overridden.checkpoint)["data_config"]["img_size"] == 16


def test_only_the_fields_set_count():
    cfg = SegmentConfig(data="x", epochs=2, stride=None)
    cfg.lr = 1e-3
    from sequencer.engine.config import given_settings
    assert given_settings(cfg) == {"data": "x", "epochs": 2, "lr": 1e-3}  # None means the default


@pytest.mark.parametrize("settings, message", [
    (dict(epochs="3"), r"^train_segmenter: `epochs='3'` is not an int or None$"),
    (dict(epochs=2.5), r"^train_segmenter: `epochs=2.5` is not an int or None$"),
    (dict(epochs=1, lr="fast"), r"^train_segmenter: `lr='fast'` is not a number$"),
    (dict(epochs=1, backbone_kwargs=[1]), r"^train_segmenter: `backbone_kwargs=\[1\]` is not a dict$"),
    (dict(epochs=1, img_sise=32), r"^train_segmenter: unknown key\(s\) img_sise \(hint: did you mean `img_size`\?"),
    (dict(epochs=1, warmup_iters=-1), r"^`warmup_iters=-1`: must not be negative$"),
    # numbers the schedule and optimiser took as given: a min_lr above lr made the poly "decay" climb
    (dict(epochs=1, min_lr=1e-3), r"^`min_lr=0.001`: must be at least 0 and below lr \(6e-05\)$"),
    (dict(epochs=1, poly_power=float("nan")), r"^`poly_power=nan`: must be a positive number$"),
    (dict(epochs=1, weight_decay=-0.01), r"^`weight_decay=-0.01`: must be a number, at least 0$"),
    (dict(epochs=1, warmup_ratio=2.0), r"^`warmup_ratio=2.0`: must be between 0 and 1"),
    (dict(epochs=1, clip_grad=0.0), r"^`clip_grad=0.0`: must be a positive number$"),
    # the checkpoint manager read "loss" as lower-is-better: model_best was the epoch of the lowest mIoU
    (dict(epochs=1, eval_metric="loss"), r"^`eval_metric=loss`: segment train keeps the best checkpoint by mIoU"),
    (dict(epochs=1, stride=600), r"^`stride=600` is longer than the 512-pixel sliding window"),
    (dict(epochs=1, dist_bn="none"), r"^`dist_bn=none`: use reduce \(the ranks' mean BatchNorm statistics\) or "
                                     r"broadcast \(rank 0's\)$"),
    # UperNet batch-normalises a 1x1 pooled map: one image is one value per channel (a ValueError at step 0 before)
    (dict(epochs=1, batch_size=1), r"^`batch_size=1` with `head=upernet`: .* needs 2 or more images per batch "
                                   r"\(hint: use `batch_size=2` or more, or `head=fpn`\)$"),
    # so does the FPN head its stride-32 level at a crop of 32 px or less (the auxiliary head too, at 16): a
    # ValueError at the first step, after the experiment folder was made
    (dict(epochs=1, batch_size=1, head="fpn", aux_head=True, img_size=16),
     r"^`batch_size=1` and `img_size=16` with `head=fpn`: its stride-32 level \(1x1 at a 16-px crop\) is "
     r"batch-normalised in training, .* \(hint: use `batch_size=2` or more, or `img_size=33` or more\)$"),
    (dict(epochs=1, batch_size=1, head="fpn", img_size=32), r"^`batch_size=1` and `img_size=32` with `head=fpn`: "),
    (dict(epochs=1, batch_size=1, img_size=32), r"\(hint: use `batch_size=2` or more\)$"),  # fpn would fail too
])
def test_a_bad_setting_is_one_line_naming_it_and_nothing_is_written(voc, tmp_path, settings, message):
    with pytest.raises(sequencer.SequencerError) as caught:
        train_segmenter(voc, output=tmp_path / "out", progress=False, **settings)
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_truncated_validation_image_is_one_line_before_the_run(tmp_path):
    """Its header reads fine, so the pair check passed it: the run trained, wrote its folder, then stopped at its first
    evaluation (hours into an ADE20K run with `eval_interval=13`)."""
    from PIL import Image

    data = make_voc(tmp_path / "voc", n_train=4, n_val=2)
    png = data / "JPEGImages" / "val_001.png"
    image = png.with_suffix(".jpg")
    Image.open(png).save(image, quality=95)
    png.unlink()
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])  # the header intact, half the scan gone
    with pytest.raises(sequencer.SequencerError, match=r"^image .*val_001.jpg is unreadable \(image file is truncated"):
        train_segmenter(data, epochs=1, output=tmp_path / "out", progress=False, **dict(TINY, batch_size=2))
    assert not (tmp_path / "out").exists()


def test_the_data_given_twice_and_a_callback_that_is_not_callable_are_refused(voc):
    with pytest.raises(sequencer.SequencerError, match="data given twice"):
        train_segmenter(voc, data=str(voc), epochs=1)
    with pytest.raises(sequencer.SequencerError, match="callbacks holds 3, which is not callable"):
        train_segmenter(voc, epochs=1, callbacks=[3])


def test_a_callback_sees_each_epochs_numbers_and_true_stops_the_run(voc, tmp_path):
    seen = []

    def stop_after_first(metrics):
        seen.append(metrics)
        return True

    result = train_segmenter(voc, epochs=3, output=tmp_path, experiment="cb", callbacks=stop_after_first,
                             progress=False, **TINY)
    assert [m["epoch"] for m in seen] == [0] and [r["epoch"] for r in result.summary] == [0]
    assert type(seen[0]["epoch"]) is int and all(type(v) is float for k, v in seen[0].items() if k != "epoch")
    assert seen[0]["eval_miou"] == pytest.approx(result.summary[0]["eval_miou"])
    assert {"iou_class_0", "iou_class_1", "iou_class_2", "lr", "train_loss"} <= seen[0].keys()
    assert not result.interrupted and result.exit_code == 0


def test_an_epoch_not_evaluated_reaches_the_callback_as_nan(voc, tmp_path):
    seen = []
    train_segmenter(voc, epochs=2, eval_interval=2, output=tmp_path, experiment="nan", progress=False,
                    callbacks=[seen.append], **TINY)
    assert math.isnan(seen[0]["eval_miou"]) and not math.isnan(seen[1]["eval_miou"])


# ---------------------------------------------------------------------------------------------------- exports
def test_segmentation_is_exported_from_the_package():
    import sequencer.engine.segmentation as seg
    import sequencer.engine.segmentation_eval as seg_eval
    expected = dict(train_segmenter=seg.train_segmenter, SegmentConfig=seg.SegmentConfig,
                    SegmentResult=seg.SegmentResult, validate_segmenter=seg_eval.validate_segmenter,
                    SegmentValidationResult=seg_eval.SegmentValidationResult, create_segmenter=create_segmenter)
    for name, obj in expected.items():
        assert name in sequencer.__all__ and getattr(sequencer, name) is obj


# ---------------------------------------------------------------------------------------------- validation
def test_validate_a_model_in_memory_as_its_checkpoint(voc, tmp_path):
    """A trained segmenter in memory scores what its checkpoint scores with the same settings; it goes back to
    the mode it was in; the results file holds the result's fields."""
    result = train_segmenter(voc, epochs=1, output=tmp_path, experiment="v", progress=False, **TINY)
    from_file = validate_segmenter(result.checkpoint, voc, results_file=str(tmp_path / "r.json"))
    assert isinstance(from_file, SegmentValidationResult) and from_file["miou"] == from_file.miou
    assert from_file.miou == pytest.approx(result.best_miou, abs=5e-5)
    assert list(from_file.per_class_iou) == ["class_0", "class_1", "class_2"]
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(from_file.as_dict()))
    model = create_segmenter("sequencer2d_nano", 3, head="upernet", head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE, aux_head=True)  # segment train's upernet has one
    model.load_state_dict(_state_dict(result.checkpoint))
    in_memory = validate_segmenter(data=voc, model=model, eval_size=32)
    assert model.training  # put back in train mode, as it was given
    assert in_memory.checkpoint == "" and in_memory.images == from_file.images == 3
    assert in_memory.miou == pytest.approx(from_file.miou, abs=1e-9)
    assert in_memory.per_class_iou == pytest.approx(from_file.per_class_iou, nan_ok=True)
    with pytest.raises(sequencer.SequencerError, match="a checkpoint or a model in memory"):
        validate_segmenter(result.checkpoint, voc, model=model)
    with pytest.raises(sequencer.SequencerError, match="no dataset folder given"):
        validate_segmenter(result.checkpoint)
    with pytest.raises(sequencer.SequencerError, match="has no `num_classes`"):
        validate_segmenter(data=voc, model=torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(sequencer.SequencerError, match="`model` Segmenter holds float16 weights"):
        validate_segmenter(data=voc, model=model.half())  # (ATen's dtype error from the first batch before)


# ---------------------------------------------------------------------------------------------------- docs
def docs_example() -> str:
    """The first ```python block after the paragraph that names this test."""
    text = DOCS.read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    make_voc(tmp_path / "shapes", n_train=8, n_val=3)
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "docs_example"}
    exec(compile(docs_example(), str(DOCS), "exec"), ns)
    result, scores, history = ns["result"], ns["scores"], ns["history"]
    assert [m["epoch"] for m in history] == [r["epoch"] for r in result.summary]
    assert len(history) == 2 or history[-1]["eval_miou"] > 95
    assert result.output_dir == Path("runs/seg/try") and result.checkpoint.is_file()
    assert scores.miou == pytest.approx(result.best_miou, abs=5e-5)
    assert set(scores.per_class_iou) == {"class_0", "class_1", "class_2"}
    assert ns["untrained"].images == 3 and ns["model"].training


class _ChannelArgmax(torch.nn.Module):
    """A segmenter in memory whose class at a pixel is the largest of its three normalised colour channels; its
    fourth class is never predicted."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the evaluation reads the device

    def forward(self, images):
        return torch.cat([images, torch.full_like(images[:, :1], -1e4)], dim=1)


def test_validate_scores_ade20k_as_a_numpy_confusion_matrix_does(tmp_path):
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU of `validate_segmenter` on an ADE20K folder are
    those of a numpy confusion matrix over the masks as the benchmark reads them: label 0 ("other") and 255 left out
    (reduce-zero-label: label k is class k - 1), class 3 (label 4) in neither the labels nor the predictions without
    an IoU and out of the means, a class predicted but never labelled (class 2) at IoU 0. The images' short side is
    the evaluation size, so that no resize stands between the model's logits and the masks."""
    import numpy as np
    from PIL import Image
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rng = np.random.default_rng(0)
    root = tmp_path / "ade"
    confusion = np.zeros((4, 4), np.int64)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate([(40, 53), (61, 40), (40, 40)]):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            labels = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(h, w), p=[0.2, 0.35, 0.35, 0.1])
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(labels).save(root / "annotations" / split / f"{i}.png")
            if split == "validation":
                normalised = (image / 255.0 - IMAGENET_DEFAULT_MEAN) / IMAGENET_DEFAULT_STD
                pred = normalised.argmax(-1)
                scored = (labels != 0) & (labels != 255)
                np.add.at(confusion, (labels[scored].astype(np.int64) - 1, pred[scored]), 1)
    hits, labelled, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore"):
        iou, accuracy = hits / (labelled + predicted - hits), hits / labelled
    assert np.isnan(iou[3]) and iou[2] == 0 and labelled[2] == 0 < predicted[2]  # the cases the test is for

    result = validate_segmenter(data=root, split="validation", model=_ChannelArgmax(), eval_size=40)
    assert result.pixels == confusion.sum() and result.images == 3
    assert result.miou == pytest.approx(100 * np.nanmean(iou), abs=1e-9)
    assert result.pixel_acc == pytest.approx(100 * hits.sum() / confusion.sum(), abs=1e-9)
    assert result.macc == pytest.approx(100 * np.nanmean(accuracy), abs=1e-9)
    assert [result.per_class_iou[f"class_{k}"] for k in range(3)] == pytest.approx(list(100 * iou[:3]), abs=1e-9)
    assert math.isnan(result.per_class_iou["class_3"])
