"""Every registered paper model is the authors' model: arguments, parameter counts and token mixing.

The reference is the authors' own registry (github.com/okojoalg/sequencer, ``models/two_dim_sequencer.py`` at
996e327 and ``models/vanilla_sequencer.py`` at 797f4b1): ``AUTHORS_ARGS`` transcribes each of their model functions'
arguments (the ones left out are their class defaults, which are ours: LayerNorm eps 1e-6, GELU, one recurrent
layer, drop-path 0, no stem norm). Checks are cheap: meta-device construction and tiny networks.
"""
import inspect

import pytest
import timm
import torch
from timm.models.sequencer import LSTM2d, Sequencer2d as TimmSequencer2d

import sequencer
from sequencer.models import get_model_entry
from sequencer.models.loading import load_state_dict_into
from sequencer.models.vanilla_sequencer import RNN1d

_S = dict(layers=(4, 3, 8, 3), patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384),
          hidden_sizes=(48, 96, 96, 96), mlp_ratios=(3.0,) * 4, rnn_type="lstm", bidirectional=True, union="cat",
          with_fc=True, img_size=224)
_M = dict(_S, layers=(4, 3, 14, 3))
_L = dict(_S, layers=(8, 8, 16, 4))
_H2X = (96, 192, 192, 192)
_V = dict(layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384,) * 4, hidden_sizes=(192,) * 4,
          mlp_ratios=(3.0,) * 4, rnn_type="lstm", bidirectional=True, img_size=224, ape=False)

AUTHORS_ARGS = {
    "sequencer2d_s": _S, "sequencer2d_m": _M, "sequencer2d_l": _L,
    "sequencer2d_s_392": dict(_S, img_size=392), "sequencer2d_m_392": dict(_M, img_size=392),
    "sequencer2d_l_392": dict(_L, img_size=392),
    "sequencer2d_s_unidirectional": dict(_S, bidirectional=False),
    "sequencer2d_s_add": dict(_S, union="add"),
    "sequencer2d_s_h2x": dict(_S, hidden_sizes=_H2X),
    "sequencer2d_s_without_fc": dict(_S, with_fc=False),
    "sequencer2d_vertical": dict(_S, hidden_sizes=_H2X, union="vertical", with_fc=False),
    "sequencer2d_s_horizontal": dict(_S, hidden_sizes=_H2X, union="horizontal", with_fc=False),
    "gru_sequencer2d_s": dict(_S, rnn_type="gru"),
    "rnn_sequencer2d_s": dict(_S, rnn_type="rnn"),
    "sequencer2d_l_d4_3x": dict(_L, embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128)),
    "v_sequencer_s": _V,
    "v_sequencer_s_h": dict(_V, patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384),
                            hidden_sizes=(96, 192, 192, 192)),
    "v_sequencer_s_pe": dict(_V, ape=True),
}

# Parameters with a 1000-class head, counted by _authors_parameter_count from AUTHORS_ARGS (the layer shapes the
# authors' code builds); S/M/L are also timm's counts, and the paper and the authors' README round them to
# 28M/38M/54M. The paper's ablation and appendix tables were not readable where these were pinned.
PARAMETERS = {
    "sequencer2d_s": 27_651_688, "sequencer2d_m": 38_307_688, "sequencer2d_l": 54_298_216,
    # img_size changes no shape (no position embedding): the 224 px counts
    "sequencer2d_s_392": 27_651_688, "sequencer2d_m_392": 38_307_688, "sequencer2d_l_392": 54_298_216,
    "sequencer2d_s_unidirectional": 20_991_592,  # one direction per axis: fc from 2 axes * 48 (96) channels
    "sequencer2d_s_add": 26_545_768,  # axes added: fc from 2 directions * 48 (96) channels
    "sequencer2d_s_h2x": 45_395_560,
    "sequencer2d_s_without_fc": 25_433_704,  # 2 axes * 2 directions * 48 = 192 channels, no fc
    # one axis, hidden 96 (192), so its two directions give the stage width without an fc: as many weights and
    # LSTM biases as S, less S's fc bias (192 or 384 per block); v_sequencer_s_h has the same shapes
    "sequencer2d_vertical": 27_645_544, "sequencer2d_s_horizontal": 27_645_544,
    "gru_sequencer2d_s": 24_874_600, "rnn_sequencer2d_s": 19_320_424,  # S's hidden sizes, 3 / 1 gates
    "sequencer2d_l_d4_3x": 96_252_392,
    "v_sequencer_s": 33_016_552,  # 14 px patches, 16x16 tokens of 384 channels, three 1x1 downsample convs
    "v_sequencer_s_h": 27_645_544,
    "v_sequencer_s_pe": 33_114_856,  # v_sequencer_s + a (1, 16, 16, 384) position embedding
}

_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _authors_parameter_count(a: dict, num_classes: int = 1000) -> int:
    """Weights and biases of every layer the authors' definition builds for arguments ``a``."""
    def linear(fan_in, fan_out):
        return fan_in * fan_out + fan_out

    def conv(patch, fan_in, fan_out):
        return patch * patch * fan_in * fan_out + fan_out

    def recurrent(dim, hidden):  # input-hidden, hidden-hidden weights and two biases per gate, per direction
        return (2 if a["bidirectional"] else 1) * _GATES[a["rnn_type"]] * hidden * (dim + hidden + 2)

    dims, vanilla = a["embed_dims"], "ape" in a
    total = conv(a["patch_sizes"][0], 3, dims[0]) + linear(dims[-1], num_classes) + 2 * dims[-1]  # + final norm
    if a.get("ape"):
        total += (a["img_size"] // a["patch_sizes"][0]) ** 2 * dims[0]
    for stage, depth in enumerate(a["layers"]):
        dim, hidden, mlp = dims[stage], a["hidden_sizes"][stage], int(a["mlp_ratios"][stage] * dims[stage])
        if vanilla:  # one BiLSTM over the tokens, no projection
            mixer = recurrent(dim, hidden)
        else:
            one_axis = a["union"] in ("vertical", "horizontal")
            mixer = (1 if one_axis else 2) * recurrent(dim, hidden)
            if a["with_fc"]:
                per_axis = hidden * (2 if a["bidirectional"] else 1)
                mixer += linear(per_axis * (2 if a["union"] == "cat" else 1), dim)
        total += depth * (4 * dim + mixer + linear(dim, mlp) + linear(mlp, dim))  # + two LayerNorms
        if stage > 0:
            total += conv(a["patch_sizes"][stage], dims[stage - 1], dim)
    return total


def test_every_registered_paper_model_has_the_authors_arguments_here():
    assert set(AUTHORS_ARGS) == set(PARAMETERS) == set(sequencer.list_models()) - {"sequencer2d_nano"}


@pytest.mark.parametrize("name", sorted(AUTHORS_ARGS))
def test_registered_arguments_are_the_authors(name):
    entry = get_model_entry(name)
    defaults = {}
    for klass in reversed(entry.cls.__mro__):
        if "__init__" in vars(klass) and klass.__module__.startswith("sequencer."):
            defaults.update({p.name: p.default for p in inspect.signature(klass.__init__).parameters.values()
                             if p.default is not inspect.Parameter.empty})
    ours = dict(defaults, **entry.kwargs)
    for key, value in AUTHORS_ARGS[name].items():
        assert (tuple(ours[key]) if isinstance(value, tuple) else ours[key]) == value, (name, key)
    assert (ours["num_rnn_layers"], ours["drop_path_rate"], ours["stem_norm"]) == (1, 0.0, False)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_counts_are_the_authors(name):
    with torch.device("meta"):  # counting needs no memory or init
        model = sequencer.create_model(name)
    assert _authors_parameter_count(AUTHORS_ARGS[name]) == PARAMETERS[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


class _Gru2d(LSTM2d):
    """timm's BiLSTM2D with its LSTMs replaced by GRUs of the same sizes: the authors' GRU2D (timm ports LSTMs only)."""
    cell = torch.nn.GRU

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for axis in ("rnn_v", "rnn_h"):
            lstm = getattr(self, axis)
            if isinstance(lstm, torch.nn.LSTM):
                setattr(self, axis, self.cell(lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=True,
                                              bidirectional=lstm.bidirectional))


class _Rnn2d(_Gru2d):
    cell = torch.nn.RNN  # tanh


_TIMM_RNN_LAYERS = {"lstm": LSTM2d, "gru": _Gru2d, "rnn": _Rnn2d}


@pytest.mark.parametrize("name", ["sequencer2d_s_unidirectional", "sequencer2d_s_add", "sequencer2d_s_without_fc",
                                  "sequencer2d_vertical", "sequencer2d_s_horizontal", "gru_sequencer2d_s",
                                  "rnn_sequencer2d_s"])
def test_ablations_mix_tokens_as_timms_port(name, randomize):
    """Same logits as timm's Sequencer2d given the authors' union / fc / direction / cell for this ablation, on a
    tiny network with the ablation's hidden-to-width ratio (which axis, what the fc reads, add vs concatenate)."""
    a = AUTHORS_ARGS[name]
    hidden = (8, 16, 16, 16) if a["hidden_sizes"] == _H2X else (4, 8, 8, 8)
    shape = dict(layers=(2, 1, 2, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=hidden)
    torch.manual_seed(0)
    reference = TimmSequencer2d(num_classes=5, patch_sizes=a["patch_sizes"], rnn_layer=_TIMM_RNN_LAYERS[a["rnn_type"]],
                                bidirectional=a["bidirectional"], union=a["union"], with_fc=a["with_fc"], **shape)
    reference = randomize(reference, seed=1, scale=0.2).eval()
    ours = sequencer.create_model(name, num_classes=5, **shape).eval()
    load_state_dict_into(ours, reference.state_dict())
    x = torch.randn(2, 3, 28, 42)  # 4x6 then 2x3 tokens: rows and columns differ
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_vanilla_sequencer_reads_tokens_row_by_row():
    """The 1D models' LSTM runs over the tokens in raster order (the authors flatten (H, W) row-major): a forward
    LSTM's outputs before a changed token, in that order, stay the same; from it on they change."""
    torch.manual_seed(0)
    mixer = RNN1d(4, 4, bidirectional=False).eval()
    x = torch.randn(1, 3, 5, 4)
    changed = x.clone()
    changed[0, 2, 0] += 1.0  # raster position 2 * 5 = 10 (column by column it would be 2)
    with torch.no_grad():
        before, after = mixer(x).reshape(15, 4), mixer(changed).reshape(15, 4)
    same = (before - after).abs().amax(-1) < 1e-7
    assert same.tolist() == [True] * 10 + [False] * 5


@pytest.mark.parametrize("name", sorted(AUTHORS_ARGS))
def test_pretrained_cfg_is_the_authors_and_timms(name):
    """The authors' ``_cfg`` (every model of theirs) has timm's sequencer2d_* values; ours differ only where noted."""
    theirs = timm.models.get_pretrained_cfg("sequencer2d_s.in1k").to_dict()
    ours = get_model_entry(name).pretrained_cfg
    if name.endswith("_392"):
        # the authors' registry hands these their 224 px model's cfg (and its 224 px release URL); the input size and
        # crop are those of their README's 392 px fine-tuning command
        theirs.update(input_size=(3, 392, 392), crop_pct=1.0)
    for key in ("num_classes", "input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"):
        assert ours[key] == theirs[key], (name, key)
    # any input whose sides are multiples of the patch reduction works (timm and the authors say fixed)
    assert ours["fixed_input_size"] is False and theirs["fixed_input_size"] is True
    has_release = name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")
    assert ours["url"] == (f"https://github.com/okojoalg/sequencer/releases/download/weights/{name}.pth"
                           if has_release else "")
    assert ours.get("hf_hub_id") == (f"timm/{name}.in1k" if has_release else None)
