"""The timm-style model API: features, heads, checkpointing, multi-scale outputs, resolutions, init, drop path."""
import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sequencer

USE_ONEDNN = "both"  # the default CPU path users get (oneDNN) as well as the native kernels (see conftest)


@pytest.fixture
def tiny(tiny_kwargs, randomize):
    torch.manual_seed(0)
    return randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs)).eval()


def test_forward_features_and_head(tiny):
    x = torch.randn(2, 3, 56, 56)
    feats = tiny.forward_features(x)
    assert feats.shape == (2, 4, 4, 32)  # (B, H/14, W/14, C), channels-last
    pooled = tiny.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, feats.mean(dim=(1, 2)))
    logits = tiny.forward_head(feats)
    torch.testing.assert_close(logits, tiny.get_classifier()(pooled))
    torch.testing.assert_close(tiny(x), logits)


def test_reset_classifier(tiny):
    tiny.reset_classifier(3)
    assert tiny.num_classes == 3 and tiny.get_classifier().out_features == 3
    assert torch.count_nonzero(tiny.get_classifier().weight) == 0  # zero-initialised, as the paper's head
    assert tiny(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    tiny.reset_classifier(0)
    assert tiny(torch.randn(1, 3, 28, 28)).shape == (1, 32)  # pooled features


def test_a_negative_class_count_is_refused_not_scored_as_features(tiny, tmp_path):
    """num_classes=-1 (timm's "no head" for a pretrained_cfg_overlay, not for a model) is refused in one line: it
    built a model without a head, and validate(checkpoint=..., num_classes=-1) scored the 32 pooled features as class
    logits (a top-1 of 8.333% on 3 classes, a loss of 5.196). A refused reset_classifier changes nothing."""
    from sequencer.engine.inference import load_model
    from sequencer.errors import ArgumentValueError
    with pytest.raises(ArgumentValueError, match=r"num_classes must be >= 0 \(0: no head\), got -1"):
        sequencer.create_model("sequencer2d_nano", num_classes=-1)
    torch.save({"arch": tiny.model_name, "model_kwargs": tiny.model_kwargs, "state_dict": tiny.state_dict()},
               tmp_path / "tiny.pth")
    with pytest.raises(ArgumentValueError, match="got -1"):
        load_model(str(tmp_path / "tiny.pth"), num_classes=-1)
    before = tiny.get_classifier()
    with pytest.raises(ArgumentValueError, match="got -2"):
        tiny.reset_classifier(-2)
    assert tiny.get_classifier() is before and tiny.num_classes == before.out_features
    assert tiny.model_kwargs.get("num_classes", before.out_features) == before.out_features


@pytest.mark.parametrize("img_size", [0, -16, True, 16.5, "16", (16, 16)])
def test_an_img_size_that_is_not_a_positive_integer_is_refused_in_one_line(img_size, tmp_path):
    """create_model built a model for img_size 0, -16, True, 16.5 (cut to 16) or "16", recording an input size of
    (3, 0, 0) or (3, -16, -16) in its pretrained_cfg that failed only later, inside validate; load_model the same."""
    from sequencer.engine.inference import load_model
    from sequencer.errors import ArgumentValueError
    with pytest.raises(ArgumentValueError, match=r"img_size=.*: must be a positive integer"):
        sequencer.create_model("sequencer2d_nano", img_size=img_size)
    model = sequencer.create_model("sequencer2d_nano", num_classes=3)
    torch.save({"arch": model.model_name, "model_kwargs": model.model_kwargs, "state_dict": model.state_dict()},
               tmp_path / "nano.pth")
    with pytest.raises(ArgumentValueError, match=r"img_size=.*: must be a positive integer"):
        load_model(str(tmp_path / "nano.pth"), img_size=img_size)
    assert sequencer.create_model("sequencer2d_nano", img_size=torch.tensor(24).numpy()).pretrained_cfg[
        "input_size"] == (3, 24, 24)  # an integer of another kind (numpy's) is one


@pytest.mark.parametrize("in_chans", [0, -3, 2.5, True])
def test_an_in_chans_that_is_not_a_positive_integer_is_refused_in_one_line(in_chans):
    """create_model failed deep in torch's layers for in_chans 0 (ZeroDivisionError 'division by zero'), -3
    ('Trying to create tensor with negative dimension -3') and 2.5 ('in_channels must be divisible by groups'), and
    built a 1-channel stem for True."""
    from sequencer.errors import ArgumentValueError
    with pytest.raises(ArgumentValueError, match=rf"in_chans={in_chans}: must be a positive integer"):
        sequencer.create_model("sequencer2d_nano", in_chans=in_chans)


def test_grad_checkpointing_gives_identical_grads(tiny):
    tiny.train()  # dropout/drop path are 0: training mode is deterministic here
    x = torch.randn(2, 3, 28, 28)

    def grads():
        tiny.zero_grad()
        tiny(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in tiny.named_parameters()}

    plain = grads()
    tiny.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in tiny.stages)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_forward_intermediates(tiny):
    x = torch.randn(1, 3, 56, 56)
    final, maps = tiny.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 8, 8), (1, 32, 4, 4), (1, 32, 4, 4), (1, 32, 4, 4)]
    torch.testing.assert_close(final, tiny.forward_features(x))
    nhwc = tiny.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
    assert len(nhwc) == 2
    torch.testing.assert_close(nhwc[0], maps[2].permute(0, 2, 3, 1))
    first = tiny.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(first[0], maps[0])
    normed = tiny.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[0], final.permute(0, 3, 1, 2))


def test_features_only(tiny_kwargs):
    backbone = sequencer.create_model("sequencer2d_s", features_only=True, out_indices=(0, 1, 3), **tiny_kwargs)
    assert backbone.channels() == [16, 32, 32]
    assert backbone.reduction() == [7, 14, 14]
    maps = backbone(torch.randn(2, 3, 56, 56))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 4, 4)]
    # docs/detection.md: floor(side / r) cells, as timm's (what torchvision's AnchorGenerator infers strides from)
    odd = backbone(torch.randn(1, 3, 60, 71))
    assert [tuple(m.shape[-2:]) for m in odd] == [(8, 10), (4, 5), (4, 5)]
    full = sequencer.create_model("sequencer2d_s", features_only=True)
    assert full.channels() == [192, 384, 384, 384] and full.reduction() == [7, 14, 14, 14]


def test_feature_info_is_timms_object_and_still_lists_the_returned_maps(tiny_kwargs):
    """Issue 26 item 3: code written for timm calls feature_info.channels() / reduction() / module_name()."""
    from timm.models import FeatureInfo
    backbone = sequencer.create_model("sequencer2d_s", features_only=True, out_indices=(0, 1, 3), **tiny_kwargs)
    info = backbone.feature_info
    assert isinstance(info, FeatureInfo)
    assert info.channels() == [16, 32, 32] and info.reduction() == [7, 14, 14]
    assert info.module_name() == ["stages.0", "stages.1", "stages.3"]
    # each name is the module whose output the map is
    assert all(backbone.model.get_submodule(name) is backbone.model.stages[i]
               for name, i in zip(info.module_name(), (0, 1, 3)))
    assert info.get_dicts(keys=["num_chs", "index"]) == [{"num_chs": 16, "index": 0}, {"num_chs": 32, "index": 1},
                                                          {"num_chs": 32, "index": 3}]
    # list-like access, as before: one dict per returned map
    assert len(info) == 3 and info[2]["reduction"] == 14 and [f["num_chs"] for f in info] == [16, 32, 32]
    # the model's own list is not touched (a later features_only model of it must see every stage unnumbered)
    assert "index" not in backbone.model.feature_info[3]


@pytest.mark.parametrize("out_indices, expect", [((0, 4), "stage 4 is out of range for a model with 4 stages"),
                                                  ((-5,), "stage -5 is out of range"),
                                                  ((1, 1), "list each stage once, in increasing order"),
                                                  ((3, 0), "list each stage once, in increasing order")])
def test_features_only_refuses_bad_out_indices_in_one_line(tiny_kwargs, out_indices, expect):
    """Issue 19 item 8: as timm, an index out of range or a repeated one is an error (it used to wrap or merge)."""
    from sequencer.errors import SequencerError
    with pytest.raises(SequencerError, match=expect) as e:
        sequencer.create_model("sequencer2d_s", features_only=True, out_indices=out_indices, **tiny_kwargs)
    assert "\n" not in str(e.value)


def test_negative_out_indices_count_from_the_end(tiny, tiny_kwargs):
    from sequencer.errors import SequencerError
    backbone = sequencer.create_model("sequencer2d_s", features_only=True, out_indices=(-3, -1), **tiny_kwargs)
    maps = backbone(torch.randn(1, 3, 56, 56))
    assert len(maps) == len(backbone.feature_info) == 2 and backbone.channels() == [32, 32]
    with pytest.raises(SequencerError, match="indices=9: the model has 4 stages"):
        tiny.forward_intermediates(torch.randn(1, 3, 56, 56), indices=9)


@pytest.mark.parametrize("px, grid", [(160, 11), (448, 32)])
def test_any_input_resolution_with_the_same_weights(tiny, px, grid):
    # 160 is no multiple of 14: the strided convs drop the remainder, as timm's port does
    x = torch.randn(1, 3, px, px)
    assert tiny.forward_features(x).shape == (1, grid, grid, 32)
    assert torch.isfinite(tiny(x)).all()


PE_TINY = dict(layers=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), hidden_sizes=(16, 16, 16, 16))


def test_position_embedding_is_interpolated_for_other_inputs(randomize, tmp_path):
    """At another input size the embedding is resampled as timm's ViTs resample theirs in forward and as weights
    loaded at that size are (timm.layers.resample_abs_pos_embed: bicubic, antialiased), so the model run at 112 px
    gives the logits of the model its weights make at 112 px (a plain bicubic here differed by 12% of the logits at
    half size and 2% at 1.5 times on tiny random weights: `validate --img-size` and a fine-tune's start disagreed)."""
    from timm.layers import resample_abs_pos_embed

    model = randomize(sequencer.create_model("v_sequencer_s_pe", num_classes=4, **PE_TINY)).eval()
    pos = model.absolute_pos_embed
    assert pos.shape == (1, 16, 16, 32)  # 224 / 14
    x = torch.randn(1, 3, 112, 112)
    timms = resample_abs_pos_embed(pos.detach().reshape(1, 256, 32), new_size=[8, 8], num_prefix_tokens=0)
    expected = model.stem(x) + timms.reshape(1, 8, 8, 32)
    torch.testing.assert_close(model._embed(x), expected)
    torch.save(model.state_dict(), tmp_path / "pe224.pth")
    for px in (112, 168):
        at_px = sequencer.create_model("v_sequencer_s_pe", pretrained=True, num_classes=4, img_size=px, **PE_TINY,
                                       pretrained_cfg_overlay=dict(file=str(tmp_path / "pe224.pth"))).eval()
        x = torch.randn(1, 3, px, px)
        with torch.no_grad():
            torch.testing.assert_close(model(x), at_px(x), rtol=0, atol=1e-5)
    native = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model._embed(native), model.stem(native) + pos)


def test_position_embedding_checkpoint_from_another_grid(tmp_path, randomize, caplog, monkeypatch):
    """create_model(checkpoint_path=, img_size=) at another size keeps the file's embedding on its own 16x16 grid
    (a model built at its 224 px, said in one note) and interpolates it once, in forward: at the asked 112 px and at
    the trained 224 px its logits are the ones the checkpoint's own model gives (resizing it at load, then again in
    forward at 224 px, changed them). The model is built once (it was built at 112 px, then again at 224 px), by
    create_model and by load_model (`validate --checkpoint --img-size 112`) alike."""
    from sequencer.engine.inference import load_model
    from sequencer.models.vanilla_sequencer import VanillaSequencer

    source = randomize(sequencer.create_model("v_sequencer_s_pe", num_classes=4, **PE_TINY)).eval()
    torch.save({"arch": "v_sequencer_s_pe", "model_kwargs": dict(PE_TINY, num_classes=4),
                "state_dict": source.state_dict()}, tmp_path / "pe224.pth")
    built, init = [], VanillaSequencer.__init__

    @functools.wraps(init)
    def counted(self, *args, **kwargs):
        built.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(VanillaSequencer, "__init__", counted)
    with caplog.at_level(logging.INFO, logger="sequencer"):
        model = sequencer.create_model("v_sequencer_s_pe", img_size=112,
                                       checkpoint_path=str(tmp_path / "pe224.pth"), **PE_TINY).eval()
        loaded = load_model(str(tmp_path / "pe224.pth"), img_size=112).model
    notes = [r.getMessage() for r in caplog.records if "position embedding" in r.getMessage()]
    assert len(notes) == 2 and "kept on its 16x16 token grid (a 224 px model)" in notes[0]
    assert [k["img_size"] for k in built] == [224, 224]
    torch.testing.assert_close(loaded.absolute_pos_embed, source.absolute_pos_embed, rtol=0, atol=0)
    assert model.pretrained_cfg["input_size"] == (3, 112, 112) and model.model_kwargs["img_size"] == 224
    torch.testing.assert_close(model.absolute_pos_embed, source.absolute_pos_embed, rtol=0, atol=0)
    with torch.no_grad():
        for px in (112, 224):
            x = torch.randn(1, 3, px, px)
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("px", [112, 280])
def test_pretrained_weights_resample_the_position_embedding_as_timm_does(tmp_path, randomize, px, caplog):
    """pretrained=True at another img_size (here timm's pretrained_cfg_overlay=dict(file=...), the path every
    pretrained source takes) starts a model at that size: its embedding resampled as the weights load, with
    timm's numbers (timm.layers.resample_abs_pos_embed: bicubic, antialiased; no class token here), down to 8x8
    and up to 20x20 (the plain bicubic used before differed from timm's by 8% of the embedding's largest value
    upwards, and by all of it downwards, on these random weights); the rest loads as it is."""
    from timm.layers import resample_abs_pos_embed

    source = randomize(sequencer.create_model("v_sequencer_s_pe", num_classes=4, **PE_TINY)).eval()
    torch.save(source.state_dict(), tmp_path / "pe224.pth")
    with caplog.at_level(logging.INFO, logger="sequencer"):
        model = sequencer.create_model("v_sequencer_s_pe", pretrained=True, num_classes=4, img_size=px, **PE_TINY,
                                       pretrained_cfg_overlay=dict(file=str(tmp_path / "pe224.pth")))
    grid = px // 14
    pos = source.absolute_pos_embed.detach()
    expected = resample_abs_pos_embed(pos.reshape(1, 256, 32), new_size=[grid, grid], num_prefix_tokens=0)
    assert model.model_kwargs["img_size"] == model.img_size == px
    torch.testing.assert_close(model.absolute_pos_embed.detach(), expected.reshape(1, grid, grid, 32),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(model.stem.proj.weight, source.stem.proj.weight, rtol=0, atol=0)
    assert any(f"resized from its 16x16 token grid to this model's {grid}x{grid}" in r.getMessage()
               for r in caplog.records)


def test_weight_init_follows_the_paper():
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_s")
    head = model.get_classifier()
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase):
            bound = 1 / math.sqrt(m.hidden_size)
            for p in m.parameters():
                assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name  # uniform(+-1/sqrt(hidden))
        elif isinstance(m, nn.Conv2d):  # LeCun normal: std 1/sqrt(fan_in), zero bias
            fan_in = m.weight[0].numel()
            assert m.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.1), name
            assert torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.Linear) and not name.startswith("head"):  # xavier uniform
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound and m.weight.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                            rel=0.05), name
            if "mlp" in name:
                assert 0 < m.bias.abs().max() < 1e-4, name  # normal(std=1e-6)
            else:
                assert torch.count_nonzero(m.bias) == 0, name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name


def test_drop_path_increases_linearly_over_all_blocks():
    model = sequencer.create_model("sequencer2d_s", drop_path_rate=0.1)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert len(rates) == 18
    assert rates == pytest.approx([0.1 * i / 17 for i in range(18)])
    assert isinstance(model.stages[0].blocks[0].drop_path, nn.Identity)  # rate 0: no module at all


def test_drop_path_is_active_only_in_training(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", drop_path_rate=0.5, **tiny_kwargs)
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model.forward_features(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model.forward_features(x))


def test_stop_early_returns_the_last_stage_run_without_the_final_norm(tiny):
    x = torch.randn(2, 3, 28, 28)
    final, maps = tiny.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NHWC")
    stage0 = tiny.stages[0](tiny.stem(x))  # width 16, while the final norm is 32 wide
    torch.testing.assert_close(final, stage0)
    torch.testing.assert_close(maps[0], stage0)
    full, _ = tiny.forward_intermediates(x, indices=[3], stop_early=True)
    torch.testing.assert_close(full, tiny.forward_features(x))  # the last stage does get the final norm


def test_drop_path_one_drops_every_sample_without_nan(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", drop_path_rate=1.0, **tiny_kwargs).train()
    block = model.stages[-1].blocks[-1]  # the last block gets the full rate
    x = torch.randn(2, 2, 2, 32)
    out = block.drop_path(x)
    assert torch.equal(out, torch.zeros_like(x))  # every residual branch dropped, no 0/0
    assert torch.isfinite(model(torch.randn(2, 3, 28, 28))).all()


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torch_jit_script_is_refused_in_one_line_and_trace_works(tiny):
    """Issue 19 item 9: scripting failed with an assertion inside nn.LSTM; tracing is the supported TorchScript."""
    from sequencer.errors import SequencerError
    with pytest.raises(SequencerError, match="cannot be compiled with torch.jit.script.*torch.jit.trace") as e:
        torch.jit.script(tiny)
    assert "\n" not in str(e.value)
    x = torch.randn(1, 3, 56, 56)
    # set to checkpoint gradients for training, as a model traced for deployment after training may be: the trace's
    # own check of its graph failed then ("Graphs differed across invocations")
    tiny.set_grad_checkpointing(True)
    traced = torch.jit.trace(tiny.eval(), x)
    torch.testing.assert_close(traced(x), tiny(x))


def test_readme_library_example_runs(monkeypatch, tiny_kwargs):
    """The README's "Library" block, as written, with Sequencer2D-S at tiny widths; its training lines reach the
    same keyword check `sequencer.train` makes (a renamed setting fails) in place of a two-epoch run on the digits,
    which the API tests make."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from sequencer.engine.config import checked_settings
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index("## Library"):], re.S).group(1)
    real, calls = sequencer.create_model, []

    def tiny_instead(name, **kwargs):
        return real(name, **({**tiny_kwargs, **kwargs} if name == "sequencer2d_s" else kwargs))

    def train(**settings):
        calls.append(checked_settings(settings, "train", ""))
        return SimpleNamespace(best_top1=50.0, best_epoch=1, checkpoint="runs/demo/model_best.pth.tar")

    monkeypatch.setattr(sequencer, "create_model", tiny_instead, raising=False)
    monkeypatch.setattr(sequencer, "train", train, raising=False)
    monkeypatch.setattr(sequencer, "validate", lambda checkpoint: SimpleNamespace(top1=50.0), raising=False)
    scope = {}
    exec(compile(block, str(readme), "exec"), scope)
    assert scope["logits"].shape == (2, 1000) and scope["features"].shape == (2, 16, 16, 32)
    assert [m.shape[1:] for m in scope["maps"]] == [(16, 32, 32), (32, 16, 16), (32, 16, 16), (32, 16, 16)]
    torch.testing.assert_close(scope["fast"](scope["x"]), scope["model"](scope["x"]), rtol=0.1, atol=0.05)
    with pytest.raises(sequencer.SequencerError):
        scope["fast"].train()
    assert calls == [dict(model="sequencer2d_nano", epochs=2, output="runs", experiment="demo", workers=0)]


def test_a_head_of_the_users_own_is_called_with_the_feature_map_alone(tiny):
    """``model.head = MyHead()`` as with timm's models: forward calls it with the (B, H, W, C) map only."""
    class MaxPoolHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(x.amax(dim=(1, 2)))

    x = torch.randn(2, 3, 56, 56)
    tiny.head = MaxPoolHead()
    torch.testing.assert_close(tiny(x), tiny.head.fc(tiny.forward_features(x).amax(dim=(1, 2))))
