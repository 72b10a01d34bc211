"""``lstm_backend="auto"``: the Triton kernel exactly where it was measured faster than cuDNN, the native kernels
elsewhere (recurrence.AUTO_TRITON_MEASURED; BENCHMARKS.md "GPU").

No GPU here: the CUDA cases use fake CUDA tensors (shapes, dtype and device without storage) and a faked compute
capability; the dispatch itself is then run on the CPU under Triton's interpreter.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sequencer.models import create_model
from sequencer.models.kernels import recurrence
from sequencer.models.sequencer2d import RNN2d

H100 = (9, 0)


def cuda_input(dtype=torch.bfloat16, requires_grad=False) -> torch.Tensor:
    """A fake (N, T, C) CUDA tensor."""
    with FakeTensorMode():
        return torch.empty(6, 8, 16, device="cuda", dtype=dtype).requires_grad_(requires_grad)


@pytest.fixture
def on_chip(monkeypatch):
    """Fakes the CUDA device's compute capability (and a Triton install, which the decision only checks for)."""
    def set_capability(capability):
        monkeypatch.setattr(recurrence, "_device_capability", lambda index: capability)
    monkeypatch.setattr(recurrence, "triton_lstm", recurrence.triton_lstm or object())
    monkeypatch.setattr(torch.version, "hip", None)
    set_capability(H100)
    return set_capability


def lstm(hidden=48, **kwargs) -> torch.nn.Module:
    return recurrence.LSTM(16, hidden, batch_first=True, bidirectional=True, **kwargs)


def test_auto_takes_triton_for_half_precision_inference_on_the_measured_chip(on_chip):
    with torch.no_grad():
        assert recurrence.auto_takes_triton(lstm(48), cuda_input(torch.bfloat16))
        assert recurrence.auto_takes_triton(lstm(96), cuda_input(torch.float16))
        assert recurrence.uses_fused_lstm(lstm(96), "auto", cuda_input())


@pytest.mark.parametrize("case", ["training", "input_requires_grad", "fp32", "hidden_192", "a100", "gru", "cpu",
                                  "no_triton", "rocm", "dropout_in_training"])
def test_auto_keeps_native_where_triton_was_not_measured_faster(case, on_chip, monkeypatch):
    """Training (Triton's backward measured 0.70x cuDNN and out of shared memory), fp32 (out of shared memory at
    hidden 96), unmeasured hidden sizes and chips, other recurrent layers and devices: native."""
    rnn, x, grad_mode = lstm(), cuda_input(), False
    if case == "training":  # the parameters require grad, under grad mode
        grad_mode = True
    elif case == "input_requires_grad":
        rnn.requires_grad_(False)
        x, grad_mode = cuda_input(requires_grad=True), True
    elif case == "fp32":
        x = cuda_input(torch.float32)
    elif case == "hidden_192":
        rnn = lstm(192)
    elif case == "a100":
        on_chip((8, 0))
    elif case == "gru":
        rnn = recurrence.GRU(16, 48, batch_first=True, bidirectional=True)
    elif case == "cpu":
        x = torch.empty(6, 8, 16, dtype=torch.bfloat16)
    elif case == "no_triton":
        monkeypatch.setattr(recurrence, "triton_lstm", None)
    elif case == "rocm":
        monkeypatch.setattr(torch.version, "hip", "6.4")
    elif case == "dropout_in_training":
        rnn = recurrence.LSTM(16, 48, num_layers=2, dropout=0.1, batch_first=True).train().requires_grad_(False)
    with torch.set_grad_enabled(grad_mode):
        assert not recurrence.auto_takes_triton(rnn, x)
        assert not recurrence.uses_fused_lstm(rnn, "auto", x)


def test_auto_reads_the_autocast_dtype(on_chip, monkeypatch):
    """fp32 weights and input under CUDA bf16 autocast compute in bf16: the measured case. (This CPU build of torch
    has no CUDA autocast: its state is faked.)"""
    x = cuda_input(torch.float32)
    with torch.no_grad():
        assert not recurrence.auto_takes_triton(lstm(), x)
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
        assert recurrence.auto_takes_triton(lstm(), x)


def test_auto_dispatches_the_model_to_the_fused_kernel_where_it_decides_so(monkeypatch):
    """Wiring: where auto decides Triton, the model's BiLSTM2D runs the fused kernel (here on the interpreter) and
    gives the native backend's output; where it decides native, the fused kernel is never called."""
    if recurrence.triton_lstm is None or not recurrence.triton_lstm.INTERPRETED:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch.manual_seed(0)
    kwargs = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
    model = create_model("sequencer2d_nano", img_size=16, **kwargs).eval()
    native = create_model("sequencer2d_nano", img_size=16, lstm_backend="native", **kwargs).eval()
    native.load_state_dict(model.state_dict())
    assert {m.lstm_backend for m in model.modules() if isinstance(m, RNN2d)} == {"auto"}
    x = torch.randn(2, 3, 16, 16)
    calls = []
    fused = recurrence.fused_bilstm2d
    monkeypatch.setattr(recurrence, "auto_takes_triton", lambda rnn, t: True)
    import sequencer.models.sequencer2d as sequencer2d
    monkeypatch.setattr(sequencer2d, "fused_bilstm2d", lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        out, ref = model(x), native(x)
        assert len(calls) == 2  # one per BiLSTM2D block
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(recurrence, "auto_takes_triton", lambda rnn, t: False)
        model(x)
    assert len(calls) == 2
