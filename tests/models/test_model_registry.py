"""Registry: names, errors, parameter counts, configs, and every registered model building and training."""
import math

import pytest
import torch
from torch import nn

import sequencer
from sequencer import SequencerError
from sequencer.models import get_model_entry

PAPER_MODELS = [
    "sequencer2d_s", "sequencer2d_m", "sequencer2d_l", "sequencer2d_s_392", "sequencer2d_m_392", "sequencer2d_l_392",
    "sequencer2d_s_unidirectional", "sequencer2d_s_add", "sequencer2d_s_h2x", "sequencer2d_s_without_fc",
    "sequencer2d_vertical", "sequencer2d_s_horizontal", "gru_sequencer2d_s", "rnn_sequencer2d_s",
    "sequencer2d_l_d4_3x", "v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe",
]


def test_every_paper_model_and_nano_is_registered():
    names = sequencer.list_models()
    assert names == sorted(names)
    assert set(names) == set(PAPER_MODELS) | {"sequencer2d_nano"}


def test_list_models_pattern_and_pretrained_filter():
    assert sequencer.list_models("*392") == ["sequencer2d_l_392", "sequencer2d_m_392", "sequencer2d_s_392"]
    assert sequencer.list_models("v_*") == ["v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe"]
    assert sequencer.list_models("nothing*") == []
    with_weights = sequencer.list_models(pretrained=True)
    assert {"sequencer2d_s", "sequencer2d_m", "sequencer2d_l"} <= set(with_weights)
    assert "sequencer2d_s_add" not in with_weights


@pytest.mark.parametrize("pattern", [5, None, ["sequencer2d*"]])
def test_list_models_refuses_a_pattern_that_is_not_text_in_one_line(pattern):
    """It failed in fnmatch with TypeError 'expected str, bytes or os.PathLike object, not int'."""
    with pytest.raises(SequencerError, match=r"list_models: `pattern=.*` is not text"):
        sequencer.list_models(pattern)


def test_unknown_name_suggests_close_names():
    with pytest.raises(SequencerError, match="unknown model 'sequencer2d_ss'") as e:
        sequencer.create_model("sequencer2d_ss")
    assert "sequencer2d_s" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(SequencerError, match="sequencer models"):  # nothing close: point at the list
        sequencer.create_model("resnet50")


@pytest.mark.parametrize("name", [None, nn.Identity()], ids=["None", "a module"])
def test_a_name_that_is_not_text_is_refused_in_one_line(name):
    """``create_model(model)`` with the model itself, or None (an unset variable): one line naming what came; it
    failed as AttributeError "'NoneType' object has no attribute 'startswith'"."""
    with pytest.raises(SequencerError, match=rf"a model name is a registered name \(text\), not {type(name).__name__}"):
        sequencer.create_model(name)


def test_bad_architecture_argument_is_a_user_error():
    with pytest.raises(SequencerError, match="bad argument.*no_such_option"):
        sequencer.create_model("sequencer2d_nano", no_such_option=1)
    with pytest.raises(SequencerError, match="union"):
        sequencer.create_model("sequencer2d_nano", union="diagonal")


def test_nano_is_small():
    model = sequencer.create_model("sequencer2d_nano")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # a 16 px image still gives an 8x8 token grid in the first stage (4x4 after the 2x downsample)
    maps = model.forward_intermediates(torch.randn(1, 3, 16, 16), intermediates_only=True)
    assert [tuple(m.shape[2:]) for m in maps] == [(8, 8), (4, 4), (4, 4)]


@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_m_392", "v_sequencer_s_pe", "sequencer2d_nano"])
def test_pretrained_cfg(name):
    model = sequencer.create_model(name)
    cfg = model.pretrained_cfg
    side = {"sequencer2d_m_392": 392, "sequencer2d_nano": 32}.get(name, 224)
    assert cfg["input_size"] == (3, side, side)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == (0.875 if side == 224 else 1.0)
    if name != "sequencer2d_nano":
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 and cfg["architecture"] == name
    assert cfg["first_conv"] == "stem.proj" and cfg["classifier"] == "head.fc"
    assert cfg["url"].endswith(".pth") == (name == "sequencer2d_s")  # no 392 px weights were released


def test_pretrained_cfg_follows_arguments():
    model = sequencer.create_model("sequencer2d_nano", num_classes=10, img_size=48, in_chans=1)
    assert model.pretrained_cfg["input_size"] == (1, 48, 48)
    assert model.pretrained_cfg["num_classes"] == 10
    assert get_model_entry("sequencer2d_nano").pretrained_cfg["input_size"] == (3, 32, 32)  # registry untouched


def test_model_name_and_kwargs_rebuild_the_model(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", num_classes=7, drop_path_rate=0.2, union="add", **tiny_kwargs)
    rebuilt = sequencer.create_model(model.model_name, **model.model_kwargs)
    assert model.model_name == "sequencer2d_s"
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.stages[0].blocks[0].rnn_tokens.union == "add"


def _smallest_input(model) -> int:
    # two tokens per side at the last stage, so the recurrent (hidden-to-hidden) weights take part too
    return 2 * math.prod(model.patch_sizes)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS + ["sequencer2d_nano"])
def test_every_registered_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = sequencer.create_model(name)  # the real configuration, not a shrunken one
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)  # the zero head would stop every gradient below it
    side = _smallest_input(model)
    x = torch.randn(1, 3, side, side)
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("override", [dict(union="add"), dict(with_fc=False)])
def test_vanilla_sequencer_refuses_bilstm2d_only_options(override):
    """One LSTM over the tokens has no union or fusing layer: the option is an error, not silently dropped."""
    with pytest.raises(SequencerError, match=next(iter(override))):
        sequencer.create_model("v_sequencer_s", **override)


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_sizes=(0, 2, 1)), r"patch_sizes=\(0, 2, 1\): each entry must be an integer >= 1"),  # ZeroDivisionError
    (dict(layers=3), r"layers=3: give one entry per stage"),  # TypeError: object of type 'int' has no len()
    (dict(embed_dims=(96, 128, 0)), r"embed_dims=\(96, 128, 0\): each entry must be an integer >= 1"),
    (dict(hidden_sizes=(0, 32, 32)), r"hidden_sizes=\(0, 32, 32\): each entry"),
    (dict(layers=(1, -1, 1)), r"layers=\(1, -1, 1\): each entry must be an integer >= 0"),
    (dict(mlp_ratios=(0, 3, 3)), r"mlp_ratios=\(0, 3, 3\): each entry must be a positive number"),  # built, then forward
    (dict(in_chans=0), r"in_chans=0: must be a positive integer"),  # ZeroDivisionError
    (dict(num_rnn_layers=0), r"num_rnn_layers=0: must be a positive integer"),
    (dict(drop_path_rate=1.5), r"drop_path_rate=1.5: must be a number in \[0, 1\]"),  # built, then bernoulli_ failed
    (dict(proj_drop_rate=2.0), r"proj_drop_rate=2.0: must be a number in \[0, 1\]"),
    (dict(num_classes=2.5), r"num_classes must be a whole number \(0: no head\), got 2.5"),  # TypeError in nn.Linear
])
def test_architecture_values_no_network_is_built_from_are_refused_in_one_line(kwargs, message):
    """`--model-kwargs patch_sizes=(0,2,1)` (or create_model(..., patch_sizes=...)) ended in a traceback from deep in
    the build, and some values built a model that failed at its first (training) forward; now one ArgumentValueError
    line before any layer is built, which `sequencer train` prints as its error (exit 2)."""
    from sequencer.errors import ArgumentValueError
    with pytest.raises(ArgumentValueError, match=message):
        sequencer.create_model("sequencer2d_nano", **kwargs)


def test_the_edges_of_the_architecture_values_still_build():
    """A stage without blocks, numpy integers, a list for a tuple, rate 1 and an MLP ratio giving one channel."""
    import numpy as np
    model = sequencer.create_model("sequencer2d_nano", layers=[1, 0, np.int64(1)], drop_path_rate=1.0,
                                   mlp_ratios=(1 / 96, 3, 3.0), num_classes=np.int64(3))
    assert model.stages[0].blocks[0].mlp_channels.fc1.out_features == 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_a_models_own_error_keeps_its_type_and_traceback(monkeypatch):
    """create_model turns only its own argument errors into SequencerError (issue 25 item 5): an error raised
    inside a model's __init__ by its code propagates as it is."""
    from sequencer.errors import ArgumentValueError
    from sequencer.models import sequencer2d

    def broken_init(self, *args, **kwargs):
        raise TypeError("a bug inside the model")

    with pytest.raises(ArgumentValueError, match="union must be one of") as refused:
        sequencer.create_model("sequencer2d_nano", union="diagonal")
    assert isinstance(refused.value, ValueError)  # a refused value: one line on the CLI, a ValueError in Python
    monkeypatch.setattr(sequencer2d.SequencerStage, "__init__", broken_init)
    with pytest.raises(TypeError, match="a bug inside the model") as bug:
        sequencer.create_model("sequencer2d_nano")
    assert not isinstance(bug.value, SequencerError)
    assert any(entry.name == "broken_init" for entry in bug.traceback)


def test_reset_classifier_records_the_new_head():
    """model_kwargs and pretrained_cfg follow reset_classifier, so create_model(name, **model_kwargs) rebuilds the
    model (checkpoints and exports record these); the dicts the old values were are left unchanged."""
    model = sequencer.create_model("sequencer2d_nano", num_classes=10, img_size=16)
    old_kwargs, old_cfg = model.model_kwargs, model.pretrained_cfg
    model.reset_classifier(3)
    assert model.model_kwargs["num_classes"] == 3 and model.pretrained_cfg["num_classes"] == 3
    assert old_kwargs["num_classes"] == 10 and old_cfg["num_classes"] == 10
    rebuilt = sequencer.create_model(model.model_name, **model.model_kwargs)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    model.reset_classifier(0, global_pool="")
    assert model.model_kwargs["num_classes"] == 0 and model.model_kwargs["global_pool"] == ""
    assert sequencer.create_model(model.model_name, **model.model_kwargs)(torch.zeros(1, 3, 16, 16)).dim() == 4


def test_reset_classifier_forgets_the_old_heads_class_names():
    """A checkpoint's class names (``label_names``, which validate(model=...) maps a dataset's folders by) name the
    old head's outputs; after reset_classifier, also to the same count, they named the new head's too, so a model
    fine-tuned on folders b, c, d was refused for class d "the model was not trained on"."""
    from sequencer.engine.validation import _in_memory
    model = sequencer.create_model("sequencer2d_nano", num_classes=3, img_size=16,
                                   pretrained_cfg_overlay=dict(num_classes=3, label_names=["a", "b", "c"]))
    assert _in_memory(model, None, None, torch.device("cpu")).output_names == ["a", "b", "c"]
    model.reset_classifier(3)
    assert "label_names" not in model.pretrained_cfg
    assert _in_memory(model, None, None, torch.device("cpu")).output_names is None


@pytest.mark.parametrize("key, value", [("proj_drop_rate", "abc"), ("with_fc", "maybe"), ("num_rnn_layers", "two")])
def test_text_for_a_number_or_switch_is_named_before_the_model_is_built(key, value):
    """`--model-kwargs proj_drop_rate=abc` reaches create_model as text: it was a TypeError traceback from deep in
    the model's __init__ ('<' not supported between instances of 'str' and 'int')."""
    with pytest.raises(SequencerError, match=rf"`{key}='{value}'` is text, but {key} is a"):
        sequencer.create_model("sequencer2d_nano", **{key: value})
