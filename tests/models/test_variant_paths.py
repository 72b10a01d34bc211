"""Every structural variant of the paper (the ablations' cells, directions, unions and missing fc; the 1D models)
gives the numbers of a plain torch.nn.LSTM/GRU/RNN model (tests/plain_sequencer.py) on each path: the LSTM
backends, training gradients, grad checkpointing, headless models, the feature APIs and torch.compile.

The default Sequencer2D is checked against timm elsewhere; this is the matrix for the variants nothing else
compares (a backend that ran an LSTM for a GRU, dropped an axis or read the rows as columns would show here).
fp32 throughout, 1e-5 relative: measured at most 2.4e-6 (a weight gradient) on every path.
"""
import os

import pytest
import torch

import sequencer
from plain_sequencer import (VARIANTS, PlainSequencer, logits_and_grads, randomized, rel_err, tiny_variant_kwargs,
                             variant_input, worst_grad_error)

FP32_TOL = 1e-5
# Triton under the CPU interpreter costs about a second per time step: the variants its fused path treats apart
# (the module-level cat/add/unidirectional/vertical cases are in test_kernels_triton), the GRU/RNN fallbacks, and
# one 1D model
TRITON = [("sequencer2d_s_horizontal", ()), ("gru_sequencer2d_s", ()), ("rnn_sequencer2d_s", ()),
          ("v_sequencer_s_pe", ())]
HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1"  # the models run on CPU tensors (CUDA: test_kernels_triton)
MATRIX = [(name, backend) for name in VARIANTS for backend in ("native", "cpu", "auto")] + [
    pytest.param(name, "triton", marks=[*marks] if isinstance(marks, tuple) else [marks], id=f"{name}-triton")
    for name, marks in TRITON if HAS_TRITON]


def variant(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomized(sequencer.create_model(name, **dict(tiny_variant_kwargs(name), **kwargs)))


@pytest.mark.parametrize("name, backend", MATRIX)
def test_eval_and_training_match_the_plain_model(name, backend):
    """Logits in eval (where ``cpu`` and ``triton`` take their inference kernels) and a training step's gradients
    (input and every parameter), against the plain model with the same weights."""
    model = variant(name, lstm_backend=backend)
    plain = PlainSequencer(model)
    x = variant_input(name)
    with torch.no_grad():
        assert rel_err(model.eval()(x), plain.eval()(x)) <= FP32_TOL
    got, want = logits_and_grads(model.train(), x), logits_and_grads(plain.train(), x)
    assert rel_err(got[0], want[0]) <= FP32_TOL
    assert rel_err(got[1], want[1]) <= FP32_TOL
    assert worst_grad_error(got[2], want[2]) <= FP32_TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_grad_checkpointing_and_headless_models_match(name):
    """Checkpointed blocks give the same gradients; ``num_classes=0`` and ``reset_classifier(0)`` give the plain
    model's pooled features, as ``pre_logits`` does."""
    model = variant(name)
    x = variant_input(name)
    plain = PlainSequencer(model)
    want = logits_and_grads(plain.train(), x)
    model.train().set_grad_checkpointing(True)
    got = logits_and_grads(model, x)
    assert rel_err(got[0], want[0]) <= FP32_TOL and worst_grad_error(got[2], want[2]) <= FP32_TOL

    headless = sequencer.create_model(name, **dict(tiny_variant_kwargs(name), num_classes=0)).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        pooled = plain.eval().stage_maps(x)[1].mean(dim=(1, 2))
        assert rel_err(headless(x), pooled) <= FP32_TOL
        assert rel_err(model.eval().forward_head(model.forward_features(x), pre_logits=True), pooled) <= FP32_TOL
        model.reset_classifier(0)
        assert rel_err(model(x), pooled) <= FP32_TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_feature_maps_match_the_plain_models_stages(name):
    """``forward_intermediates``, ``features_only`` (all stages and a subset) and their ``feature_info``: each map is
    the plain model's stage output, with the channels and reduction reported."""
    model = variant(name).eval()
    x = variant_input(name)
    with torch.no_grad():
        maps, normed = PlainSequencer(model).eval().stage_maps(x)
        final, intermediates = model.forward_intermediates(x)
        assert rel_err(final, normed) <= FP32_TOL
        for got, want, info in zip(intermediates, maps, model.feature_info, strict=True):
            assert rel_err(got, want.permute(0, 3, 1, 2)) <= FP32_TOL
            assert got.shape[1] == info["num_chs"] and x.shape[-1] // got.shape[-1] == info["reduction"]
        trunk = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "norm."))}
        for out_indices in (None, (1, 3)):
            features = sequencer.create_model(name, features_only=True, out_indices=out_indices,
                                              **tiny_variant_kwargs(name)).eval()
            stages = out_indices or range(len(maps))
            features.model.load_state_dict({k: v for k, v in trunk.items() if not k.startswith("stages.")
                                            or int(k.split(".")[1]) <= max(stages)})
            outs = features(x)
            assert features.feature_info.channels() == [o.shape[1] for o in outs]
            assert features.feature_info.reduction() == [x.shape[-1] // o.shape[-1] for o in outs]
            for got, s in zip(outs, stages, strict=True):
                assert rel_err(got, maps[s].permute(0, 3, 1, 2)) <= FP32_TOL


# the variants whose compiled code differs: the recurrent op per cell (GRU, RNN; LSTM training on the oneDNN op,
# one direction), one axis without fc, and the 1D model's raster-order RNN behind a resized position embedding
COMPILED = ("sequencer2d_s_unidirectional", "sequencer2d_vertical", "gru_sequencer2d_s", "rnn_sequencer2d_s",
            "v_sequencer_s_pe")
BF16_TOL = 16 * 2.0 ** -8  # bf16's 8 bits over a dozen matmuls and recurrences (test_reference_paths)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_variants_match_the_plain_model_and_eager_bf16(name):
    """torch.compile (one graph: fullgraph) in eval and in training, fp32, against the plain model; under CPU bf16
    autocast against eager under the same autocast (measured equal; the bound is bf16's, for any CPU's kernels).
    Two stages (dynamo's tracing costs about a second per block); aot_eager (the custom ops and their autograd;
    inductor's code for the rest is the default model's, compared in test_compile)."""
    torch._dynamo.reset()  # each model traced afresh, never cut short by the recompile limit
    torch.manual_seed(0)
    model = randomized(sequencer.create_model(name, **tiny_variant_kwargs(name, stages=2)))
    plain = PlainSequencer(model)
    x = variant_input(name)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled.eval()(x), plain.eval()(x)) <= FP32_TOL
    got, want = logits_and_grads(compiled.train(), x), logits_and_grads(plain.train(), x)
    assert rel_err(got[0], want[0]) <= FP32_TOL and rel_err(got[1], want[1]) <= FP32_TOL
    assert worst_grad_error(got[2], want[2]) <= FP32_TOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = logits_and_grads(compiled, x), logits_and_grads(model, x)
    assert got[0].dtype == want[0].dtype
    assert rel_err(got[0], want[0]) <= BF16_TOL and worst_grad_error(got[2], want[2]) <= BF16_TOL
