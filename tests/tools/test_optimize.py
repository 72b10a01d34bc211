"""Equality of the fast paths: oneDNN linear, the re-laid-out RNN2d forward, and optimize_for_inference."""
from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sequencer
from sequencer.errors import SequencerError
from sequencer.models import create_model
from sequencer.models.kernels.onednn import onednn_bf16_supported
from sequencer.models.sequencer2d import Mlp, RNN2d, linear
from plain_sequencer import VARIANTS, PlainSequencer, randomized, tiny_variant_kwargs, variant_input

TINY_S = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8), num_classes=5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_s(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("sequencer2d_s", **dict(TINY_S, **kw))
    nn.init.normal_(model.head.fc.weight, std=0.5)  # the zero-initialised head would make every logit 0
    return model.eval()


def assert_same_grads(y, y_ref, x, x_ref, m: nn.Module, m_ref: nn.Module, tol: float) -> None:
    """Backpropagate one random cotangent through both; input and parameter gradients must agree within tol."""
    g = torch.randn_like(y)
    (y * g).float().sum().backward()
    (y_ref * g).float().sum().backward()
    assert x.grad.dtype == x_ref.grad.dtype and rel(x.grad, x_ref.grad) < tol
    for (n, p), p_ref in zip(m.named_parameters(), m_ref.parameters()):
        assert p.grad.dtype == p.dtype and rel(p.grad, p_ref.grad) < tol, n


def reference_rnn2d(m: RNN2d, x: torch.Tensor) -> torch.Tensor:
    """The textbook BiLSTM2D: per-axis nn.LSTM on batch-first sequences, concatenate / add, fc."""
    B, H, W, C = x.shape
    v = h = None
    if m.rnn_v is not None:
        v, _ = m.rnn_v(x.permute(0, 2, 1, 3).reshape(B * W, H, C))
        v = v.reshape(B, W, H, -1).permute(0, 2, 1, 3)
    if m.rnn_h is not None:
        h, _ = m.rnn_h(x.reshape(B * H, W, C))
        h = h.reshape(B, H, W, -1)
    if v is not None and h is not None:
        y = torch.cat([v, h], -1) if m.union == "cat" else v + h
    else:
        y = v if v is not None else h
    return F.linear(y, m.fc.weight, m.fc.bias) if m.fc is not None else y


@pytest.mark.parametrize("kw", [
    dict(), dict(union="add"), dict(union="vertical", hidden_sizes=8, with_fc=False),
    dict(union="horizontal", hidden_sizes=8, with_fc=False), dict(rnn_type="gru"), dict(rnn_type="rnn"),
    dict(bidirectional=False), dict(with_fc=False, hidden_sizes=4),
])
def test_rnn2d_matches_textbook_forward_and_grads(kw):
    torch.manual_seed(0)
    hidden = kw.pop("hidden_sizes", 6)
    m = RNN2d(16, hidden, **kw)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)  # H != W catches any axis mix-up
    y = m(x)
    assert y.shape == (2, 5, 3, 16) and y.is_contiguous()
    x_ref = x.detach().clone().requires_grad_()
    m_ref = copy.deepcopy(m)
    y_ref = reference_rnn2d(m_ref, x_ref)
    assert rel(y, y_ref) < 1e-5
    assert_same_grads(y, y_ref, x, x_ref, m, m_ref, 1e-4)


@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 5, 12)])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_matches_f_linear_with_grads(shape, activation):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(10, 12, requires_grad=True)
    bias = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        fused = linear(x, weight, bias, activation)
    y = linear(x, weight, bias, activation)
    ref_act = F.gelu if activation else (lambda t: t)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y_ref = ref_act(F.linear(xr, wr, br))
    assert rel(fused, y_ref) < 1e-5 and rel(y, y_ref) < 1e-5
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for a, b in ((x, xr), (weight, wr), (bias, br)):
        assert rel(a.grad, b.grad) < 1e-5


def _saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn()`` runs (tensors stored by the graph, each counted once)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _textbook_mlp(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)


@pytest.mark.parametrize("autocast", [False, True])
def test_training_mlp_saves_one_hidden_activation_with_the_same_grads(autocast):
    """fp32, and under CPU bf16 autocast (where it must give what autocast gives, with fp32 gradients)."""
    torch.manual_seed(0)
    m = Mlp(16, 48).train()
    m_ref = copy.deepcopy(m)
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, saved = _saved_bytes(lambda: m(x))
        y_ref, saved_ref = _saved_bytes(lambda: _textbook_mlp(m_ref, x_ref))
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    hidden_bytes = 2 * 4 * 5 * 48 * y.element_size()
    if autocast and not onednn_bf16_supported():
        assert saved == saved_ref  # no oneDNN bf16 kernels on this CPU: autocast's own path, unchanged
    else:
        assert saved <= saved_ref - hidden_bytes  # GELU's output is recomputed in backward, not kept
    assert rel(y, y_ref) < (1e-2 if autocast else 1e-6)
    assert_same_grads(y, y_ref, x, x_ref, m, m_ref, 2e-2 if autocast else 1e-5)


def test_training_mlp_with_dropout_keeps_autograd_path():
    torch.manual_seed(0)
    m = Mlp(16, 48, drop=0.5).train()
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    _, saved = _saved_bytes(lambda: m(x))
    _, saved_ref = _saved_bytes(lambda: m.drop2(m.fc2(m.drop1(m.act(m.fc1(x))))))
    assert saved == saved_ref


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_under_bf16_autocast_inference_matches_autocast(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 64), torch.randn(96, 64) / 8, torch.randn(96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b, activation)
        expected = F.linear(x, w, b)
        expected = F.gelu(expected) if activation else expected
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel(out, expected) < 1e-2  # GELU fused on the fp32 accumulator: rounded once instead of twice


def test_linear_keeps_autocast_and_tracing_semantics():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16  # autocast still applies
    traced = torch.jit.trace(lambda t: linear(t, w), (x,))
    assert "mkldnn" not in str(traced.graph)  # exported graphs see plain aten.linear


def test_eager_model_matches_timm_logits_and_grads():
    ours = tiny_s()
    ref = timm.create_model("sequencer2d_s", **TINY_S)
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert rel(ours(x), ref(x)) < 1e-5
    ours.train(), ref.train()
    target = torch.tensor([1, 3])
    F.cross_entropy(ours(x), target).backward()
    F.cross_entropy(ref(x), target).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, ref_params[name].grad) < 1e-4, name


@pytest.mark.slow
def test_full_size_sequencer2d_s_matches_timm():
    torch.manual_seed(0)
    ours = create_model("sequencer2d_s").eval()
    nn.init.normal_(ours.head.fc.weight, std=0.02)
    ref = timm.create_model("sequencer2d_s").eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = ref(x)
        assert rel(ours(x), expected) < 1e-5
        assert rel(sequencer.optimize_for_inference(ours)(x), expected) < 1e-4


def test_optimize_float32_same_logits_and_model_untouched():
    model = tiny_s().train()
    model.stages[0].blocks[0].mlp_channels.fc1.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    fast = sequencer.optimize_for_inference(model, torch.float32)
    x = torch.randn(3, 3, 32, 32)
    out = fast(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert rel(out, expected) < 1e-5
    assert fast.model is not model and not fast.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert fast.model_name == "sequencer2d_s"
    assert fast.eval() is fast and not fast.training


def test_optimize_a_half_or_double_model_runs_float32():
    """A ``.half()`` or ``.double()`` model's float32 copy has float32 weights: its logits are the float32 model's
    of the same weights. Before, the copy kept the model's weights and cast the input to float32 ("Input type
    (float) and bias type (c10::Half) should be the same")."""
    x = torch.randn(2, 3, 32, 32)
    for dtype in (torch.float16, torch.float64):
        model = tiny_s().to(dtype)
        with torch.no_grad():
            expected = copy.deepcopy(model).float()(x)
        fast = sequencer.optimize_for_inference(model, torch.float32)
        assert rel(fast(x), expected) < 1e-5 and next(model.parameters()).dtype == dtype


@pytest.mark.parametrize("call, what", [
    (lambda fast: fast.train(), "train the original module"),
    (lambda fast: fast.train(True), "train the original module"),
    (lambda fast: fast.state_dict(), "take state_dict() from the original module"),
    (lambda fast: fast.load_state_dict({}), "load_state_dict() into the original module"),
])
def test_the_optimized_model_says_it_is_inference_only(call, what):
    """train(), state_dict() and load_state_dict() on optimize_for_inference's result raise one line pointing at
    the original module (before: train() did nothing, state_dict() keys gained a ``model.`` prefix); eval() and
    train(False) still work and the model still runs."""
    fast = sequencer.optimize_for_inference(tiny_s(), torch.float32)
    with pytest.raises(SequencerError, match="is inference-only") as error:
        call(fast)
    assert what in str(error.value) and "\n" not in str(error.value)
    assert fast.train(False) is fast and fast.eval() is fast and not fast.training
    assert fast(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_optimize_bfloat16_close_to_float32():
    """A bfloat16 copy where this CPU has native bf16 kernels; float32 (with a note) where it has none."""
    model = tiny_s()
    fast = sequencer.optimize_for_inference(model, torch.bfloat16)
    assert next(fast.model.parameters()).dtype == (torch.bfloat16 if onednn_bf16_supported() else torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    x = torch.randn(4, 3, 32, 32)
    out = fast(x)
    with torch.no_grad():
        expected = model(x)
    assert out.dtype == torch.float32
    assert rel(out, expected) < 5e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_optimize_every_variant_gives_the_plain_models_logits(name):
    """Each ablation and 1D model optimized in float32 gives the plain torch.nn model's logits
    (tests/plain_sequencer.py); in bf16 (float32 with a note where this CPU has no bf16 kernels) within bf16's 8
    bits over a dozen matmuls and recurrences (16 units of 2**-8, for any CPU's kernels)."""
    torch.manual_seed(0)
    model = randomized(create_model(name, **tiny_variant_kwargs(name))).eval()
    x = variant_input(name)
    with torch.no_grad():
        expected = PlainSequencer(model).eval()(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 16 * 2.0 ** -8)):
        out = sequencer.optimize_for_inference(model, dtype)(x)
        assert out.dtype == torch.float32 and rel(out, expected) <= tol, dtype


def test_optimize_features_only_and_other_models():
    torch.manual_seed(0)
    feats = create_model("sequencer2d_nano", features_only=True, layers=(1, 1, 1), embed_dims=(8, 16, 16),
                         hidden_sizes=(2, 4, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = sequencer.optimize_for_inference(feats)(x)
    with torch.no_grad():
        expected = feats(x)
    assert len(maps) == len(expected) == 3
    for a, b in zip(maps, expected):
        assert a.shape == b.shape and rel(a, b) < 1e-5


def test_optimize_a_detection_backbone_on_streams_gives_its_levels_in_float32(two_threads):
    """create_backbone returns an OrderedDict of levels: batch 3 on 2 streams crashed joining the streams' dicts
    (TypeError: torch.cat of the keys), and in bf16 the levels came back in bf16, not the float32 promised; the copy
    lacked the ``out_channels`` a torchvision detector reads."""
    torch.manual_seed(0)
    backbone = sequencer.create_backbone("sequencer2d_nano", out_channels=8, layers=(1, 1, 1), embed_dims=(8, 16, 16),
                                         hidden_sizes=(2, 4, 4)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        fast = sequencer.optimize_for_inference(backbone, dtype)
        assert (fast.out_channels, fast.strides) == (8, (4, 8, 16, 32))  # what torchvision's detectors read
        assert fast.feature_info.reduction() == [4, 8, 16, 32, 64]  # timm's description of the levels, too
        levels = fast(x)
        assert type(levels) is type(expected) and list(levels) == list(expected) == ["0", "1", "2", "3", "pool"]
        for key, level in levels.items():
            assert level.dtype == torch.float32 and level.shape == expected[key].shape
            assert rel(level, expected[key]) < tol, (dtype, key)


def test_optimize_rejects_bad_input():
    with pytest.raises(SequencerError, match="dtype"):
        sequencer.optimize_for_inference(tiny_s(), torch.int8)
    with pytest.raises(SequencerError, match="nn.Module"):
        sequencer.optimize_for_inference(lambda x: x)


def test_optimize_float16_on_cpu_follows_the_one_rule(caplog):
    """float16 off CUDA runs bfloat16 with a note, as --amp-dtype float16 does (engine/amp.py autocast_dtype), and
    gives the bfloat16 copy's logits; float32 where this CPU has no native bf16 kernels."""
    from sequencer.models.kernels import onednn_bf16_supported

    model, x = tiny_s(), torch.randn(2, 3, 28, 28)
    with caplog.at_level("WARNING", logger="sequencer"):
        half = sequencer.optimize_for_inference(model, torch.float16)
    assert "`dtype=float16`: float16 autocast needs CUDA; running bfloat16 on cpu" in caplog.text
    ran = torch.bfloat16 if onednn_bf16_supported() else torch.float32
    assert half.dtype == ran
    torch.testing.assert_close(half(x), sequencer.optimize_for_inference(model, ran)(x), rtol=0, atol=0)


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set this process's CPU flags (``SEQUENCER_CPU_FLAGS``) for one test; the real ones are read again after."""
    from sequencer.hardware import cpu_info

    def set_flags(flags: str) -> None:
        monkeypatch.setenv("SEQUENCER_CPU_FLAGS", flags)
        cpu_info.cache_clear()
    yield set_flags
    monkeypatch.delenv("SEQUENCER_CPU_FLAGS", raising=False)
    cpu_info.cache_clear()


AVX512 = "avx2 fma avx512f avx512bw avx512vl"


@pytest.mark.parametrize("flags, expected", [
    ("avx2 fma", torch.float32),
    (AVX512 + " avx512_vnni", torch.float32),
    (AVX512 + " avx512_vnni avx512_bf16", torch.bfloat16),
    (AVX512 + " avx512_vnni avx512_bf16 amx_tile amx_bf16", torch.bfloat16),
], ids=["avx2", "avx512-vnni", "avx512-bf16", "amx"])
def test_auto_dtype_by_cpu_class(cpu_flags, monkeypatch, flags, expected):
    cpu_flags(flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # what every caller asks
    assert sequencer.optimize_for_inference(tiny_s(), "auto").dtype == expected


def test_bf16_without_native_kernels_runs_fp32_with_a_note(cpu_flags, monkeypatch, caplog):
    """No AVX512-BF16/AMX: bf16 would take PyTorch's slow reference kernels, so float32 runs, said in one logged
    warning of the "sequencer" logger (the CLI shows it on stderr)."""
    cpu_flags(AVX512 + " avx512_vnni avx512_bf16")  # even a bf16 CPU class: oneDNN's own answer decides
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # what every caller asks
    model = tiny_s()
    with caplog.at_level(logging.WARNING, logger="sequencer"):
        fast = sequencer.optimize_for_inference(model, torch.bfloat16)
    notes = [r for r in caplog.records if r.name.startswith("sequencer.")]
    assert fast.dtype == torch.float32 and all(p.dtype == torch.float32 for p in fast.parameters())
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    assert "no native bf16 kernels" in notes[0].getMessage() and "float32" in notes[0].getMessage()
    assert sequencer.optimize_for_inference(model, "auto").dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(fast(x), model(x)) < 1e-5


def test_unknown_dtype_name_is_refused():
    with pytest.raises(SequencerError, match="dtype must be a torch.dtype or 'auto'"):
        sequencer.optimize_for_inference(tiny_s(), "fastest")


class _Recorder(nn.Module):
    """Records, per call, the thread it ran on and the intra-op threads that thread had; returns x * 2 (and a
    second, pooled output to check list outputs are joined)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = []
        self.fail = fail

    def forward(self, x):
        import threading
        self.calls.append((threading.get_ident(), torch.get_num_threads(), x.shape[0],
                           torch.is_inference_mode_enabled()))
        if self.fail:
            raise ValueError("boom in a stream")
        return [x * self.scale, x.mean(dim=(1, 2, 3))]


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def test_streams_split_the_batch_over_single_threaded_workers(two_threads):
    """Batch 5 on 2 threads: chunks of 3 and 2, each run on a worker thread with one intra-op thread, in inference
    mode, joined in order; this thread keeps its 2 threads and waits. (Which worker runs which chunk is the pool's
    business: one that finishes its chunk early may take the next, so only the threads' counts are asserted.)"""
    import threading
    fast = sequencer.optimize_for_inference(_Recorder(), torch.float32)
    recorder = fast.model
    x = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    doubled, means = fast(x)
    assert torch.equal(doubled, x * 2) and torch.equal(means, x.mean(dim=(1, 2, 3)))
    assert len(recorder.calls) == 2 and threading.get_ident() not in {ident for ident, *_ in recorder.calls}
    assert sorted((n, b, inf) for _, n, b, inf in recorder.calls) == [(1, 2, True), (1, 3, True)]
    assert torch.get_num_threads() == 2


def test_streams_share_every_thread_when_the_count_does_not_divide(two_threads):
    """3 threads over 2 streams: shares of 2 and 1, none lost to rounding down (issue 25 item 7)."""
    torch.set_num_threads(3)
    fast = sequencer.optimize_for_inference(_Recorder(), torch.float32, streams=2)
    fast(torch.randn(4, 3, 2, 2))
    assert sorted((n, b) for _, n, b, _ in fast.model.calls) == [(1, 2), (2, 2)]
    torch.set_num_threads(5)
    fast(torch.randn(6, 3, 2, 2))
    assert sorted(n for _, n, _, _ in fast.model.calls[2:]) == [2, 3]


def test_streams_off_for_one_image_one_stream_or_one_thread(two_threads):
    import threading
    x = torch.randn(4, 3, 2, 2)
    for streams, batch, threads in ((None, 1, 2), (1, 4, 2), (None, 4, 1)):
        torch.set_num_threads(threads)
        fast = sequencer.optimize_for_inference(_Recorder(), torch.float32, streams=streams)
        fast(x[:batch])
        assert [(ident, b) for ident, _, b, _ in fast.model.calls] == [(threading.get_ident(), batch)]


def test_streams_more_than_threads_share_one_thread_each(two_threads):
    fast = sequencer.optimize_for_inference(_Recorder(), torch.float32, streams=3)
    fast(torch.randn(7, 3, 2, 2))
    assert sorted((n, b) for _, n, b, _ in fast.model.calls) == [(1, 2), (1, 2), (1, 3)]


def test_streams_give_the_models_logits_and_errors(two_threads):
    """Real model, uneven chunks (3 images on 2 streams): the logits of the one-stream path; a stream's error
    reaches the caller."""
    model = tiny_s()
    x = torch.randn(3, 3, 32, 32)
    streamed = sequencer.optimize_for_inference(model, torch.float32)(x)
    single = sequencer.optimize_for_inference(model, torch.float32, streams=1)(x)
    with torch.no_grad():
        expected = model(x)
    assert rel(streamed, single) < 1e-6 and rel(streamed, expected) < 1e-5
    with pytest.raises(ValueError, match="boom in a stream"):
        sequencer.optimize_for_inference(_Recorder(fail=True), torch.float32)(torch.randn(2, 3, 2, 2))


def test_stream_pool_is_made_again_after_a_fork(two_threads, monkeypatch):
    from sequencer.tools import optimize
    fast = sequencer.optimize_for_inference(_Recorder(), torch.float32)
    fast(torch.randn(2, 3, 2, 2))
    pool = optimize._streams_of(fast)
    before = pool._executor
    monkeypatch.setattr(pool, "_pid", -1)  # as in a child process: the parent's threads are gone
    fast(torch.randn(2, 3, 2, 2))
    assert pool._executor is not before and len(fast.model.calls) == 4


def test_a_models_stream_pool_is_made_once(two_threads, monkeypatch):
    """Its first streamed batch makes the model's pool, later batches find it: none is built and thrown away per
    batch (``setdefault``'s default was made at every call)."""
    from sequencer.tools import optimize
    made = []

    class Counted(optimize._StreamPool):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(optimize, "_StreamPool", Counted)
    fast = sequencer.optimize_for_inference(_Recorder(), torch.float32)
    for _ in range(3):
        fast(torch.randn(2, 3, 2, 2))
    assert len(made) == 1 and len(fast.model.calls) == 6


@pytest.mark.parametrize("streams", [0, -1, 1.5, True, "2"])
def test_streams_must_be_a_positive_integer(streams):
    """Checked as every positive-int argument is (errors.checked_positive_int): the one-line error names
    the value."""
    with pytest.raises(SequencerError, match=re.escape(f"streams={streams!r}: must be a positive integer")):
        sequencer.optimize_for_inference(tiny_s(), torch.float32, streams=streams)


def test_streams_may_be_an_integer_of_numpy():
    assert sequencer.optimize_for_inference(tiny_s(), torch.float32, streams=np.int64(2)).streams == 2
