"""The ``cpu`` LSTM backend (models/kernels/cpu_lstm.py): same outputs as the module's own LSTM kernels."""
import pytest
import torch

import sequencer
from sequencer.errors import SequencerError
from sequencer.models.kernels import cpu_lstm
from sequencer.models.sequencer2d import RNN2d

USE_ONEDNN = "both"  # against PyTorch's native LSTM and oneDNN's (see conftest)


@pytest.mark.parametrize("kwargs", [{}, {"union": "add"}, {"union": "vertical"}, {"union": "horizontal"},
                                    {"bidirectional": False, "union": "cat"}, {"bias": False}],
                         ids=["cat", "add", "vertical", "horizontal", "one-direction", "no-bias"])
@pytest.mark.parametrize("grid", [(5, 5), (3, 6)], ids=["square", "non-square"])
def test_mixer_matches_native(kwargs, grid):
    torch.manual_seed(0)
    native = RNN2d(8, 4, lstm_backend="native", **kwargs).eval()
    for p in native.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    ours = RNN2d(8, 4, lstm_backend="cpu", **kwargs).eval()
    ours.load_state_dict(native.state_dict())
    x = torch.randn(2, *grid, 8)
    with torch.no_grad():
        expected = native(x)
        assert cpu_lstm.applies([r for r in (ours.rnn_v, ours.rnn_h) if r is not None], "cpu", x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_training_keeps_the_module_kernels():
    """A gradient is needed: the module's LSTM runs (this path has no backward), so gradients are ATen's."""
    ours, native = _pair()
    x = torch.randn(2, 4, 4, 8, requires_grad=True)
    assert not cpu_lstm.applies([ours.rnn_v, ours.rnn_h], "cpu", x)
    ours(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    native(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


def _pair() -> tuple[RNN2d, RNN2d]:
    torch.manual_seed(0)
    native = RNN2d(8, 4, lstm_backend="native")
    ours = RNN2d(8, 4, lstm_backend="cpu")
    ours.load_state_dict(native.state_dict())
    return ours, native


def test_bf16_weights_close_to_fp32():
    """bf16 weights: the projections and recurrent GEMMs in bf16, the cell state in fp32 (loose: bf16 rounding)."""
    ours, native = _pair()
    x = torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        expected = native(x)
        got = ours.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_whole_model_and_env_selection(monkeypatch, tiny_kwargs, randomize):
    monkeypatch.setenv("SEQUENCER_LSTM_BACKEND", "cpu")
    ours = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs)).eval()
    assert {m.lstm_backend for m in ours.modules() if isinstance(m, RNN2d)} == {"cpu"}
    native = sequencer.create_model("sequencer2d_s", num_classes=5, lstm_backend="native", **tiny_kwargs).eval()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), native(x), rtol=1e-5, atol=1e-6)


def test_other_devices_are_refused_by_name():
    ours, _ = _pair()
    with pytest.raises(SequencerError, match="lstm_backend 'cpu' needs CPU tensors"):
        cpu_lstm.applies([ours.rnn_v], "cpu", torch.empty(1, 2, 2, 8, device="meta"))
    assert not cpu_lstm.applies([ours.rnn_v], "auto", torch.empty(1, 2, 2, 8))  # auto keeps oneDNN's LSTM


def test_the_1d_sequencer_runs_the_cpu_backend(tiny_kwargs, randomize, monkeypatch):
    """``v_sequencer_s`` with ``lstm_backend="cpu"``: its LSTM over the token raster runs here, never ATen's LSTM
    (before, the 1D model ignored the backend and ran ATen's silently), with the native model's logits; a gradient
    keeps the module's kernels."""
    kwargs = dict(tiny_kwargs, embed_dims=(16,) * 4, hidden_sizes=(8,) * 4)
    ours = randomize(sequencer.create_model("v_sequencer_s", num_classes=5, lstm_backend="cpu", **kwargs)).eval()
    native = sequencer.create_model("v_sequencer_s", num_classes=5, lstm_backend="native", **kwargs).eval()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = native(x)

        def refuse(*args, **kwargs):
            raise AssertionError("ATen's LSTM was called")
        monkeypatch.setattr(torch._VF, "lstm", refuse)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="ATen's LSTM was called"):
        ours(x)
