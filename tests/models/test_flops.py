"""count_macs: the paper's GMACs, the RNN formula, agreement with torch's FLOP counter, and no side effects."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sequencer
from sequencer.models import get_model_entry
from sequencer.models.flops import count_macs, rnn_macs


@pytest.mark.parametrize("name, paper_gmacs", [("sequencer2d_s", 8.4), ("sequencer2d_m", 11.1),
                                               ("sequencer2d_l", 16.6)])
def test_gmacs_at_224_within_3_percent_of_the_paper(name, paper_gmacs):
    with torch.device("meta"):
        model = sequencer.create_model(name)
    assert count_macs(model, (3, 224, 224)) / 1e9 == pytest.approx(paper_gmacs, rel=0.03)


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_rnn_formula(cls, gates):
    rnn = cls(10, 6, num_layers=2, bidirectional=True, batch_first=True)
    # per step, direction and sequence: gates * hidden * (input + hidden); layer 2 reads both directions (12)
    per_step = gates * 6 * (10 + 6) + gates * 6 * (12 + 6)
    assert rnn_macs(rnn, seq_len=5, num_seqs=3) == per_step * 2 * 5 * 3


def test_tiny_model_by_hand(tiny_kwargs):
    # one stage, 28 px input, patch 7: a 4x4 grid of 16-channel tokens, BiLSTM2D hidden 4, MLP ratio 3
    model = sequencer.create_model("sequencer2d_s", num_classes=5, layers=(1,), patch_sizes=(7,), embed_dims=(16,),
                                   hidden_sizes=(4,), mlp_ratios=(3.0,))
    tokens, c, h = 16, 16, 4
    stem = tokens * c * 3 * 7 * 7
    lstm = 2 * 2 * 4 * h * (c + h) * tokens  # 2 axes x 2 directions, 4 gates, one step per token
    fc = tokens * (4 * h) * c
    mlp = 2 * tokens * c * 3 * c
    head = c * 5
    assert count_macs(model, (3, 28, 28)) == stem + lstm + fc + mlp + head


@pytest.mark.parametrize("name, hidden", [("sequencer2d_s", 8), ("sequencer2d_s_without_fc", 8),
                                          ("gru_sequencer2d_s", 8), ("v_sequencer_s", 16),
                                          ("sequencer2d_s_horizontal", 16)])
def test_agrees_with_torch_flop_counter(name, hidden):
    # FlopCounterMode counts 2 FLOPs per multiply-add of the matrix products, incl. those inside the RNN kernels
    # once oneDNN is off; it needs a real forward, so the model is small: 2x2 tokens at the last stage
    model = sequencer.create_model(name, layers=(1, 1, 2, 1), embed_dims=(32,) * 4, hidden_sizes=(hidden,) * 4)
    side = 28
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, side, side))
    assert count_macs(model, (3, side, side)) == pytest.approx(counter.get_total_flops() / 2, rel=1e-3)


def test_count_has_no_side_effects(tiny_kwargs, randomize):
    model = randomize(sequencer.create_model("sequencer2d_s", **tiny_kwargs)).train()
    x = torch.randn(1, 3, 28, 28)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    model.stem.eval()  # the caller's frozen part
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 28, 28))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before)  # the real recurrent layers run again


def test_a_forward_of_the_callers_own_on_a_recurrent_layer_stays(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", **tiny_kwargs)
    rnn = next(m for m in model.modules() if isinstance(m, nn.RNNBase))
    own = rnn.forward  # e.g. a wrapper the caller set on the instance
    rnn.forward = own
    count_macs(model, (3, 28, 28))
    assert vars(rnn)["forward"] is own


def test_gmacs_grow_with_resolution_and_meta_equals_real(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", **tiny_kwargs)
    with torch.device("meta"):
        meta = sequencer.create_model("sequencer2d_s", **tiny_kwargs)
    assert count_macs(meta, (3, 56, 56)) == count_macs(model, (3, 56, 56))
    # every layer is per token here, so MACs scale with the token count (4x the pixels, 4x the tokens)
    head = 32 * 1000
    assert count_macs(model, (3, 112, 112)) - head == 4 * (count_macs(model, (3, 56, 56)) - head)


def test_readme_model_table_quotes_the_counts_the_code_gives():
    """README's table of s/m/l: params (1000-class head) and GMACs @224 as `sequencer models` prints them."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| (sequencer2d_[sml]) \| [\d, ]+ \| ([\d.]+)M \| ([\d.]+) \|", readme, flags=re.M)
    assert [name for name, _, _ in rows] == ["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"]
    for name, params, gmacs in rows:
        with torch.device("meta"):
            model = sequencer.create_model(name)
        assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}" == params, name
        assert f"{count_macs(model, (3, 224, 224)) / 1e9:.2f}" == gmacs, name


_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _macs_by_hand(name: str, side: int) -> int:
    """The matrix products of a registered model at ``side`` px, from its arguments alone: stem and downsample
    convs, per block the recurrences (gates * hidden * (input + hidden) per token, step, direction and axis: a
    GRU has 3 gates, a plain RNN 1, one direction half of two, one axis half of two, and a 1D model's one RNN
    reads each token once), the fusing fc (from 2 axes * directions * hidden channels, or 1 axis' when added or
    alone; none without fc) and the MLP, then a 1000-class head."""
    a = dict(get_model_entry(name).kwargs)
    directions = 2 if a.get("bidirectional", True) else 1
    union, vanilla = a.get("union", "cat"), "ape" in a or name.startswith("v_")
    axes = 1 if vanilla or union in ("vertical", "horizontal") else 2
    grid, channels, total = side, 3, 0
    for patch, depth, dim, hidden, ratio in zip(a["patch_sizes"], a["layers"], a["embed_dims"], a["hidden_sizes"],
                                                a["mlp_ratios"]):
        grid //= patch
        tokens = grid * grid
        total += tokens * channels * dim * patch * patch
        recurrence = axes * directions * _GATES[a.get("rnn_type", "lstm")] * hidden * (dim + hidden) * tokens
        mixed = directions * hidden * (2 if union == "cat" else 1)  # what the fusing fc reads
        fc = 0 if vanilla or not a.get("with_fc", True) else tokens * mixed * dim
        total += depth * (recurrence + fc + 2 * tokens * dim * int(ratio * dim))
        channels = dim
    return total + channels * 1000


@pytest.mark.parametrize("name", sorted(n for n in sequencer.list_models() if n != "sequencer2d_nano"))
def test_every_paper_model_counts_its_own_cells_directions_and_axes(name):
    """count_macs (what `sequencer models` prints) for each paper model, ablations and 1D models included, equals
    the count by hand from its arguments: a GRU counted with an LSTM's 4 gates, or both axes counted for a
    one-axis model, would not."""
    with torch.device("meta"):
        model = sequencer.create_model(name)
    assert count_macs(model, (3, 224, 224)) == _macs_by_hand(name, 224)
