"""The fused Triton LSTM against nn.LSTM: outputs, input and weight gradients; both kernels (held, tiled); the
backend switch.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set in tests/conftest.py), which
is slow per operation: the cases below cover the ranges (odd sequence counts, T 1..33, hidden 8..192, both
directions, one and two layers) with small tensors. With CUDA the same tests run on the GPU, against references
computed without TF32 (PyTorch's default lets cuDNN's fp32 LSTM use it, which makes the reference the inexact
side). Whether each configuration fits each GPU's shared memory is tests/models/test_triton_fits_gpus.py's.
"""
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from sequencer.errors import SequencerError  # noqa: E402
from sequencer.models import create_model  # noqa: E402
from sequencer.models.kernels import recurrence, triton_lstm_config, triton_lstm_kernels  # noqa: E402
from sequencer.models.kernels.code_key import KERNEL_CODE  # noqa: E402
from sequencer.models.sequencer2d import RNN2d  # noqa: E402
from sequencer.versions import release  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() and not INTERPRETED else [])
pytestmark = [pytest.mark.skipif(not DEVICES, reason="needs CUDA, or TRITON_INTERPRET=1 where the interpreter runs "
                                    "the kernels (Triton 3.6-3.9: tests/conftest.py)"),
              pytest.mark.usefixtures("no_tf32")]  # references in true fp32 (tests/conftest.py)
USE_ONEDNN = False  # reference on PyTorch's plain CPU kernels (see conftest)


@pytest.fixture(autouse=True)
def interpreter_on_older_releases(monkeypatch):
    """Under the interpreter, what newer releases do themselves is done here for torch 2.11 and its Triton 3.6, so
    that the kernels' math is checked on the CPU with the Triton that torch 2.11 brings (a GPU gets neither patch):
    torch 2.11's ``wrap_triton`` refuses the interpreter's kernels (they are not JITFunctions), where 2.14's hands
    them back to be launched as they are; Triton 3.6's interpreter takes a loop bound as ``int()`` of a
    one-element array, which numpy 2.4 refuses, where 3.7's squeezes the array first."""
    if not INTERPRETED:
        return
    import triton
    from triton.runtime import interpreter

    wrap = torch.library.wrap_triton
    try:
        wrap(triton_lstm_kernels.lstm_fwd_held)
    except RuntimeError:
        monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel if isinstance(
            kernel, interpreter.InterpretedFunction) else wrap(kernel))
    if release(triton.__version__) < (3, 7):
        patch_tensor = interpreter._patch_lang_tensor

        def squeezed_index(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        monkeypatch.setattr(interpreter, "_patch_lang_tensor", squeezed_index)


@pytest.fixture(params=["held", "tiled"])
def kernel(request, monkeypatch):
    """Runs the test on one kernel pair: the launcher is told the chip has no shared memory limit (held, where
    the hidden size allows one) or none at all (tiled, its last resort)."""
    choose = triton_lstm_config.choose
    limit = 2**40 if request.param == "held" else 0
    monkeypatch.setattr(triton_lstm_config, "choose",
                        lambda direction, num_seqs, hidden, dtype, chip, _limit, interpreted=False:
                        choose(direction, num_seqs, hidden, dtype, chip, limit, interpreted))
    return request.param


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference's largest magnitude."""
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def lstm_case(n, t, c, hidden, bidirectional, num_layers, device, seed=0):
    torch.manual_seed(seed)
    lstm = nn.LSTM(c, hidden, num_layers, batch_first=True, bidirectional=bidirectional).to(device)
    x = torch.randn(n, t, c, device=device)
    grad = torch.randn(n, t, hidden * (2 if bidirectional else 1), device=device)
    return lstm, x, grad


def run(lstm, x, grad, backend, dtype=torch.float32):
    """Output, dL/dx and dL/dparams (in nn.LSTM's parameter order) of ``lstm`` on ``backend``, in ``dtype``. ``x``
    is the caller's: a leaf of its own here (``x.to(dtype)`` is ``x`` itself when the dtype is the same, and two runs
    on one ``x`` then returned one ``x.grad``, both runs' sum, so that dL/dx was compared with itself). With ``grad``
    None: the output alone, computed without autograd (inference, where the kernels save nothing for backward)."""
    layer = recurrence.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=True,
                            bidirectional=lstm.bidirectional).to(x.device)
    layer.load_state_dict(lstm.state_dict())
    layer.to(dtype)
    x = x.detach().to(dtype).requires_grad_(grad is not None)
    with torch.set_grad_enabled(grad is not None):
        out = recurrence.run_rnn(layer, x, backend)
    if grad is None:
        return [out]
    out.backward(grad.to(dtype))
    return [out, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, t, c, hidden, bidirectional, num_layers", [
    (5, 1, 6, 8, True, 1),     # a single step
    (3, 33, 4, 8, False, 1),   # the longest sequence, one direction
    (7, 8, 12, 96, True, 1),   # stage 2's hidden size, odd sequence count
    (17, 9, 10, 24, True, 2),  # two layers, hidden not a power of two, sequences over a block
])
def test_fp32_matches_nn_lstm(device, n, t, c, hidden, bidirectional, num_layers):
    lstm, x, grad = lstm_case(n, t, c, hidden, bidirectional, num_layers, device)
    want = run(lstm, x, grad, "native")
    got = run(lstm, x, grad, "triton")
    names = ["output", "grad input"] + [f"grad {n}" for n, _ in lstm.named_parameters()]
    for name, a, b in zip(names, got, want):
        if t == 1 and "weight_hh" in name:  # one step from a zero state: W_hh gets no gradient
            assert a.abs().max() == 0 and b.abs().max() == 0
            continue
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, t, hidden, bidirectional", [
    (3, 4, 8, True),     # under one tile
    (5, 3, 20, True),    # not a multiple of 16: a padded tile
    (3, 4, 48, False),   # stage 1's hidden: three 16-wide tiles
    (4, 3, 96, True),    # stage 2's: three 32-wide tiles, or one 128-wide held block
    (3, 3, 192, True),   # the 2x-hidden ablation: three 64-wide tiles (too big to hold on any chip)
])
def test_fp32_kernels_match_float64(device, kernel, n, t, hidden, bidirectional):
    """Each kernel pair at Sequencer's hidden sizes and odd ones, output and every gradient, and the output of
    inference (nothing saved: the tiled kernel keeps c in two state slots, used in turn), against nn.LSTM in float64:
    fp32 rounding only."""
    if kernel == "held" and hidden > 128:
        pytest.skip("hidden over 128 is only ever tiled")
    lstm, x, grad = lstm_case(n, t, 6, hidden, bidirectional, 1, device)
    exact = run(lstm.double(), x.double(), grad.double(), "native", torch.float64)
    got = run(lstm.float(), x, grad, "triton") + run(lstm.float(), x, None, "triton")
    exact.append(exact[0])
    names = ["output", "grad input"] + [f"grad {n}" for n, _ in lstm.named_parameters()] + ["output, inference"]
    for name, a, b in zip(names, got, exact, strict=True):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_over_several_programs(device, kernel, monkeypatch):
    """More sequences than one program's BLOCK_N, the last block partial, through the mixer's strided column view
    (sequence s of image b read at b * stride + s * stride): output and every gradient against float64. Every other
    test here fits its sequences in one program (the interpreter's block grows to 128 sequences, a GPU's is 32), so a
    kernel that read or wrote the wrong sequences in every program but the first passed them all."""
    monkeypatch.setattr(triton_lstm_config, "INTERPRETER_BLOCK_N", 16)  # a GPU's is the table's 32
    torch.manual_seed(0)
    exact = RNN2d(8, 12, union="vertical", lstm_backend="native").double()  # the columns alone: the strided view
    fused = RNN2d(8, 12, union="vertical", lstm_backend="triton").to(device)
    fused.load_state_dict(exact.state_dict())
    x = torch.randn(5, 3, 14, 8, dtype=torch.float64)  # columns: 5 * 14 = 70 sequences of 3 steps (16*4+6, 32*2+6)
    results = []
    for module, xi in ((exact, x), (fused, x.float().to(device))):
        xi = xi.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in module.parameters()])
    names = ["output", "grad input"] + [n for n, _ in exact.named_parameters()]
    for name, got, want in zip(names, *reversed(results), strict=True):
        assert rel_err(got.cpu(), want) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_error_no_worse_than_native(device, kernel):
    """bf16 on both backends, each measured against the fp64 nn.LSTM; the fused one may not be less accurate."""
    lstm, x, grad = lstm_case(9, 12, 16, 32, True, 1, device)
    exact = run(lstm.double(), x.double(), grad.double(), "native", torch.float64)
    native = run(lstm, x, grad, "native", torch.bfloat16)
    fused = run(lstm, x, grad, "triton", torch.bfloat16)
    for i, (f, n, e) in enumerate(zip(fused, native, exact)):
        assert f.dtype == torch.bfloat16
        assert rel_err(f, e) <= max(rel_err(n, e), 1e-2), i  # 1e-2: bf16's own rounding, if native is exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, dict(union="add"), dict(bidirectional=False),
                                    dict(union="vertical", with_fc=False),
                                    dict(num_layers=2)], ids=["cat", "add", "unidirectional", "vertical", "2layers"])
def test_bilstm2d_matches_native(device, kwargs):
    """The model-level token mixer, one projection GEMM for both axes: output and every gradient."""
    torch.manual_seed(0)
    native = RNN2d(16, 8, lstm_backend="native", **kwargs).to(device)
    fused = RNN2d(16, 8, lstm_backend="triton", **kwargs).to(device)
    fused.load_state_dict(native.state_dict())
    x = torch.randn(3, 5, 7, 16, device=device)  # H != W, odd batch
    results = []
    for module in (native, fused):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out_n, dx_n, g_n), (out_f, dx_f, g_f) = results
    assert rel_err(out_f, out_n) < 1e-5
    assert rel_err(dx_f, dx_n) < 1e-5
    for name, g in g_n.items():
        assert rel_err(g_f[name], g) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_bilstm2d_matches_eager(device):
    """torch.compile (one graph; aot_eager: the ops and their autograd as the compiled graph calls them) of the
    token mixer on the kernel: the output and every gradient of eager's, in fp32 and under bf16 autocast. Before,
    under the interpreter, compiling traced into the kernels with fake tensors and failed ("Attempted to access the
    data pointer on an invalid python storage")."""
    torch.manual_seed(0)
    mixer = RNN2d(8, 4, lstm_backend="triton").to(device)
    compiled = torch.compile(mixer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 5, 8, device=device)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -8)):
        results = []
        for module in (mixer, compiled):
            mixer.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out = module(xi)
            out.float().square().sum().backward()
            results.append([out, xi.grad] + [p.grad.clone() for p in mixer.parameters()])
        assert results[1][0].dtype == results[0][0].dtype == dtype
        for i, (got, want) in enumerate(zip(*reversed(results), strict=True)):
            assert rel_err(got, want) <= bound, (dtype, i)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_a_gradient_of_its_gradient_is_refused_in_one_line(device):
    """``create_graph=True`` gives native's first gradient; differentiating that again (a gradient penalty) raises
    one SequencerError naming the backend: the backward kernel reads saved gates that carry no history, so no second
    derivative is computed. Before, torch's error named the internal op and asked for an autograd formula."""
    torch.manual_seed(0)
    native = RNN2d(8, 4, lstm_backend="native").to(device)
    fused = RNN2d(8, 4, lstm_backend="triton").to(device)
    fused.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 4, 8, device=device)
    grads = []
    for module in (native, fused):
        xi = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(module(xi).square().sum(), xi, create_graph=True)[0])
    assert rel_err(grads[1], grads[0]) < 1e-5
    with pytest.raises(SequencerError, match="^lstm_backend 'triton' has no second derivative .*hint: use "
                                             "lstm_backend='native'"):
        grads[1].square().sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_a_held_kernel_that_does_not_fit_falls_back_to_tiled(device, monkeypatch, caplog):
    """Should Triton refuse a held kernel's launch for its shared memory (a launcher prediction gone stale), the
    tiled kernel runs instead, with one warning, and the results are the same."""
    from triton.runtime.errors import OutOfResources

    from sequencer.models.kernels import triton_lstm

    lstm, x, grad = lstm_case(5, 4, 6, 16, True, 1, device)
    want = run(lstm, x, grad, "triton")
    wrap = torch.library.wrap_triton
    refused = []

    class Refuses:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            refused.append(self.kernel)
            raise OutOfResources(300000, 232448, "shared memory")

    held = (triton_lstm.lstm_fwd_held, triton_lstm.lstm_bwd_held)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: Refuses(k) if k in held else wrap(k))
    monkeypatch.setattr(triton_lstm_config, "SMALLEST_LIMIT", 2**40)  # a chip where held is the choice
    with caplog.at_level("WARNING", logger="sequencer"):
        got = run(lstm, x, grad, "triton")
    assert refused == list(held)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "Triton LSTM fwd, hidden 16, torch.float32", "Triton LSTM bwd, hidden 16, torch.float32"]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.fixture
def no_aten_lstm(monkeypatch):
    """ATen's LSTM raises when called."""
    def refuse(*args, **kwargs):
        raise AssertionError("ATen's LSTM was called")
    monkeypatch.setattr(torch._VF, "lstm", refuse)
    monkeypatch.setattr(torch, "lstm", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_model_end_to_end_on_the_kernel(device, no_aten_lstm, monkeypatch):
    """sequencer2d_nano forward + backward with the backend forced by the environment variable: never ATen's LSTM,
    and the same logits and gradients as the native model (built before ATen's LSTM was refused)."""
    torch.manual_seed(0)
    monkeypatch.setenv(recurrence.BACKEND_ENV, "triton")
    fused = create_model("sequencer2d_nano", num_classes=10).to(device)
    assert {m.lstm_backend for m in fused.modules() if isinstance(m, RNN2d)} == {"triton"}
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    with torch.no_grad():
        fused.head.fc.weight.normal_(std=0.1)
    out = fused(x)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    monkeypatch.undo()  # ATen's LSTM back for the reference
    native = create_model("sequencer2d_nano", num_classes=10, lstm_backend="native").to(device)
    native.load_state_dict(fused.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    ref = native(x_ref)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    for name, p in native.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-5, name


def test_auto_keeps_aten_on_cpu(monkeypatch):
    """``auto`` (the default) runs the native kernels on the CPU: the fused op is not called."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel was called")
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    monkeypatch.setattr(recurrence.triton_lstm, "recurrence", refuse)
    model = create_model("sequencer2d_nano")
    assert {m.lstm_backend for m in model.modules() if isinstance(m, RNN2d)} == {"auto"}
    model(torch.randn(1, 3, 16, 16))


def test_invalid_backend_names_it(monkeypatch):
    with pytest.raises(SequencerError, match="lstm_backend must be one of auto, triton, native, cpu, got 'cudnn'"):
        create_model("sequencer2d_nano", lstm_backend="cudnn")
    monkeypatch.setenv(recurrence.BACKEND_ENV, "fast")
    with pytest.raises(SequencerError, match="SEQUENCER_LSTM_BACKEND must be one of auto, triton, native, cpu, got 'fast'"):
        create_model("sequencer2d_nano")


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_scan_passes_opcheck(device, kernel):
    """Schema, autograd registration and the fake implementation agree with the kernel; on CUDA also AOT dispatch
    (under the interpreter test_compiled_bilstm2d_matches_eager compiles the ops instead: 3 s of CPU less)."""
    xp = torch.randn(2, 3, 4, 2, 32, device=device, requires_grad=True)
    w_hh = torch.randn(2, 32, 8, device=device, requires_grad=True)
    from sequencer.models.kernels import triton_lstm  # noqa: F401  (registers the op)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETED:
        checks += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.sequencer.lstm_scan.default, (xp, w_hh, True, KERNEL_CODE), test_utils=checks)


def test_triton_on_cpu_without_the_interpreter_is_one_line(monkeypatch):
    model = create_model("sequencer2d_nano", lstm_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SequencerError, match="needs a CUDA device or TRITON_INTERPRET=1, got cpu tensors"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_refused_in_one_line(device):
    """The kernels compute in float32: a ``.double()`` model (also under autocast, which casts no float64) is refused
    by name. Before, it ran, its float64 logits 3e-8 off the float64 model's (float32's precision), silently."""
    model = create_model("sequencer2d_nano", lstm_backend="triton").to(device).double()
    x = torch.randn(1, 3, 16, 16, device=device, dtype=torch.float64)
    for autocast in (False, True):
        with (pytest.raises(SequencerError, match="'triton' computes in float32 at most, not in this model's float64"),
              torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)):
            model(x)
