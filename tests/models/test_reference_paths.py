"""Every CPU numeric path of our Sequencer2d against timm's port, on inputs where the details show.

The paths: PyTorch's native kernels and oneDNN (each test runs on both, see conftest), bf16 autocast,
``optimize_for_inference`` (fp32; bf16 where oneDNN has bf16 kernels) and the fused Triton LSTM under the
interpreter. The native path (and autocast, Triton without oneDNN) concatenates the axes with ``torch.cat``; the
oneDNN path mixes them without a concatenation: both are compared.

The weights and inputs are chosen so that plausible bugs move the logits far outside the tolerances (checked by
``test_the_inputs_expose_eps_and_axis_order``):
* the stem is scaled down so that the first LayerNorm sees tokens of spread ~1.6e-3 (variance ~2.5e-6): eps 1e-5
  instead of timm's 1e-6 changes the logits by ~46%;
* every weight is randomised (different vertical and horizontal LSTMs, a dense mixing fc), and the input is not
  square (4x6 tokens): mixing [h, v] instead of [v, h], or running an axis along the other one, changes them by
  more than 100%.

bf16 tolerance: a bf16 number keeps 8 significant bits, so each rounding is off by up to 2**-9 relative and a
value is known to about u = 2**-8. The tiny network rounds activations and weights at each of its ~20 matmuls and
LSTMs; the measured logit error relative to the largest logit is 0.6-1.5% (2.5-4 u) on AVX-512/BF16 kernels, for
ours and for timm alike. The bound is 16 u = 6.25%: room for other CPUs' accumulation orders (AVX2 without bf16
kernels runs PyTorch's reference kernels; AMX accumulates in fp32 like AVX512-BF16, in other blocks), and still
7x below the smallest mutation above. fp32 paths must agree to 1e-5 relative, as in test_model_reference.
"""
import copy
import os

import pytest
import timm
import torch
from torch import nn

import sequencer
from sequencer.models.kernels.onednn import onednn_bf16_supported
from sequencer.models.loading import load_state_dict_into

USE_ONEDNN = "both"  # each test on the native kernels and on oneDNN (see conftest)
FP32_TOL = 1e-5
BF16_U = 2.0 ** -8
BF16_TOL = 16 * BF16_U
ARCH = dict(layers=(2, 1, 2, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8), num_classes=7)
STEM_SCALE = 1e-3  # token spread ~1.6e-3 at the first LayerNorm: its eps matters
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py before triton is imported


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, torch.Tensor]:
    """timm's model with every weight randomised and a scaled-down stem, and a non-square input batch."""
    torch.manual_seed(0)
    model = timm.create_model("sequencer2d_s", pretrained=False, **ARCH).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.stem.proj.weight.mul_(STEM_SCALE)
        model.stem.proj.bias.mul_(STEM_SCALE)
    return model, torch.randn(2, 3, 28, 42, generator=g)


def ours(reference, **kwargs) -> nn.Module:
    model = sequencer.create_model("sequencer2d_s", **ARCH, **kwargs).eval()
    load_state_dict_into(model, reference[0].state_dict())
    return model


@torch.no_grad()
def timm_logits(reference, autocast: bool = False) -> torch.Tensor:
    model, x = reference
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(x).float()


@torch.no_grad()
def test_fp32_matches_timm(reference):
    assert rel(ours(reference)(reference[1]), timm_logits(reference)) <= FP32_TOL


def test_optimized_fp32_matches_timm(reference):
    optimized = sequencer.optimize_for_inference(ours(reference))
    assert rel(optimized(reference[1]), timm_logits(reference)) <= FP32_TOL


@torch.no_grad()
def test_bf16_autocast_matches_timm(reference):
    """Under autocast: against timm under the same autocast, and against fp32, each within bf16's precision."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(reference)(reference[1])
    assert got.dtype == torch.bfloat16  # the head ran in bf16: autocast reached the model
    assert rel(got, timm_logits(reference, autocast=True)) <= BF16_TOL
    assert rel(got, timm_logits(reference)) <= BF16_TOL


@pytest.mark.skipif(not onednn_bf16_supported(), reason="oneDNN has no bf16 kernels on this CPU")
def test_optimized_bf16_matches_timm(reference):
    optimized = sequencer.optimize_for_inference(ours(reference), torch.bfloat16)
    got = optimized(reference[1])
    assert rel(got, timm_logits(reference)) > 1e-4  # bf16 did run (fp32 would agree to ~1e-7)
    assert rel(got, timm_logits(reference)) <= BF16_TOL
    assert rel(got, timm_logits(reference, autocast=True)) <= BF16_TOL


@pytest.mark.skipif(not INTERPRETED, reason="the Triton LSTM runs on the CPU only under TRITON_INTERPRET=1")
@torch.no_grad()
def test_triton_backend_matches_timm(reference):
    pytest.importorskip("triton")
    model = ours(reference, lstm_backend="triton")
    assert rel(model(reference[1]), timm_logits(reference)) <= FP32_TOL


@torch.no_grad()
def test_the_inputs_expose_eps_and_axis_order(reference):
    """The mutations the tests above must catch change timm's own logits by far more than any tolerance."""
    expected = timm_logits(reference)
    wrong_eps = copy.deepcopy(reference[0])
    for module in wrong_eps.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.eps == 1e-6
            module.eps = 1e-5
    swapped = copy.deepcopy(reference[0])
    for module in swapped.modules():  # fc columns swapped: the same as concatenating [h, v]
        if isinstance(module, nn.Module) and hasattr(module, "rnn_h") and getattr(module, "fc", None) is not None:
            w = module.fc.weight
            w.copy_(torch.cat(w.chunk(2, dim=1)[::-1], dim=1))
    transposed = reference[1].transpose(2, 3)  # an axis mix-up sees the image transposed
    for changed in (wrong_eps(reference[1]), swapped(reference[1])):
        assert rel(changed, expected) > 4 * BF16_TOL
    assert rel(reference[0](transposed), expected) > 4 * BF16_TOL
