"""Segmentation engine: metrics vs hand-computed values, sliding-window inference, the heads under autocast and
compile, and training runs (resume auto continues a stopped run exactly)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import subprocess
import re
import sys

import pytest
import torch
from torch import nn

from segmentation_helpers import make_ade20k, make_voc, signal_in_training_step
from sequencer.engine import segmentation as seg_engine
from sequencer.engine.segmentation import SegmentConfig, train_segmenter
from sequencer.engine.train import TrainingInterrupted
from sequencer.engine.segmentation_eval import (InferenceSettings, _window_starts, confusion_matrix, image_logits,
                                                inference_settings, segmentation_metrics)
from sequencer.errors import SequencerError
from sequencer.models.kernels import onednn_bf16_supported
from sequencer.models.segmentation import create_segmenter
from sequencer.engine.outputs import read_summary
from sequencer.models.loading import read_checkpoint

TINY_BACKBONE = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))


def tiny_config(data, output, **kw) -> SegmentConfig:
    settings = dict(data=str(data), num_classes=3, backbone="sequencer2d_nano", backbone_kwargs=TINY_BACKBONE,
                    head_channels=16, out_channels=16, img_size=32, batch_size=8, lr=6e-3, warmup_iters=2,
                    workers=0, device="cpu", output=str(output), log_interval=1000)
    settings.update(kw)
    return SegmentConfig(**settings)


# --------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 1], [0, 2, 0], [1, 0, 1]]  # the 255 pixel is left out
    m = segmentation_metrics(conf, ["a", "b", "c"])
    # IoU a = 1 / (3 + 2 - 1), b = 2 / (2 + 3 - 2), c = 1 / (2 + 2 - 1)
    iou = [1 / 4, 2 / 3, 1 / 3]
    assert m["per_class_iou"] == pytest.approx({"a": 25.0, "b": 200 / 3, "c": 100 / 3})
    assert m["miou"] == pytest.approx(100 * sum(iou) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert m["macc"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 2) / 3)
    assert m["pixels"] == 7


def test_a_class_absent_everywhere_is_left_out_of_the_mean():
    conf = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3)
    m = segmentation_metrics(conf, ["a", "b", "c"])
    assert math.isnan(m["per_class_iou"]["c"]) and m["miou"] == pytest.approx(100.0)


def test_logits_that_are_not_numbers_give_no_miou(caplog):
    """argmax reads NaN as the top class: a model whose logits are all NaN scored the mIoU of a constant mask."""
    masks = [torch.tensor([[[0, 0, 1], [2, 2, 1]]]), torch.tensor([[[1, 0], [2, 255]]])]
    loader = [(torch.randn(1, 3, *m.shape[-2:]), m) for m in masks]
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)
    good = seg_engine.evaluate_segmentation(model, loader, 3, ["a", "b", "c"], InferenceSettings("whole"))
    assert good["nonfinite"] == 0 and math.isfinite(good["miou"]) and good["images"] == 2
    with torch.no_grad():
        model.bias[1] = float("nan")
    broken = seg_engine.evaluate_segmentation(model, loader, 3, ["a", "b", "c"], InferenceSettings("whole"))
    assert broken["nonfinite"] == 2 and all(math.isnan(broken[k]) for k in ("miou", "pixel_acc", "macc"))
    assert all(math.isnan(v) for v in broken["per_class_iou"].values())
    assert "2 of 2 images gave logits that are NaN or +inf" in caplog.text


# ------------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("length,crop,stride,expected", [(10, 10, 6, [0]), (8, 10, 6, [0]), (20, 10, 6, [0, 6, 10]),
                                                          (22, 10, 4, [0, 4, 8, 12]), (16, 10, 6, [0, 6])])
def test_sliding_windows_cover_the_image(length, crop, stride, expected):
    assert _window_starts(length, crop, stride) == expected


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    """A 1x1 convolution sees no context, so averaging overlapping windows must give the whole image's logits."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    image = torch.randn(1, 3, 37, 50)
    whole = image_logits(model, image, InferenceSettings("whole"))
    slide = image_logits(model, image, InferenceSettings("slide", crop=16, stride=10))
    assert slide.shape == (1, 4, 37, 50)
    torch.testing.assert_close(slide, whole)


def test_a_stride_longer_than_the_window_is_refused():
    """Windows of 32 px every 50 on a 100-px side start at 0, 50 and 68: rows 32..49 got no logits, a 0/0 NaN that
    argmax read as class 0, silently."""
    cpu = torch.device("cpu")
    with pytest.raises(SequencerError, match=r"^`stride=50` is longer than the 32-pixel sliding window: the pixels "
                                             r"between windows would get no prediction \(hint: use `stride=32`"):
        inference_settings(dict(img_size=32, stride=50), "slide", None, cpu)
    with pytest.raises(SequencerError, match=r"^`stride=33` is longer"):
        inference_settings(dict(img_size=32), "slide", 33, cpu)
    assert inference_settings(dict(img_size=32, stride=50), "slide", 32, cpu).stride == 32  # the override wins
    assert inference_settings(dict(img_size=32, stride=50), "whole", None, cpu).mode == "whole"  # no windows


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_segmenter_logits_for_any_size_eager_and_bf16_autocast(head):
    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE).eval()
    image = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        logits = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(image)
    assert logits.shape == low.shape == (2, 3, 45, 61)
    assert torch.isfinite(low.float()).all()
    # bf16 keeps ~3 significant digits: compared with a tolerance on the logits' scale, not bitwise
    assert (low.float() - logits).abs().max() <= 0.1 * logits.abs().max() + 0.05


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_logits_at_a_side_off_the_stride_are_the_padded_images_cropped(head):
    """The backbone pads the input at the right and bottom, so a 65 x 49 image and it zero-padded to 68 x 52 give one
    set of maps (17 x 13 cells at stride 4); the logits must then be the padded image's, cropped. Resizing the 17
    stride-4 cells (68 px) onto 65 px stretched them: the last row read 3 px off (fpn: 864 of 3,185 pixels' classes
    changed)."""
    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE, aux_head=head == "upernet").eval()
    image = torch.randn(1, 3, 65, 49)
    padded = nn.functional.pad(image, (0, 3, 0, 3))
    with torch.no_grad():
        logits, aux = model(image, aux=True)
        padded_logits, padded_aux = model(padded, aux=True)
    assert logits.shape == (1, 3, 65, 49)
    torch.testing.assert_close(logits, padded_logits[..., :65, :49], rtol=0, atol=1e-6)
    if aux is not None:  # the auxiliary head's stride-16 logits alike
        torch.testing.assert_close(aux, padded_aux[..., :65, :49], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_a_head_brings_each_level_to_the_finer_ones_cells_without_stretching(head):
    """Level maps of a 228-px side (57, 29, 15 and 8 cells at strides 4..32) are the first cells of a 256-px side's
    (64, 32, 16, 8): the logits' first 40 cells (160 px, out of reach of the crop's edge through the 3x3
    convolutions) must be the larger maps'. Resizing a coarser level onto a finer one's cells stretched it where
    the two are not exactly 2x (29 -> 57; fpn's stride-32 level, 8 cells doubled to 64, squeezed onto 57)."""
    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE).eval()
    large = [torch.randn(1, 16, 256 // s, 256 // s) for s in (4, 8, 16, 32)]
    cropped = [level[..., :-(-228 // s), :-(-228 // s)] for level, s in zip(large, (4, 8, 16, 32))]
    with torch.no_grad():
        logits, reference = model.head(cropped), model.head(large)
    assert logits.shape[-2:] == (57, 57)
    torch.testing.assert_close(logits[..., :40, :40], reference[..., :40, :40], rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_heads_compiled_match_eager(head):
    """The heads traced whole by torch.compile (fullgraph, aot_eager: the graph capture without inductor's C++
    build, which takes a minute a head on CI's two cores). The backbone's compiled path is the models layer's test."""
    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE).eval()
    image = torch.randn(1, 3, 32, 40)
    with torch.inference_mode():
        features = list(model.backbone(image).values())
        eager = model.head(features)
        compiled = torch.compile(model.head, backend="aot_eager", fullgraph=True)(features)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- auxiliary head, FPN convs
def test_upernet_trains_with_the_auxiliary_head_and_infers_without_it():
    """mmsegmentation's UperNet recipe: an FCN head on the stride-16 map adds 0.4 x its cross-entropy in training
    (every parameter gets a gradient, as DDP needs); the plain call (evaluation, predict) runs none of it."""
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head="upernet", head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE, aux_head=True)
    assert model.config["aux_head"] is True
    conv, _, classifier = model.aux_head[0][0], model.aux_head[1], model.aux_head[2]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, classifier.out_channels) == (16, 256, (3, 3), 3)
    images, masks = torch.randn(2, 3, 32, 24), torch.randint(0, 3, (2, 32, 24))
    masks[:, :4] = 255
    calls = []
    model.aux_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2:]))
    model.train()
    logits, aux = model(images, aux=True)
    assert calls == [(2, 2)] and aux.shape == logits.shape == (2, 3, 32, 24)  # the stride-16 map, resized
    loss = seg_engine.segmentation_loss(logits, masks, aux)
    by_hand = (nn.functional.cross_entropy(logits, masks, ignore_index=255)
               + 0.4 * nn.functional.cross_entropy(aux, masks, ignore_index=255))
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.01, layer_decay=0.9)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, the aux head's included
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 3, 32, 24)
        image_logits(model, images[:1], InferenceSettings("whole", 32))
        image_logits(model, images[:1], InferenceSettings("slide", 16, 8))  # validate's and predict's call
    assert len(calls) == 1  # the training forward's only
    # the library's default: a plain forward uses every parameter (a caller's own DDP loop); segment train adds it
    no_aux = create_segmenter("sequencer2d_nano", 3, head="upernet", head_channels=16, out_channels=16,
                              backbone_kwargs=TINY_BACKBONE)
    assert no_aux.aux_head is None and no_aux.config["aux_head"] is False
    assert not any(k.startswith("aux_head.") for k in no_aux.state_dict())
    assert no_aux.train()(images, aux=True)[1] is None


def test_semantic_fpn_has_the_fpn_necks_output_convs():
    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head="fpn", head_channels=16, out_channels=16,
                             backbone_kwargs=TINY_BACKBONE).eval()
    assert model.config["fpn_convs"] is True and model.config["aux_head"] is False and model.aux_head is None
    convs = model.head.fpn_convs
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs]
    assert shapes == [(16, 16, (3, 3), (1, 1))] * 4
    seen = []
    for conv in convs:
        conv.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen == [(8, 8), (4, 4), (2, 2), (1, 1)]  # each merged level, strides 4..32


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_a_checkpoint_from_before_the_aux_head_and_fpn_convs_loads_as_it_was_trained(head, tmp_path):
    """A config without ``aux_head`` / ``fpn_convs`` (checkpoints before 2026-12-07) builds the head those had: its
    state_dict loads strictly and gives the same logits, in validate/predict and in a resume."""
    from sequencer.engine.segmentation_eval import load_segmenter

    torch.manual_seed(0)
    old = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=16, out_channels=16,
                           backbone_kwargs=TINY_BACKBONE, aux_head=False, fpn_convs=False).eval()
    config = {k: v for k, v in old.config.items() if k not in ("aux_head", "fpn_convs")}
    state = old.state_dict()
    assert not any(".fpn_convs." in k or k.startswith("aux_head.") for k in state)
    path = tmp_path / "old.pth.tar"
    torch.save(dict(state_dict=state, segmenter=config, class_names=["a", "b", "c"], data_config={}), path)
    loaded = load_segmenter(str(path)).model  # load_state_dict is strict
    image = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(loaded(image), old(image))
    cfg = seg_engine._resumed_architecture(SegmentConfig(data="d", epochs=1, resume=str(path)),
                                           dict(segmenter=config), seg_engine.RunState())
    assert cfg.aux_head is False


@pytest.mark.parametrize("head,aux_head", [("upernet", True), ("fpn", False), ("fpn", True)])
def test_the_batch_norm_maps_the_check_reads_are_the_ones_a_training_step_normalises(head, aux_head):
    """``batch_norm_maps`` (what ``segment train`` checks before the run) gives each part's smallest BatchNorm map as
    a training forward has it, and a one-image step fails exactly where it says a map has one cell."""
    from sequencer.models.segmentation import batch_norm_maps

    torch.manual_seed(0)
    model = create_segmenter("sequencer2d_nano", 3, head=head, head_channels=8, out_channels=8,
                             backbone_kwargs=TINY_BACKBONE, aux_head=aux_head).train()
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            part = "aux_head=True" if name.startswith("aux_head.") else f"head={head}"
            module.register_forward_pre_hook(
                lambda m, args, part=part: seen.setdefault(part, []).append(args[0][0, 0].numel()))
    for crop in (16, 17, 32, 33):
        seen.clear()
        model(torch.randn(2, 3, crop, crop), aux=True)
        expected = batch_norm_maps(head, aux_head, crop)
        assert {part: min(cells) for part, cells in seen.items()} == {m.part: m.cells for m in expected}, crop
        one_cell = any(m.cells < 2 for m in expected)
        assert one_cell == (head == "upernet" or crop <= 32)
        if one_cell:
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                model(torch.randn(1, 3, crop, crop), aux=True)
        else:
            model(torch.randn(1, 3, crop, crop), aux=True)


# ------------------------------------------------------------------------------------------------- training
def test_config_needs_one_length(tmp_path):
    with pytest.raises(SequencerError, match=r"`iters=N` .* or `epochs=N`"):
        train_segmenter(tiny_config(tmp_path, tmp_path / "out"))
    with pytest.raises(SequencerError, match="`resume=auto` needs `experiment=NAME`"):
        train_segmenter(tiny_config(tmp_path, tmp_path / "out", epochs=1, resume="auto"))


def test_progress_false_prints_nothing_and_keeps_the_callers_random_state(tmp_path, capfd):
    """A library call with progress=False writes nothing on stdout or stderr (its records still reach the caller's
    own handlers) and leaves the caller's random state as it was, as sequencer.train."""
    data = make_voc(tmp_path / "voc", n_train=8, n_val=2)
    records = []
    collector = logging.Handler(logging.INFO)
    collector.emit = records.append
    logger = logging.getLogger("sequencer")
    level = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    capfd.readouterr()
    try:
        result = train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, experiment="quiet", log_interval=1),
                                 progress=False)
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)
    assert capfd.readouterr() == ("", "")
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert result.checkpoint.is_file()
    assert any("segment train: epoch 0 train_loss" in r.getMessage() for r in records)


def assert_summary_is_the_csvs_numbers(result) -> None:
    """``result.summary``: summary.csv's rows as numbers (epoch an int, the rest floats, nan for an empty cell)."""
    written = read_summary(result.output_dir / "summary.csv")
    assert len(result.summary) == len(written) > 0
    for row, text in zip(result.summary, written):
        assert list(row) == list(text)
        assert type(row["epoch"]) is int and row["epoch"] == int(text["epoch"])
        for key, value in text.items():
            if key != "epoch":
                assert type(row[key]) is float, key
                assert math.isnan(row[key]) if value in ("", "nan") else row[key] == float(value), key


def test_iters_sets_the_length_and_the_poly_schedule_ends_at_min_lr(tmp_path, monkeypatch):
    """(And a UperNet run's every update has the auxiliary head's loss; its evaluations run none of the head.) Each
    row's lr is the one its epoch's last update used, as train's: the last row said 0.0, the lr after the run, which
    no update used."""
    from sequencer.models import segmentation as seg_models

    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    loss, aux_forward, given, aux_calls = seg_engine.segmentation_loss, seg_models.AuxFCNHead.forward, [], []
    monkeypatch.setattr(seg_engine, "segmentation_loss", lambda *a: given.append(a[2] is not None) or loss(*a))
    monkeypatch.setattr(seg_models.AuxFCNHead, "forward",
                        lambda self, x: aux_calls.append(self.training) or aux_forward(self, x))
    result = train_segmenter(tiny_config(data, tmp_path / "out", iters=5, experiment="it", eval_interval=2))
    assert given == aux_calls == [True] * 5
    rows = result.summary
    # 16 images / batch 8 = 2 updates per epoch: 5 updates = epochs 0, 1 and half of 2
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # warmup 2, then poly (power 1) over 3 updates: the epochs end with updates 1, 3 and 4
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 4e-3, 2e-3], rel=1e-5)
    after_the_run = read_checkpoint(result.output_dir / "last.pth.tar")["optimizer"]["param_groups"][0]["lr"]
    assert after_the_run == 0.0  # the schedule ends at min_lr
    # evaluated every second epoch and after the last: the epoch not evaluated has nan there (an empty cell)
    assert math.isnan(rows[0]["eval_miou"]) and math.isnan(rows[0]["iou_class_0"])
    assert 0 <= rows[1]["eval_miou"] <= 100 and 0 <= rows[2]["eval_miou"] <= 100
    assert_summary_is_the_csvs_numbers(result)
    assert not result.interrupted and result.exit_code == 0
    best = max((r for r in rows[1:]), key=lambda r: r["eval_miou"])
    assert result.best_miou == best["eval_miou"] and result.best_epoch == best["epoch"]
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt["segmenter"]["num_classes"] == 3 and ckpt["data_config"]["img_size"] == 32
    assert ckpt["segmenter"]["aux_head"] is True and "aux_head.2.weight" in ckpt["state_dict"]


def test_a_warmup_as_long_as_the_run_becomes_a_quarter_of_it_with_a_warning(tmp_path):
    """The recipes' --warmup-iters 1500 on a short try would warm up throughout: 8 updates get a warmup of 2, said in
    one warning, and the lr of epoch 0's last update (its 4th) is the one timm's poly schedule with that warmup
    gives."""
    from timm.scheduler import PolyLRScheduler

    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    cfg = tiny_config(data, tmp_path / "out", iters=8, batch_size=4, experiment="w", warmup_iters=1500)
    with pytest.warns(UserWarning, match=r"`warmup_iters=1500` is not below the run's 8 updates: the lr would never "
                                         r"leave warmup; using `warmup_iters=2`"):
        rows = train_segmenter(cfg).summary
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = PolyLRScheduler(reference, t_initial=6, power=cfg.poly_power, lr_min=cfg.min_lr, warmup_t=2,
                               warmup_lr_init=cfg.lr * cfg.warmup_ratio, warmup_prefix=True, t_in_epochs=False)
    schedule.step_update(3)
    assert rows[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-5)  # 5/6 lr; 1500: 3/1500 lr


def test_resume_auto_continues_a_stopped_run_exactly(tmp_path, monkeypatch, caplog):
    """A run stopped by SIGTERM after epoch 1 and continued with --resume auto ends with the weights of a run
    that was never stopped (same batches, augmentation draws and schedule), and says it makes the updates left (it
    said "epochs 2..2 (6 updates)", the whole run's)."""
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    straight = train_segmenter(tiny_config(data, tmp_path / "out", epochs=3, experiment="straight"))

    save_epoch = seg_engine._save_epoch

    def stop_after_epoch_1(run, epoch, *args):
        save_epoch(run, epoch, *args)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler turns it into a stop after this epoch

    monkeypatch.setattr(seg_engine, "_save_epoch", stop_after_epoch_1)
    # what `segment train` runs: the SIGTERM becomes its exit status (a library call hands it on to the caller)
    stopped = seg_engine.run_segmentation(tiny_config(data, tmp_path / "out", epochs=3, experiment="stopped",
                                                      resume="auto"))
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.interrupted and len(stopped.summary) == 2
    monkeypatch.setattr(seg_engine, "_save_epoch", save_epoch)
    caplog.set_level(logging.INFO, logger="sequencer")
    caplog.clear()
    resumed = train_segmenter(tiny_config(data, tmp_path / "out", epochs=3, experiment="stopped", resume="auto"))
    assert resumed.exit_code == 0 and [r["epoch"] for r in resumed.summary] == [0, 1, 2]
    assert "; epochs 2..2 (2 of the run's 6 updates), batch 8;" in caplog.text
    assert_summary_is_the_csvs_numbers(resumed)
    a = read_checkpoint(straight.output_dir / "last.pth.tar")["state_dict"]
    b = read_checkpoint(resumed.output_dir / "last.pth.tar")["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for column in ("train_loss", "eval_miou", "lr"):
        assert [r[column] for r in resumed.summary] == [r[column] for r in straight.summary]


@pytest.mark.slow
def test_ctrl_c_mid_epoch_and_resume_goes_on_where_it_stopped_bit_for_bit(tmp_path, monkeypatch):
    """Ctrl-C in epoch 0's second step (of three), then resume: the stop is taken after that step's forward pass
    (with its loss, in one all-reduce), so the epoch goes on after its one update (not from its first batch again, as
    it did: those batches were trained twice and AdamW made extra steps) and ends with the weights, BatchNorm
    statistics and optimizer state of a run never stopped, and its loss and lr. The stopped step's forward moved
    BatchNorm's statistics: the recovery checkpoint keeps them as the update left them (else the resumed run counts
    that batch twice)."""
    data = make_voc(tmp_path / "voc", n_train=12, n_val=2)
    config = dict(epochs=1, batch_size=4, workers=1)
    straight = train_segmenter(tiny_config(data, tmp_path / "out", experiment="straight", **config), progress=False)
    signal_in_training_step(monkeypatch, signal.SIGINT, step=2)  # noticed once that step's update is made
    with pytest.raises(TrainingInterrupted):
        train_segmenter(tiny_config(data, tmp_path / "out", experiment="cut", **config), progress=False)
    assert read_checkpoint(tmp_path / "out" / "cut" / "recovery.pth.tar")["epoch_progress"]["batches"] == 1
    monkeypatch.undo()
    resumed = train_segmenter(tiny_config(data, tmp_path / "out", experiment="cut", resume="auto", **config),
                              progress=False)
    a, b = (read_checkpoint(run.output_dir / "last.pth.tar") for run in (straight, resumed))
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert [(r["train_loss"], r["lr"]) for r in resumed.summary] == \
        [(r["train_loss"], r["lr"]) for r in straight.summary]


def test_a_ddp_step_makes_one_all_reduce_and_a_non_finite_loss_stops_before_its_update(tmp_path, monkeypatch):
    """Under DDP each training step agrees on any rank's stop request and non-finite loss in one all-reduce, as
    classification's (it made two: the stop flag before the forward pass, the loss's after); the epoch adds one,
    its mean loss. Counted in a 1-process gloo group that the run takes for a DDP group (DDP's own gradient
    reduction is not a `torch.distributed.all_reduce` call)."""
    import torch.distributed as dist
    from sequencer.engine import distributed as dist_utils

    data = make_voc(tmp_path / "voc", n_train=6, n_val=1)
    config = dict(epochs=1, batch_size=2, head="fpn")  # 3 steps
    monkeypatch.setattr(dist_utils, "_callers_group", lambda device: dist_utils.DistInfo(True, 0, 0, 1, device))
    all_reduce, train_one_epoch, per_epoch = dist.all_reduce, seg_engine._train_one_epoch, []

    def counted_epoch(*args, **kwargs):
        calls = []
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or all_reduce(*a, **k))
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            monkeypatch.setattr(dist, "all_reduce", all_reduce)
            per_epoch.append(len(calls))

    monkeypatch.setattr(seg_engine, "_train_one_epoch", counted_epoch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        train_segmenter(tiny_config(data, tmp_path / "out", experiment="ddp", **config), progress=False)
        assert per_epoch == [3 + 1]
        loss = seg_engine.segmentation_loss
        monkeypatch.setattr(seg_engine, "segmentation_loss", lambda *a: loss(*a) * float("nan"))
        with pytest.raises(SequencerError, match=r"^loss is not finite \(nan\) at epoch 0 step 0; training stopped "
                                                 r"before that update and no epoch had finished"):
            train_segmenter(tiny_config(data, tmp_path / "out", experiment="nan", **config), progress=False)
        assert per_epoch == [4, 1]
    finally:
        dist.destroy_process_group()


def test_a_file_it_cannot_resume_is_refused_with_segment_trains_own_setting(tmp_path):
    """It said "not a training checkpoint written by `sequencer train`" and hinted `initial_checkpoint`, a setting
    segment train does not have."""
    data = make_voc(tmp_path / "voc", n_train=8, n_val=1)
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    with pytest.raises(SequencerError) as refused:
        train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, resume=str(tmp_path / "weights.pth")),
                        progress=False)
    assert str(refused.value) == (f"`resume={tmp_path / 'weights.pth'}`: not a training checkpoint written by "
                                  f"`sequencer segment train` (hint: use `backbone_checkpoint` to start a new run "
                                  f"from these weights)")
    assert not (tmp_path / "out").exists()


def test_resume_auto_in_a_train_folder_names_the_classifier_it_found(tmp_path):
    """It said "`resume=auto`: not a segmentation checkpoint ...", naming no file."""
    data = make_voc(tmp_path / "voc", n_train=8, n_val=1)
    folder = tmp_path / "out" / "cls"
    folder.mkdir(parents=True)
    torch.save({"arch": "sequencer2d_nano", "state_dict": {}, "epoch": 0}, folder / "last.pth.tar")
    with pytest.raises(SequencerError) as refused:
        train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, experiment="cls", resume="auto"),
                        progress=False)
    assert str(refused.value) == (f"`resume={folder / 'last.pth.tar'}`: not a segmentation checkpoint written by "
                                  f"`sequencer segment train` but a classifier of `sequencer train` (hint: resume it "
                                  f"with `sequencer train`; `backbone_checkpoint` starts a new segmenter from its "
                                  f"backbone)")
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth.tar"]


def test_a_resume_keeps_the_runs_label_mapping(tmp_path):
    """Resuming a `reduce_zero_label=False` ADE20K run without the setting took the layout's default, True: every
    class shifted by one for the rest of the run, silently (eval mIoU 13.1 -> 7.1 on a probe)."""
    data = make_ade20k(tmp_path / "ade", n_train=4, n_val=2)

    def config(**kw):
        return tiny_config(data, tmp_path / "out", experiment="e", batch_size=2, log_interval=1000, **kw)
    train_segmenter(config(epochs=1, reduce_zero_label=False), progress=False)
    resumed = train_segmenter(config(epochs=2, resume="auto"), progress=False)
    assert [r["epoch"] for r in resumed.summary] == [0, 1]
    assert read_checkpoint(resumed.output_dir / "last.pth.tar")["data_config"]["reduce_zero_label"] is False
    with pytest.raises(SequencerError, match=r"^`resume=auto`: `reduce_zero_label=True` vs the checkpoint's False "
                                             r"\(hint: leave `reduce_zero_label` unset when resuming\)$"):
        train_segmenter(config(epochs=3, resume="auto", reduce_zero_label=True), progress=False)
    # the model is the checkpoint's: another architecture given was recorded in args.yaml but not built
    for key, value, shown in [("head_channels", 8, "8` vs the checkpoint's 16"),
                              ("backbone_kwargs", {**TINY_BACKBONE, "hidden_sizes": (2, 2)}, ".*` vs the checkpoint's")]:
        with pytest.raises(SequencerError, match=rf"^`resume=auto`: `{key}={shown}.*\(hint: drop `{key}` when "
                                                 rf"resuming \(a resume keeps its model\)\)$"):
            train_segmenter(config(epochs=3, resume="auto", **{key: value}), progress=False)


def test_a_resume_trains_with_the_weight_decay_given(tmp_path):
    """The resumed optimizer's moments are the checkpoint's and its hyperparameters this start's: loading the saved
    groups as they were kept the first run's weight decay while the run recorded the new one."""
    data = make_voc(tmp_path / "voc", n_train=4, n_val=2)

    def config(**kw):
        return tiny_config(data, tmp_path / "out", experiment="e", batch_size=2, **kw)
    first = train_segmenter(config(epochs=1, weight_decay=0.01), progress=False)
    saved = read_checkpoint(first.checkpoint)["optimizer"]
    assert sorted({g["weight_decay"] for g in saved["param_groups"]}) == [0.0, 0.01]
    resumed = train_segmenter(config(epochs=2, weight_decay=0.5, resume="auto"), progress=False)
    state = read_checkpoint(resumed.output_dir / "last.pth.tar")["optimizer"]
    assert sorted({g["weight_decay"] for g in state["param_groups"]}) == [0.0, 0.5]
    # the moments went on from the checkpoint's: two epochs' updates, not one
    steps = {float(s["step"]) for s in state["state"].values()}
    assert steps == {2 * float(s["step"]) for s in saved["state"].values()}


def test_a_resume_evaluating_otherwise_picks_its_best_again(tmp_path, caplog):
    """An unchanged resume keeps its best and says nothing. Sliding windows instead of whole images measure another
    mIoU: one line names both evaluations, the best is picked again from the resumed epoch (model_best was compared
    with the earlier evaluation's best in silence) and the earlier best stays as its checkpoint-<E> file."""
    data = make_voc(tmp_path / "voc", n_train=4, n_val=2)

    def config(**kw):
        return tiny_config(data, tmp_path / "out", experiment="e", batch_size=2, checkpoint_hist=0, **kw)
    train_segmenter(config(epochs=1), progress=False)
    caplog.set_level(logging.WARNING, logger="sequencer")
    assert train_segmenter(config(epochs=2, resume="auto"), progress=False).best_epoch in (0, 1)
    assert "starts again" not in caplog.text
    earlier = read_checkpoint(tmp_path / "out" / "e" / "model_best.pth.tar")["epoch"]
    result = train_segmenter(config(epochs=3, resume="auto", eval_mode="slide"), progress=False)
    said = [r.getMessage() for r in caplog.records if "starts again" in r.getMessage()]
    assert len(said) == 1 and re.match(
        rf"`resume=.*last.pth.tar`: epochs 0\.\.1 were evaluated on split 'val', whole images at short side 32, this "
        rf"run evaluates split 'val', 32-px sliding windows 21 px apart at short side 32: .* starts again at epoch 2; "
        rf"the earlier best, .* at epoch {earlier}, stays as checkpoint-{earlier}\.pth\.tar$", said[0]), said
    assert result.best_epoch == 2 and read_checkpoint(result.checkpoint)["epoch"] == 2
    assert read_checkpoint(result.output_dir / f"checkpoint-{earlier}.pth.tar")["epoch"] == earlier


def test_a_resume_with_another_batch_size_counts_on_from_the_updates_made(tmp_path):
    """`iters` count updates: resumed with another batch size, the run still makes its 8 and the poly lr goes on
    from update 4 (it restarted from update `epoch * updates per epoch`: 2 here, so the lr climbed back and the run
    made 10 updates; with a smaller batch it found the run finished after 4)."""
    data = make_voc(tmp_path / "voc", n_train=16, n_val=1)
    config = dict(iters=8, warmup_iters=2, eval_interval=10, head="fpn", experiment="e")
    first = train_segmenter(tiny_config(data, tmp_path / "out", **config), callbacks=[lambda row: row["epoch"] == 1],
                            progress=False)  # batch 8: 2 updates an epoch, stopped after update 4
    assert [r["lr"] for r in first.summary] == pytest.approx([3e-3, 5e-3], rel=1e-5)  # updates 1 and 3
    resumed = train_segmenter(tiny_config(data, tmp_path / "out", batch_size=16, resume="auto", **config),
                              progress=False)  # 1 update an epoch
    assert [r["lr"] for r in resumed.summary] == pytest.approx([3e-3, 5e-3, 4e-3, 3e-3, 2e-3, 1e-3], rel=1e-5)
    assert read_checkpoint(resumed.output_dir / "last.pth.tar")["updates"] == 8



def test_a_resume_with_more_epochs_goes_on_as_a_run_of_that_length(tmp_path):
    """A 2-epoch run stopped after epoch 0 and resumed with `epochs=3` trains as a 3-epoch run from the start would
    (the warmup, 2 updates, is epoch 0 in both): the poly lr is rebuilt over 6 updates and goes on from update 2, so
    the losses, lrs and final weights are the straight run's."""
    data = make_voc(tmp_path / "voc", n_train=16, n_val=1)

    def config(**kw):
        return tiny_config(data, tmp_path / "out", head="fpn", eval_interval=10, **kw)
    straight = train_segmenter(config(epochs=3, experiment="straight"), progress=False)
    train_segmenter(config(epochs=2, experiment="longer"), callbacks=[lambda row: row["epoch"] == 0], progress=False)
    resumed = train_segmenter(config(epochs=3, experiment="longer", resume="auto"), progress=False)
    assert [(r["train_loss"], r["lr"]) for r in resumed.summary] == \
        [(r["train_loss"], r["lr"]) for r in straight.summary]
    assert [r["lr"] for r in straight.summary] == pytest.approx([3e-3, 4.5e-3, 1.5e-3], rel=1e-5)  # updates 1, 3, 5
    a, b = (read_checkpoint(run.output_dir / "last.pth.tar")["state_dict"] for run in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key

# each rank keeps the BatchNorm statistics its own batches left (own{rank}.pt) and the ones its model evaluates with
BN_AT_EVALUATION = """
import os
if "RANK" in os.environ:
    import torch
    from sequencer.engine import distributed, segmentation
    evaluate, sync = segmentation.evaluate_segmentation, distributed.sync_running_stats
    def keep(model, name):
        torch.save({n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))},
                   f"{name}{os.environ['RANK']}.pt")
    def kept(model, *args, **kwargs):
        keep(model, "bn")
        return evaluate(model, *args, **kwargs)
    def synced(model, *args, **kwargs):
        keep(model, "own")
        return sync(model, *args, **kwargs)
    segmentation.evaluate_segmentation, distributed.sync_running_stats = kept, synced
"""


@pytest.mark.slow
def test_two_process_gloo_run_and_its_sharded_evaluation(tmp_path):
    """`segment train` under the launcher distributed_train.sh uses (torchrun): 2 CPU processes, rank 0 writes, and
    the evaluation sharded over the ranks gives exactly the single-process numbers of `validate`: every rank
    evaluates with the checkpoint's BatchNorm statistics, the ranks' mean by default as in `train` (rank 1 used the
    ones its own batches had moved: no SyncBatchNorm on the CPU)."""
    from run_helpers import env_with_site
    from segmentation_helpers import TINY_SEGMENTER
    from sequencer.engine.segmentation_eval import validate_segmenter

    data = make_voc(tmp_path / "voc", n_train=8, n_val=5)
    cmd = [sys.executable, "-m", "sequencer.engine.distributed", "--standalone", "--nproc_per_node", "2",
           "-m", "sequencer", "segment", "train", str(data), "--num-classes", "3", *TINY_SEGMENTER, "--img-size", "32",
           "-b", "2", "--epochs", "1", "-j", "0", "--device", "cpu", "--output", str(tmp_path / "out"),
           "--experiment", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_site(tmp_path, BN_AT_EVALUATION),
                          cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the run's notes and result once, rank 0's (the recipes' warmup is longer than these 2 updates): each rank said them
    assert out.count("is not below the run's 2 updates") == 1, out
    assert len([line for line in out.splitlines() if line.startswith("best mIoU")]) == 1, out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ddp"]
    ckpt = read_checkpoint(tmp_path / "out" / "ddp" / "last.pth.tar")
    evaluated = [torch.load(tmp_path / f"bn{rank}.pt", weights_only=True) for rank in (0, 1)]
    own = [torch.load(tmp_path / f"own{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert evaluated[0] and evaluated[0].keys() == evaluated[1].keys()
    for name, stats in evaluated[0].items():
        assert torch.equal(stats, evaluated[1][name]) and torch.equal(stats, ckpt["state_dict"][name]), name
        # --dist-bn reduce, train's default: the ranks' mean (it was rank 0's alone)
        assert not torch.equal(own[0][name], own[1][name]), name
        torch.testing.assert_close(stats, (own[0][name] + own[1][name]) / 2)
    assert len(ckpt["rng_state"]) == 2 and not any(k.startswith("module.") for k in ckpt["state_dict"])
    row = read_summary(tmp_path / "out" / "ddp" / "summary.csv")[0]
    metrics = validate_segmenter(str(tmp_path / "out" / "ddp" / "last.pth.tar"), str(data), device="cpu")
    assert f"{metrics['miou']:.4f}" == row["eval_miou"] and metrics["images"] == 5


def test_amp_bf16_run_validates_to_its_logged_miou(tmp_path):
    """--amp on the CPU trains and evaluates under bfloat16 autocast (float32 on a CPU without native bf16 kernels,
    recorded as such); validate evaluates as training did."""
    from sequencer.engine.segmentation_eval import validate_segmenter

    data = make_voc(tmp_path / "voc", n_train=8, n_val=3)
    result = train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, experiment="amp", amp=True))
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt["data_config"]["eval_amp_dtype"] == ("bfloat16" if onednn_bf16_supported() else None)
    assert math.isfinite(result.summary[0]["train_loss"])
    metrics = validate_segmenter(str(result.checkpoint), str(data), device="cpu")
    assert round(metrics["miou"], 4) == result.summary[0]["eval_miou"]


def test_sigterm_mid_epoch_writes_a_recovery_checkpoint_and_resume_auto_finishes(tmp_path, monkeypatch):
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    signal_in_training_step(monkeypatch, signal.SIGTERM)  # epoch 1, step 0
    config = dict(epochs=3, experiment="rec", resume="auto")
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:  # the caller's own handler gets the SIGTERM once the run has written its recovery checkpoint
        stopped = train_segmenter(tiny_config(data, tmp_path / "out", **config))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM] and stopped.exit_code == 128 + signal.SIGTERM and stopped.interrupted
    recovery = read_checkpoint(tmp_path / "out" / "rec" / "recovery.pth.tar")
    assert recovery["epoch"] == 1 and recovery["epoch_complete"] is False
    monkeypatch.undo()
    resumed = train_segmenter(tiny_config(data, tmp_path / "out", **config))
    assert resumed.exit_code == 0 and [r["epoch"] for r in resumed.summary] == [0, 1, 2]
    assert not (tmp_path / "out" / "rec" / "recovery.pth.tar").exists()


def test_ctrl_c_raises_training_interrupted_after_the_recovery_checkpoint(tmp_path, monkeypatch, caplog):
    """As sequencer.train: the library call raises TrainingInterrupted (a KeyboardInterrupt) carrying the result
    once recovery.pth.tar is written (`segment train` returns 130 instead: tests/commands/test_segment.py)."""
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    signal_in_training_step(monkeypatch, signal.SIGINT)  # epoch 1, step 0
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_segmenter(tiny_config(data, tmp_path / "out", epochs=3, experiment="c"), progress=False)
    assert isinstance(stopped.value, KeyboardInterrupt)
    result = stopped.value.result
    assert result.interrupted and result.exit_code == 128 + signal.SIGINT
    recovery = read_checkpoint(tmp_path / "out" / "c" / "recovery.pth.tar")
    assert recovery["epoch"] == 1 and recovery["epoch_complete"] is False
    assert [r["epoch"] for r in result.summary] == [0] and result.best_epoch == 0
    assert_summary_is_the_csvs_numbers(result)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    # no batch of epoch 1 was trained: it said "goes on after batch 0"
    assert "recovery.pth.tar (`resume=auto` goes on from the epoch's beginning)" in caplog.text


def signal_during_evaluation(monkeypatch):
    """SIGINT reaches the run as each evaluation begins; returns the evaluation it wraps."""
    evaluate = seg_engine.evaluate_segmentation

    def signalled_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(seg_engine, "evaluate_segmentation", signalled_evaluation)
    return evaluate


def test_a_signal_during_evaluation_says_the_run_stops_once_the_epoch_is_saved(tmp_path, monkeypatch, caplog):
    """SIGINT while epoch 0 is evaluated: the epoch is saved, no recovery file written, and the run says so, then
    where a resume goes on (it said "stopping at the next step with a recovery checkpoint", then nothing)."""
    signal_during_evaluation(monkeypatch)
    caplog.set_level(logging.WARNING, logger="sequencer")
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    stopped = seg_engine.run_segmentation(tiny_config(data, tmp_path / "out", epochs=2, experiment="e"))
    assert stopped.exit_code == 128 + signal.SIGINT and stopped.interrupted
    folder = tmp_path / "out" / "e"
    assert ("received SIGINT: stopping once epoch 0 is finished and saved in last.pth.tar (no recovery checkpoint)"
            in caplog.text)
    assert f"stopped by SIGINT after epoch 0; resume with `resume={folder / 'last.pth.tar'}`" in caplog.text
    assert not (folder / "recovery.pth.tar").exists()
    assert read_checkpoint(folder / "last.pth.tar")["epoch"] == 0 and len(stopped.summary) == 1


def test_a_signal_during_the_last_epochs_evaluation_says_the_run_is_finished(tmp_path, monkeypatch, caplog):
    """It said "resume with `resume=.../last.pth.tar`", and that resume found nothing to do."""
    evaluate = signal_during_evaluation(monkeypatch)
    caplog.set_level(logging.INFO, logger="sequencer")
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    cfg = tiny_config(data, tmp_path / "out", epochs=1, experiment="e")
    stopped = seg_engine.run_segmentation(cfg)
    folder = tmp_path / "out" / "e"
    # the run is finished: not `interrupted` (sequencer.train_segmenter raised "resume from" the folder)
    assert stopped.exit_code == 128 + signal.SIGINT and not stopped.interrupted and len(stopped.summary) == 1
    assert (f"stopped by SIGINT after epoch 0, the run's last: the run is finished; checkpoints in {folder}"
            in caplog.text) and "resume with" not in caplog.text
    monkeypatch.setattr(seg_engine, "evaluate_segmentation", evaluate)
    caplog.clear()
    assert seg_engine.run_segmentation(dataclasses.replace(cfg, resume=str(folder / "last.pth.tar"))).exit_code == 0
    assert ("the run already finished: it made 2 updates in 1 epoch and this run has 2 updates; nothing to do (pass a "
            "larger `epochs` or `iters` to extend it)") in caplog.text


def test_a_signal_during_the_last_epochs_callbacks_ends_the_finished_run_as_it_says(tmp_path, caplog):
    """As sequencer.train: SIGINT while a callback takes the last epoch's row said "stopping at the next step with a
    recovery checkpoint", and the run returned status 0; the library then said "resume from" a finished run. It
    says the epoch is saved, and raises that the run had finished its epochs (``interrupted`` False, status 130)."""
    caplog.set_level(logging.WARNING, logger="sequencer")
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, experiment="e"), progress=False,
                        callbacks=[lambda row: os.kill(os.getpid(), signal.SIGINT)])
    folder = tmp_path / "out" / "e"
    assert str(stopped.value) == (f"segment train stopped by SIGINT; the run had finished its epochs; checkpoints "
                                  f"in {folder}")
    assert ("received SIGINT: stopping once epoch 0 is finished and saved in last.pth.tar (no recovery checkpoint)"
            in caplog.text) and "next step" not in caplog.text
    result = stopped.value.result
    assert result.exit_code == 128 + signal.SIGINT and not result.interrupted and len(result.summary) == 1


def test_a_poly_schedule_of_one_update_after_warmup_shows_no_cosine_note(tmp_path, caplog):
    """3 updates with 2 of warmup leave the poly schedule one: timm logged "Cosine annealing scheduler will have no
    effect on the learning rate since t_initial = t_mul = eta_mul = 1", the run's first line, though it is no cosine
    schedule and has none of those settings."""
    caplog.set_level(logging.WARNING)
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    result = train_segmenter(tiny_config(data, tmp_path / "out", iters=3, warmup_iters=2, experiment="p"))
    assert result.exit_code == 0 and len(result.summary) == 2
    assert "Cosine annealing" not in caplog.text


def test_each_step_line_shows_the_lr_its_update_used(tmp_path, caplog):
    """3 updates, 2 of warmup: the step lines show the lrs timm's poly schedule gives updates 0, 1 and 2 (the last
    the peak `lr`); each showed the next update's (the last 0.00e+00, the lr after the run)."""
    from timm.scheduler import PolyLRScheduler

    caplog.set_level(logging.INFO, logger="sequencer")
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    cfg = tiny_config(data, tmp_path / "out", iters=3, warmup_iters=2, log_interval=1, experiment="lr")
    assert train_segmenter(cfg).exit_code == 0
    shown = [float(m) for m in re.findall(r"segment train: epoch \d \[\d/\d\] .* lr (\S+) ", caplog.text)]
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = PolyLRScheduler(reference, t_initial=1, power=cfg.poly_power, lr_min=cfg.min_lr, warmup_t=2,
                               warmup_lr_init=cfg.lr * cfg.warmup_ratio, warmup_prefix=True, t_in_epochs=False)
    used = []
    for update in range(3):
        schedule.step_update(update)
        used.append(float(f"{reference.param_groups[0]['lr']:.2e}"))
    assert shown == used and used[-1] == float(f"{cfg.lr:.2e}")


def test_the_finish_line_of_a_resumed_run_counts_its_earlier_epochs_time(tmp_path, caplog):
    """As train's: a resume's "done in" said this invocation's seconds alone (epoch 0 is set to have taken 5000 s)."""
    data = make_voc(tmp_path / "voc", n_train=16, n_val=2)
    assert train_segmenter(tiny_config(data, tmp_path / "out", epochs=1, experiment="t")).exit_code == 0
    summary = tmp_path / "out" / "t" / "summary.csv"
    header, row = summary.read_text().splitlines()
    summary.write_text(f"{header}\n{row.rsplit(',', 1)[0]},5000.00\n")
    caplog.set_level(logging.INFO, logger="sequencer")
    caplog.clear()
    assert train_segmenter(tiny_config(data, tmp_path / "out", epochs=2, experiment="t", resume="auto")).exit_code == 0
    seconds = int(re.search(r"done in (\d+)s;", caplog.text).group(1))
    assert 5000 <= seconds < 5000 + 120
