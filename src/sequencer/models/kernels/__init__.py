"""Device-specific implementations behind the model code: oneDNN matmuls (CPU), the LSTM backends.

The model files use only the names below; everything else in these modules is theirs.

* ``linear(x, weight, bias)``: a linear layer on oneDNN where that is faster (CPU), else ``F.linear``.
* ``mix_axes(v_seq, h_seq, weight, bias)``: BiLSTM2D's fusing linear over the vertical and horizontal outputs,
  without materialising their concatenation (oneDNN, autograd-aware).
* ``onednn_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)``: the block MLP's training step, keeping only what
  backward needs.
* ``onednn_linear_ok(x, weight)``: whether those oneDNN paths apply to these tensors.
* ``under_cpu_bf16_autocast(x)``, ``autocast_bf16_copies(*tensors)``: CPU bfloat16 autocast for the oneDNN paths.
* ``onednn_bf16_supported()``: whether this CPU has oneDNN bfloat16 kernels; ``native_dtype(dtype, device, what)``:
  float32 with a one-line note where bfloat16 would fall back to PyTorch's slow reference kernels.
* ``exporting()``: whether the forward is captured for a runtime without this package (TorchScript, ONNX,
  ``torch.export``).
* ``hooked(*modules)``: whether a layer carries forward hooks (pruning, a capturing hook): then it is called, never
  read by a fused path.
* ``RNN_TYPES``, ``resolve_backend``, ``run_rnn``, ``fused_bilstm2d``, ``uses_fused_lstm``: the LSTM backends
  (native cuDNN/MKL, Triton) of :mod:`.recurrence`; ``cpu_lstm_applies``, ``cpu_bilstm2d``, ``cpu_lstm1d``: the
  ``cpu`` backend of :mod:`.cpu_lstm` (CPU inference; ``cpu_lstm1d``: one LSTM over batch-first sequences, the 1D
  Sequencer's).
"""
from .onednn import _autocast_bf16_copies as autocast_bf16_copies
from .capture import exporting, hooked
from .cpu_lstm import applies as cpu_lstm_applies
from .cpu_lstm import bilstm2d as cpu_bilstm2d
from .cpu_lstm import lstm1d as cpu_lstm1d
from .onednn import _MixAxesFunction, _OneDnnMlpFunction, linear, native_dtype, onednn_bf16_supported
from .onednn import _onednn_linear_ok as onednn_linear_ok
from .onednn import _under_cpu_bf16_autocast as under_cpu_bf16_autocast
from .recurrence import RNN_TYPES, fused_bilstm2d, resolve_backend, run_rnn, uses_fused_lstm

mix_axes = _MixAxesFunction.apply
onednn_mlp = _OneDnnMlpFunction.apply

__all__ = ["RNN_TYPES", "autocast_bf16_copies", "cpu_bilstm2d", "cpu_lstm1d", "cpu_lstm_applies", "exporting",
           "fused_bilstm2d", "hooked", "linear", "mix_axes", "native_dtype", "onednn_bf16_supported",
           "onednn_linear_ok", "onednn_mlp", "resolve_backend", "run_rnn", "under_cpu_bf16_autocast", "uses_fused_lstm"]
