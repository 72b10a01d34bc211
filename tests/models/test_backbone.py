"""create_backbone: stride 4-32 maps for any input size, checkpoints, torchvision's detectors, bf16 and compile."""
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import sequencer
from sequencer import SequencerError
from sequencer.models.backbone import SequencerBackbone
from sequencer.models.loading import to_release_layout
from plain_sequencer import VARIANTS, PlainSequencer, randomized, rel_err, tiny_variant_kwargs

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def tiny_backbone(tiny_kwargs):
    """Sequencer2D-S's patch sizes (trunk stride 14) at tiny widths, 16 pyramid channels."""
    def make(**kwargs):
        torch.manual_seed(0)
        return sequencer.create_backbone("sequencer2d_s", **{"out_channels": 16, **tiny_kwargs, **kwargs})
    return make


@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_nano"], ids=["stride14", "stride4"])
@pytest.mark.parametrize("size", [(64, 64), (100, 75), (33, 127), (17, 200)])
def test_levels_are_at_strides_4_to_32_for_any_input_size(name, size, tiny_kwargs):
    kwargs = tiny_kwargs if name == "sequencer2d_s" else {}
    backbone = sequencer.create_backbone(name, out_channels=24, **kwargs).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 24
    h, w = size
    expect = [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]
    expect.append((math.ceil(expect[-1][0] / 2), math.ceil(expect[-1][1] / 2)))  # torchvision's stride-2 max pool
    assert [tuple(m.shape) for m in out.values()] == [(2, 24, *hw) for hw in expect]
    assert_feature_info_describes(backbone, out, [4, 8, 16, 32, 64])


def assert_feature_info_describes(backbone, out, strides):
    """timm's FeatureInfo, as a features_only model has: one dict per returned level, in the OrderedDict's order,
    each naming its key, width, stride and a module of the backbone."""
    from timm.models import FeatureInfo
    info = backbone.feature_info
    assert isinstance(info, FeatureInfo) and [d["key"] for d in info] == list(out)
    assert info.channels() == [m.shape[1] for m in out.values()] and info.reduction() == strides
    assert all(isinstance(backbone.get_submodule(name), torch.nn.Module) for name in info.module_name())


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_is_a_backbone_on_its_plain_models_features(name):
    """Each ablation and 1D model as a backbone: levels at strides 4-32 with the channels it reports, on an input of
    no multiple of its stride, built on the plain torch.nn model's final features of the padded input."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in tiny_variant_kwargs(name).items() if k != "num_classes"}
    backbone = sequencer.create_backbone(name, out_channels=8, **kwargs).eval()
    randomized(backbone.trunk)
    h, w = 45, 61
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        out = backbone(x)
        padded = torch.nn.functional.pad(x, (0, backbone.padded_size(w) - w, 0, backbone.padded_size(h) - h))
        trunk = backbone.trunk.forward_features(padded)
        assert rel_err(trunk, PlainSequencer(backbone.trunk).eval().stage_maps(padded)[1]) <= 1e-5
    for key, stride in zip("0123", backbone.strides, strict=True):
        assert out[key].shape == (1, backbone.out_channels, math.ceil(h / stride), math.ceil(w / stride))


def test_the_trunk_map_is_resampled_onto_stride_16_cell_centres(tiny_backbone):
    """Stride 14 -> 16: a feature equal to each trunk cell's centre column, in pixels, must read as the stride-16
    cells' centre columns after resampling (bilinear reproduces a linear function away from the border)."""
    backbone = tiny_backbone()

    def centre_columns(x):  # (B, 3, H, W) -> (B, H/14, W/14, 1) holding (j + 1/2) * 14
        h, w = x.shape[2] // 14, x.shape[3] // 14
        return ((torch.arange(w) + 0.5) * 14).expand(x.shape[0], h, w)[..., None]

    backbone.trunk.forward_features = centre_columns
    base = backbone.forward_base(torch.zeros(1, 3, 64, 224))  # padded to 70 x 224: 5 x 16 trunk cells
    assert base.shape == (1, 1, 4, 14)
    expect = (torch.arange(14) + 0.5) * 16
    torch.testing.assert_close(base[0, 0, 0, 1:-1], expect[1:-1])


def test_grad_checkpointing_gives_the_same_gradients(tiny_backbone):
    x = torch.randn(1, 3, 40, 56)
    grads = []
    for enable in (False, True):
        backbone = tiny_backbone()
        backbone.set_grad_checkpointing(enable)
        sum(m.sum() for m in backbone(x).values()).backward()
        grads.append(backbone.trunk.stem.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_frozen_stages_stay_put_and_no_norm_statistics_move(tiny_backbone):
    """docs/detection.md's freezing, mmdetection's ``frozen_stages=2``: stem and stages 0-1 ``requires_grad_(False)``
    and in eval mode, the whole backbone given to AdamW with weight decay; the frozen weights stay bit for bit, the
    rest trains. There is no BatchNorm whose statistics would still move (mmdetection's ``norm_eval``): the
    backbone's norms are LayerNorms. (That the rest gets the unfrozen model's gradients, on each LSTM path:
    tests/models/test_user_torch_habits.py.)"""
    backbone = tiny_backbone().train()
    assert not [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for part in (backbone.trunk.stem, *backbone.trunk.stages[:2]):
        part.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-2, weight_decay=0.1)
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 45, 61)).values()).backward()
    optimizer.step()
    changed = {k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])}
    frozen = ("trunk.stem.", "trunk.stages.0.", "trunk.stages.1.")
    assert changed == {k for k, _ in backbone.named_parameters() if not k.startswith(frozen)}


@pytest.mark.parametrize("layout", ["ours", "release"])
def test_loads_a_classification_checkpoint_and_drops_its_head_quietly(tmp_path, randomize, layout, tiny_kwargs):
    source = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs), seed=3)
    state = source.state_dict()
    if layout == "release":
        path = tmp_path / "release.pth"
        torch.save(to_release_layout(state), path)
    else:  # a `sequencer train` checkpoint
        path = tmp_path / "checkpoint.pth.tar"
        torch.save({"arch": "sequencer2d_s", "epoch": 3, "state_dict": state}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = sequencer.create_backbone("sequencer2d_s", checkpoint_path=str(path), **tiny_kwargs)
    trunk = backbone.trunk.state_dict()
    assert not any(k.startswith("head.fc") for k in trunk)
    for k, v in trunk.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_bad_arguments_are_one_line_errors(tiny_backbone):
    with pytest.raises(SequencerError, match=r"strides=\(4, 12\): give increasing powers of two"):
        tiny_backbone(strides=(4, 12))
    with pytest.raises(SequencerError, match="does not take num_classes="):
        tiny_backbone(num_classes=10)
    with pytest.raises(SequencerError, match="extra_blocks='p6p7'"):
        tiny_backbone(extra_blocks="p6p7")


@pytest.mark.parametrize("bad, message", [
    (dict(strides=(4.5, 8)), r"strides=\(4.5, 8\): give a sequence of ints"),  # was read as (4, 8)
    (dict(strides="48"), r"strides='48': give a sequence of ints"),  # was read as (4, 8)
    (dict(strides=32), r"strides=32: give a sequence of ints"),
    (dict(out_channels=0), r"out_channels=0: must be a positive integer"),
    (dict(out_channels=[16] * 4), r"out_channels=\[16, 16, 16, 16\]: must be a positive integer"),
    (dict(extra_blocks=torch.nn.ReLU()), r"extra_blocks=ReLU\(\): use 'pool', None or a torchvision ExtraFPNBlock"),
    # torchvision's ResNet recipe reads C5 (2048 channels); here P6 reads the pyramid's levels: failed in forward
    (dict(extra_blocks=LastLevelP6P7(2048, 256)), r"give LastLevelP6P7\(256, 256\)"),
], ids=["float", "text", "int", "zero", "list", "module", "p6p7-from-c5"])
def test_bad_pyramid_arguments_are_refused_before_the_trunk_is_built(bad, message, monkeypatch):
    """Refused in one line, not truncated into other strides nor left to fail in the first forward; before the trunk
    (whose weights may be a download) is built."""
    import sequencer.models.backbone as backbone_module
    monkeypatch.setattr(backbone_module, "create_model", lambda *a, **k: pytest.fail("the trunk was built"))
    with pytest.raises(ValueError, match=message) as caught:
        sequencer.create_backbone("sequencer2d_s", **bad)
    assert isinstance(caught.value, SequencerError)


def test_a_trunk_with_a_head_or_a_bad_segmenter_is_refused(tiny_kwargs):
    """A classifier head would ride along unused (DDP's default refuses parameters without gradients); a segmenter's
    zero classes or channels failed only in its first forward; a backbone_kwargs key the segmenter sets itself (from
    `segment train --backbone-kwargs out_channels=8` too) was a TypeError's traceback."""
    with pytest.raises(SequencerError, match="the trunk has a 5-class head"):
        SequencerBackbone(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs))
    for bad in (dict(num_classes=0), dict(num_classes=3, head_channels=0)):
        with pytest.raises(SequencerError, match=f"{list(bad)[-1]}=0: must be a positive integer"):
            sequencer.create_segmenter("sequencer2d_s", backbone_kwargs=tiny_kwargs, **bad)
    for key, instead in [("out_channels", "out_channels="), ("checkpoint_path", "backbone_checkpoint="),
                         ("extra_blocks", "the head takes the pyramid's levels only")]:
        with pytest.raises(SequencerError, match=f"backbone_kwargs: {key}=8 is set by the segmenter: .*{instead}"):
            sequencer.create_segmenter("sequencer2d_s", 3, backbone_kwargs={**tiny_kwargs, key: 8})


def boxes_on_noise(n: int, size: int = 64, seed: int = 0):
    """``n`` noise images with one bright rectangle each (label 1) and its box target."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.3
        w, h = torch.randint(14, 30, (2,), generator=g).tolist()
        x0, y0 = torch.randint(0, size - w, (1,), generator=g).item(), torch.randint(0, size - h, (1,), generator=g).item()
        image[:, y0:y0 + h, x0:x0 + w] = 1.0
        masks = torch.zeros(1, size, size, dtype=torch.uint8)
        masks[0, y0:y0 + h, x0:x0 + w] = 1
        images.append(image)
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                        "labels": torch.tensor([1]), "masks": masks})
    return images, targets


SMALL_DETECTOR = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
                      box_batch_size_per_image=32)


def small_anchors(levels: int = 5) -> AnchorGenerator:
    return AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(levels)), aspect_ratios=((0.5, 1.0, 2.0),) * levels)


def test_faster_rcnn_trains_on_synthetic_boxes_and_detects_in_eval(tiny_backbone):
    backbone = tiny_backbone()
    detector = FasterRCNN(backbone, rpn_anchor_generator=small_anchors(),
                          box_head=TwoMLPHead(16 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 2),
                          **SMALL_DETECTOR)
    images, targets = boxes_on_noise(4)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3)
    losses = []
    detector.train()
    for _ in range(20):
        loss = sum(detector(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses  # measured: 0.4
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 4
    # the best-scoring box finds the rectangle (measured mean IoU 0.62 after 20 steps; chance is near 0)
    top_iou = [box_iou(d["boxes"][:1], t["boxes"]).max().item() if len(d["boxes"]) else 0.0
               for d, t in zip(out, targets)]
    assert sum(top_iou) / 4 > 0.3, top_iou
    for d in out:
        assert set(d) == {"boxes", "labels", "scores"}
        n = d["boxes"].shape[0]
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == d["scores"].shape == (n,)
        assert d["labels"].dtype == torch.int64 and ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
        assert ((d["boxes"] >= 0) & (d["boxes"] <= 64)).all()
        assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all()


def test_mask_rcnn_forward_and_backward(tiny_backbone):
    detector = MaskRCNN(tiny_backbone(), num_classes=2, rpn_anchor_generator=small_anchors(), **SMALL_DETECTOR)
    images, targets = boxes_on_noise(2)
    losses = detector(images, targets)
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    assert detector.backbone.trunk.stem.proj.weight.grad.abs().sum() > 0


def test_retina_net_on_strides_8_to_128(tiny_backbone):
    backbone = tiny_backbone(strides=(8, 16, 32), extra_blocks=LastLevelP6P7(16, 16))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
    assert [(k, m.shape[-1]) for k, m in out.items()] == [("0", 8), ("1", 4), ("2", 2), ("p6", 1), ("p7", 1)]
    assert_feature_info_describes(backbone, out, [8, 16, 32, 64, 128])
    assert_feature_info_describes(tiny_backbone(extra_blocks=None), out={str(i): torch.zeros(1, 16) for i in range(4)},
                                  strides=[4, 8, 16, 32])
    anchors = AnchorGenerator(sizes=tuple((16 * 2 ** i,) for i in range(5)), aspect_ratios=((1.0,),) * 5)
    detector = RetinaNet(backbone, num_classes=2, anchor_generator=anchors, min_size=64, max_size=64)
    images, targets = boxes_on_noise(2)
    losses = detector(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
    assert set(losses) == {"classification", "bbox_regression"}
    sum(losses.values()).backward()
    assert backbone.trunk.stem.proj.weight.grad.abs().sum() > 0


def test_bf16_autocast_agrees_with_float32(randomize, tiny_backbone):
    backbone = randomize(tiny_backbone(), seed=1).eval()
    x = torch.randn(2, 3, 50, 61)
    with torch.no_grad():
        ref = backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x)
    for k in ref:
        assert low[k].dtype in (torch.bfloat16, torch.float32)
        # bf16 keeps 8 bits of mantissa; the maps are LayerNormed (unit scale), so an absolute bound is meaningful
        torch.testing.assert_close(low[k].float(), ref[k], rtol=0.05, atol=0.1, msg=k)


def test_channels_last_agrees_with_contiguous(randomize, tiny_backbone):
    """A detector converted with `.to(memory_format=torch.channels_last)` (a common GPU habit) feeds NHWC-strided
    maps: the pyramid's padding, resampling and crops must read them as the same numbers."""
    backbone = randomize(tiny_backbone(), seed=3).eval()
    x = torch.randn(2, 3, 45, 62)
    with torch.no_grad():
        ref = backbone(x)
        out = backbone.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_forward_agrees_with_eager(randomize, tiny_backbone):
    backbone = randomize(tiny_backbone(layers=(1, 1, 1, 1)), seed=2).eval()  # dynamo traces each block: ~1 s each
    x = torch.randn(1, 3, 45, 70)
    torch._dynamo.reset()
    compiled = torch.compile(backbone, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ref, out = backbone(x), compiled(x)
    assert list(out) == list(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_readme_detection_example_runs(monkeypatch, tiny_kwargs):
    """The README's block, as written, with the tiny trunk and 16 pyramid channels in place of the downloaded
    Sequencer2D-S and 256 (the detector upscales the image to 800 px, where 256 channels cost ~50 GMACs)."""
    text = README.read_text()
    block = re.search(r"<!-- detection example[^\n]*\n```python\n(.*?)```", text, re.S).group(1)
    real = sequencer.create_backbone

    def tiny_instead(name, pretrained=False, **kwargs):
        assert name == "sequencer2d_s" and pretrained and not kwargs
        return real(name, out_channels=16, **tiny_kwargs)

    monkeypatch.setattr(sequencer, "create_backbone", tiny_instead, raising=False)
    scope = {}
    with torch.no_grad():
        exec(compile(block, str(README), "exec"), scope)
    assert isinstance(scope["backbone"], SequencerBackbone) and scope["detector"].backbone is scope["backbone"]
    detections = scope["detections"]
    assert set(detections) == {"boxes", "labels", "scores"} and detections["boxes"].shape[1:] == (4,)
    assert ((detections["boxes"] >= 0) & (detections["boxes"] <= torch.tensor([640, 480, 640, 480]))).all()


def test_detection_doc_example_builds_each_detector(monkeypatch, tiny_kwargs):
    """docs/detection.md's block, as written, with the tiny trunk in place of the downloaded Sequencer2D-S (its
    256 pyramid channels kept: LastLevelP6P7(256, 256) is written for them); then one training step of each, on
    the detectors' own default anchors and RoI pooling (a gradient reaches the trunk), and one small forward."""
    text = (README.parent / "docs" / "detection.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    real = sequencer.create_backbone

    def tiny_instead(name, pretrained=False, **kwargs):
        assert name == "sequencer2d_s"
        return real(name, **tiny_kwargs, **kwargs)

    monkeypatch.setattr(sequencer, "create_backbone", tiny_instead, raising=False)
    scope = {}
    exec(compile(block, "docs/detection.md", "exec"), scope)
    image = [torch.rand(3, 70, 90)]
    images, targets = boxes_on_noise(2)
    for name in ("faster", "mask", "retina"):
        detector = scope[name].train()
        detector.transform.min_size, detector.transform.max_size = (64,), 96
        given = targets if name == "mask" else [{k: t[k] for k in ("boxes", "labels")} for t in targets]
        loss = sum(detector(images, given).values())
        loss.backward()
        assert loss.isfinite() and detector.backbone.trunk.stem.proj.weight.grad.abs().sum() > 0, name
        detector.eval()
        with torch.no_grad():
            assert set(detector(image)[0]) >= {"boxes", "labels", "scores"}, name
    with torch.no_grad():
        levels = scope["levels"].eval()(torch.randn(1, 3, 70, 90))
    assert list(levels) == ["0", "1", "2", "3"] and levels["0"].shape == (1, 256, 18, 23)
    assert list(scope["retina"].backbone(torch.randn(1, 3, 64, 64))) == ["0", "1", "2", "p6", "p7"]


def test_macs_count_the_pyramid_as_torch_flop_counter_does(tiny_backbone):
    """count_macs (the GMACs `sequencer benchmark` and docs/detection.md report) includes the transposed convs."""
    from torch.utils.flop_counter import FlopCounterMode

    from sequencer.models.flops import count_macs
    backbone = tiny_backbone().eval()
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(torch.randn(1, 3, 64, 96))
    macs = count_macs(backbone, (3, 64, 96))
    assert macs == pytest.approx(counter.get_total_flops() / 2, rel=1e-3)
    assert macs > count_macs(backbone.trunk, (3, 70, 98))  # the trunk runs on the padded input


def test_onnx_export_matches_eager_at_odd_sizes(tiny_backbone, randomize, tmp_path):
    """The peers' scan kernels do not export; this backbone does (the exporter the project uses, dynamo=False).
    The exporter records the size arithmetic on the input: Python's floor division would be ONNX's truncation. With
    dynamic axes one file serves other batch and image sizes, whose padding and crops differ from the traced one's."""
    import onnxruntime as ort
    backbone = randomize(tiny_backbone(), seed=4).eval()
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        names = [f"level_{k}" for k in backbone(x)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on RNNs and Python ints
            torch.onnx.export(backbone, (x,), tmp_path / "b.onnx", dynamo=False, opset_version=17,
                              input_names=["input"], output_names=names,
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}})
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    for x in (x, torch.randn(2, 3, 100, 33)):
        with torch.no_grad():
            ref = backbone(x)
        for (k, r), out in zip(ref.items(), session.run(None, {"input": x.numpy()}), strict=True):
            torch.testing.assert_close(torch.from_numpy(out), r, rtol=1e-4, atol=1e-5, msg=k)
