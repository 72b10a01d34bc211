"""The compiled CPU training path of single-layer LSTMs: oneDNN's layer with its workspace kept for the backward.

These run on oneDNN (the default CPU path users get), which the models' test modules otherwise turn off.
"""
import pytest
import torch
import torch.nn.functional as F

from sequencer.errors import SequencerError
from sequencer.models.kernels import onednn_bf16_supported, onednn_lstm, recurrence
from sequencer.models.kernels.code_key import KERNEL_CODE

from test_compile import (assert_opcheck_passes_on_calls, fixed_batches, nano_for_training, optimizer_steps,
                           record_calls, rel_err, training_steps)

USE_ONEDNN = True


def grads_of(forward, layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """[output, dL/dx, dL/dw...] of ``forward`` with dL/d(output) = ``grad``."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "forward"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_ops_give_the_modules_output_and_gradients(bidirectional, bias):
    """Forward and backward ops against ``nn.LSTM`` on a column-major input (the layout BiLSTM2D's columns give):
    the same oneDNN kernels, so equal to float32 rounding (dL/dx sums the directions in another order)."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(6, 5, batch_first=True, bidirectional=bidirectional, bias=bias)
    x = torch.randn(4, 3, 6).transpose(0, 1)  # (N=3, T=4, C) in (T, N, C) memory
    grad = torch.randn(3, 4, 10 if bidirectional else 5)
    got = grads_of(lambda t: onednn_lstm.lstm(t, list(layer._flat_weights), bidirectional, bias), layer, x, grad)
    want = grads_of(lambda t: layer(t)[0], layer, x, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_workspace_is_the_size_onednn_gives(dtype):
    """The workspace size learnt from one layer on zeros, which the fake kernel gives, is what the real layer gives,
    in both directions: inductor checks every output's size against it at run time."""
    if dtype == torch.bfloat16 and not onednn_bf16_supported():
        pytest.skip("no native bf16 kernels on this CPU")
    torch.manual_seed(0)
    layer = recurrence.LSTM(12, 8, batch_first=True, bidirectional=True).to(dtype)
    x = torch.randn(5, 7, 12, dtype=dtype)
    layout = onednn_lstm._workspace_layout(12, 8, dtype, True)
    real = onednn_lstm.onednn_lstm(x, list(layer._flat_weights), True, True, layout, KERNEL_CODE)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = onednn_lstm.onednn_lstm(mode.from_tensor(x), [mode.from_tensor(w) for w in layer._flat_weights],
                                       True, True, layout, KERNEL_CODE)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]
    assert real[3].numel() > 0 and real[3].numel() == real[7].numel()


def test_the_workspace_layout_is_in_the_graph_and_checked_at_run_time():
    """A fingerprint of this machine's workspace layout is an argument of the traced op, so inductor's graph cache
    keys on it (a cache shared with a machine whose oneDNN lays the workspace out otherwise keeps a graph for each);
    the op refuses a graph made for another layout in one clear line."""
    torch.manual_seed(0)
    lstm = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6)
    layout = onednn_lstm._workspace_layout(6, 5, torch.float32, True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    torch.compile(lambda t: recurrence.run_rnn(lstm, t, "native"), backend=backend)(x.requires_grad_())
    calls = [n for g in graphs for n in g.graph.nodes if "onednn_lstm" in str(n.target)]
    assert [call.args[-2] for call in calls] == [layout] and layout > 0
    with pytest.raises(SequencerError, match=f"reference size {layout + 64} bytes, here {layout}.*another machine"):
        onednn_lstm.onednn_lstm(x, list(lstm._flat_weights), True, True, layout + 64, KERNEL_CODE)


def test_ops_pass_opcheck_with_training_arguments(randomize, monkeypatch):
    """Schema, autograd, fake kernels (strides, dtypes, and symbolic shapes in AOT's dynamic test) and AOT dispatch,
    on the very arguments a training step of nano gives the ops under compile, recorded from one. Two checks are
    left out, each for a byte of the workspace no result reads: the forward's AOT test compares outputs byte for
    byte (the workspace's padding is uninitialised), and the backward's schema test sees oneDNN's scratch writes
    into the workspace (ATen declares them unmutated too; the next test shows the gradients do not depend on them).
    """
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    calls = {}
    record_calls(monkeypatch, onednn_lstm, ["onednn_lstm", "onednn_lstm_backward"], calls)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # run_rnn's compiled branch, in eager
    training_steps(randomize)
    monkeypatch.undo()
    forward = {key: call for key, call in calls.items() if key[0] == "onednn_lstm"}
    backward = {key: call for key, call in calls.items() if key[0] == "onednn_lstm_backward"}
    assert_opcheck_passes_on_calls(forward, {"onednn_lstm"}, skip=("test_aot_dispatch_dynamic",))
    assert_opcheck_passes_on_calls(backward, {"onednn_lstm_backward"}, skip=("test_schema",))


def test_backward_gives_the_same_gradients_from_a_used_workspace():
    """A second backward from the same saved outputs (as ``retain_graph=True`` runs it), after oneDNN wrote its
    scratch into the workspace, gives the first's gradients bit for bit; and both are ``nn.LSTM``'s."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    out = onednn_lstm.lstm(x, list(layer._flat_weights), True, True)
    first = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()], retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    want = torch.autograd.grad(layer(x)[0].square().sum(), [x, *layer.parameters()])
    for a, b in zip(first, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_training_keeps_the_workspace_and_matches_eager(randomize, monkeypatch):
    """Three AdamW steps of nano, compiled (aot_eager: eager's kernels) and eager, on oneDNN: the same losses and
    gradients to float32 rounding, with every LSTM on the workspace ops and no recomputing backward
    (``rnn_native_backward``) left in the step."""
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    met = []
    for module, name in [(onednn_lstm, "onednn_lstm_backward"), (recurrence, "rnn_native_backward"),
                         (recurrence, "rnn_native")]:
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _op=op, _name=name: met.append(_name) or _op(*args))
    torch._dynamo.reset()
    batches = fixed_batches(False, steps=3)
    eager, compiled = nano_for_training(randomize, False), nano_for_training(randomize, False)
    want = optimizer_steps(eager, eager, batches)
    got = optimizer_steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True), batches)
    assert set(met) == {"onednn_lstm_backward"}
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert rel_err(loss, ref_loss) < 1e-6, step
        assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-5, step


def test_other_layers_keep_the_recomputing_op():
    """GRUs, two-layer LSTMs, float16 and inference stay on ``rnn_native`` (the workspace ops run one LSTM layer in a
    dtype oneDNN trains, and only a gradient needs the workspace)."""
    torch.manual_seed(0)
    gru = recurrence.GRU(6, 5, batch_first=True, bidirectional=True)
    deep = recurrence.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True)
    lstm = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    assert onednn_lstm.applies(lstm, x, torch.float32)
    assert not onednn_lstm.applies(gru, x, torch.float32)
    assert not onednn_lstm.applies(deep, x, torch.float32)
    assert not onednn_lstm.applies(lstm, x, torch.float16)
    with torch.no_grad():
        assert not onednn_lstm.applies(lstm, x, torch.float32)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_lstm.applies(lstm, x, torch.float32)


def test_dynamic_shapes_train_on_the_workspace_ops(monkeypatch):
    """Compiled with dynamic shapes (the batch size a symbol, as after a smaller last batch), the fake kernel
    specializes the sizes (oneDNN's workspace size is no formula of them; a size unknown to the graph broke it at
    every layer): inductor runs two batch sizes, a graph each, and matches eager's output and gradients."""
    torch.manual_seed(0)
    lstm = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    met = []
    op = onednn_lstm.onednn_lstm
    monkeypatch.setattr(onednn_lstm, "onednn_lstm", lambda *args: met.append("onednn_lstm") or op(*args))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: recurrence.run_rnn(lstm, t, "native"), dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 4, 6)
        got = grads_of(compiled, lstm, x, torch.ones(n, 4, 10))
        want = grads_of(lambda t: lstm(t)[0], lstm, x, torch.ones(n, 4, 10))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert met  # the workspace ops ran


def test_bf16_autocast_training_matches_eager_bf16(randomize, monkeypatch):
    """Under CPU bf16 autocast the op casts as ``nn.LSTM`` does and rounds its gradients as eager autograd does:
    compiled (aot_eager) and eager SGD steps agree far below bf16's rounding (computing the layer in fp32 instead
    differs by ~1e-2)."""
    if not onednn_bf16_supported():
        pytest.skip("no native bf16 kernels on this CPU (sequencer runs float32 there)")
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    batches = fixed_batches(False, steps=2)
    eager, compiled = nano_for_training(randomize, False), nano_for_training(randomize, False)

    def steps(model, forward):
        def autocast_forward(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(x).float()
        return optimizer_steps(model, autocast_forward, batches,
                               lambda params: torch.optim.SGD(params, lr=0.02))

    want = steps(eager, eager)
    got = steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True))
    recurrent = [i for i, (n, _) in enumerate(compiled.named_parameters()) if ".rnn_" in n]
    assert recurrent
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert rel_err(loss, ref_loss) < 1e-6, step
        assert max(rel_err(grads[i], ref_grads[i]) for i in recurrent) < 1e-6, step
        assert all(g.dtype == torch.float32 for g in grads)
    assert F.mse_loss(got[-1][0], want[-1][0]) < 1e-12
