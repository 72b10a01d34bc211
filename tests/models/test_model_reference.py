"""Our Sequencer2d gives the same logits as timm's port (the public reference) for the same weights."""
import pytest
import timm
import torch
from timm.models.sequencer import checkpoint_filter_fn as timm_release_filter

import sequencer
from sequencer.models.loading import load_state_dict_into, to_release_layout

REL_TOL = 1e-5
USE_ONEDNN = True  # compare the default CPU path (see conftest)


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
def test_logits_match_timm_in_both_layouts(name, randomize):
    torch.manual_seed(0)
    reference = randomize(timm.create_model(name, pretrained=False), seed=1).eval()
    timm_state = reference.state_dict()
    release_state = to_release_layout(timm_state)
    assert "head.weight" in release_state and not any(k.startswith("stages.") for k in release_state)
    _assert_same_state(timm_release_filter(release_state, reference), timm_state)  # timm's own reading agrees

    ours_timm_layout = sequencer.create_model(name).eval()
    load_state_dict_into(ours_timm_layout, timm_state)
    ours_release_layout = sequencer.create_model(name).eval()
    load_state_dict_into(ours_release_layout, release_state)

    with torch.no_grad():
        for px in (224, 392):
            x = torch.randn(1, 3, px, px)
            expected = reference(x)
            assert expected.abs().max() > 1e-2  # the comparison is not between near-zero logits
            for model in (ours_timm_layout, ours_release_layout):
                assert rel_max_err(model(x), expected) <= REL_TOL, (name, px)


def test_release_layout_round_trip(tiny_kwargs, randomize):
    model = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs))
    release = to_release_layout(model.state_dict())
    # layers (2, 1, 2, 1): the downsample into stage s+1 sits after the blocks of stage s
    assert "blocks.0.2.down.weight" in release and "blocks.1.1.down.weight" in release
    assert "blocks.2.2.down.weight" in release and "head.weight" in release
    # the oracle is timm's own release-layout filter, not our converter read backwards
    _assert_same_state(timm_release_filter(dict(release), model), model.state_dict())
    _assert_same_state(sequencer.models.checkpoint_filter_fn(release), model.state_dict())


def test_release_layout_round_trip_of_a_stage_without_blocks(randomize):
    """layers=(1, 0, 1): the downsample into stage 2 is the only entry of stage 1 (to_release_layout raised
    KeyError: 1)."""
    model = randomize(sequencer.create_model("sequencer2d_nano", layers=(1, 0, 1), num_classes=5))
    release = to_release_layout(model.state_dict())
    assert "blocks.0.1.down.weight" in release and "blocks.1.0.down.weight" in release
    _assert_same_state(timm_release_filter(dict(release), model), model.state_dict())
    _assert_same_state(sequencer.models.checkpoint_filter_fn(release), model.state_dict())


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("backend", ["cpu", "native"])
def test_tiny_logits_match_timm_on_each_cpu_backend(backend, tiny_kwargs, randomize):
    """The CPU LSTM backends against timm's model, same weights (a tiny S-shaped network, square and not)."""
    torch.manual_seed(0)
    reference = randomize(timm.create_model("sequencer2d_s", pretrained=False, num_classes=5, **tiny_kwargs),
                          seed=1, scale=0.2).eval()
    ours = sequencer.create_model("sequencer2d_s", num_classes=5, lstm_backend=backend, **tiny_kwargs).eval()
    load_state_dict_into(ours, reference.state_dict())
    with torch.no_grad():
        for height, width in ((28, 28), (28, 56)):
            x = torch.randn(2, 3, height, width)
            expected = reference(x)
            assert expected.abs().max() > 1e-2
            assert rel_max_err(ours(x), expected) <= REL_TOL, (height, width)
