"""torch.compile sees every registered model as one graph: no graph breaks, in eval and in train, on the CPU.

Before the recurrent layers became custom ops, dynamo broke the graph at every nn.LSTM/GRU/RNN and at the oneDNN
check (sequencer2d_nano: 20 breaks). Inputs are the smallest the patch sizes allow.

dynamo's tracing is Python-bound, about a second per block on this machine (sequencer2d_l: over a minute per
mode), which all registered models in both modes would take far past the CI budget. Blocks of a stage run the same
code, and widths change shapes, not code paths. So nano and Sequencer2D-S are traced whole, and every other
registered configuration (token mixer, union, directions, fc, RNN type, position embedding, patch sizes) is traced
in a model with one block per stage; the registered models differ from those only in depths and widths.
"""
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from sequencer.models import create_model, get_model_entry, list_models
from sequencer.models.kernels import onednn_bf16_supported, recurrence
from sequencer.models.kernels.code_key import KERNEL_CODE


def smallest_input(name: str) -> int:
    reduction = 1
    for p in get_model_entry(name).kwargs.get("patch_sizes", (7, 2, 1, 1)):
        reduction *= p
    return reduction


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()  # every model traced afresh, never cut short by the recompile limit
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_break_count, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


def assert_no_graph_breaks(model: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    for train in (False, True):
        model.train(train)
        count, reasons = graph_breaks(model, x)
        assert count == 0, ("train" if train else "eval", reasons[:3])


WHOLE = ("sequencer2d_nano", "sequencer2d_s")  # traced whole below
SHAPE_ONLY = ("layers", "img_size", "embed_dims", "hidden_sizes", "mlp_ratios")  # change no code path


def one_block_per_stage_configs() -> dict[tuple, str]:
    """Each registered configuration, up to depths and widths -> the first model having it."""
    configs = {}
    for name in (*WHOLE, *list_models()):
        entry = get_model_entry(name)
        kwargs = {k: v for k, v in entry.kwargs.items() if k not in SHAPE_ONLY}
        configs.setdefault((entry.cls.__name__, repr(sorted(kwargs.items()))), name)
    return configs


def test_nano_has_no_graph_breaks(monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    assert_no_graph_breaks(create_model("sequencer2d_nano", img_size=16, drop_path_rate=0.1), 16)


@pytest.mark.slow
def test_sequencer2d_s_has_no_graph_breaks(monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    assert_no_graph_breaks(create_model("sequencer2d_s", img_size=28, drop_path_rate=0.1), 28)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(one_block_per_stage_configs().values()) - set(WHOLE)))
def test_every_registered_configuration_has_no_graph_breaks(name, monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch.manual_seed(0)
    stages = len(get_model_entry(name).kwargs.get("layers", (4, 3, 8, 3)))
    size = smallest_input(name)
    model = create_model(name, img_size=size, layers=(1,) * stages, drop_path_rate=0.1)
    assert_no_graph_breaks(model, size)


def test_compiled_native_layer_matches_eager():
    """The custom op dynamo meets under compile gives the module's output and gradients (backward recomputes)."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    compiled = torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    got = [out, x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    ref = layer(x)[0]
    ref.sum().backward()
    want = [ref, x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode, step_autocast", [("lstm", None), ("gru", None), ("rnn", None),
                                                 ("gru", torch.bfloat16)])
def test_native_rnn_op_passes_opcheck(mode, step_autocast):
    """Schema, autograd, fake implementation (strides included) and AOT dispatch of the op dynamo meets (a GRU's
    steps under bf16 autocast too, as the op runs them under CPU autocast)."""
    torch.manual_seed(0)
    layer = recurrence.RNN_TYPES[mode](6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.sequencer.rnn_native.default,
                          (x, list(layer._flat_weights), mode, 1, True, True, True, KERNEL_CODE, step_autocast))


def test_native_backward_gives_the_modules_gradients():
    """The backward op's recomputation (autograd re-admitted inside the op) gives what autograd gives the module, in
    fp32 to reduction order: dL/dx and dL/dw of a bidirectional two-layer LSTM on a strided (column-major) input."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(4, 3, 6).transpose(0, 1).requires_grad_()  # (3, 4, 6) in (T, N, C) memory, as the model gives
    grad = torch.randn(3, 4, 10)
    got = torch.ops.sequencer.rnn_native_backward(grad, x.detach(), [w.detach() for w in layer._flat_weights],
                                                   "lstm", 2, True, True, KERNEL_CODE, None)
    want = torch.autograd.grad(layer(x)[0], [x, *layer._flat_weights], grad)
    assert len(got) == len(want) == 1 + len(layer._flat_weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[0].is_contiguous()


def test_native_op_passes_gradcheck_in_float64():
    """``torch.autograd.gradcheck`` (finite differences in float64) of ``sequencer::rnn_native`` through its
    registered backward, for each layer kind: bidirectional LSTM, two-layer GRU, tanh RNN on tiny shapes."""
    torch.manual_seed(0)
    for mode, layers, bidirectional in (("lstm", 1, True), ("gru", 2, False), ("rnn", 1, True)):
        layer = recurrence.RNN_TYPES[mode](3, 2, layers, batch_first=True, bidirectional=bidirectional).double()
        weights = [w.detach().clone().requires_grad_() for w in layer._flat_weights]
        x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)

        def op(x, *weights, mode=mode, layers=layers, bidirectional=bidirectional):
            return recurrence.rnn_native(x, list(weights), mode, layers, bidirectional, True, True, KERNEL_CODE, None)
        assert torch.autograd.gradcheck(op, (x, *weights)), mode


@pytest.mark.parametrize("mode", ["lstm", "rnn"])
def test_native_op_follows_cpu_autocast_like_the_module(mode):
    """Under bf16 autocast the op (compiled, aot_eager: the graph's own casts) computes in bf16 as the module does in
    eager: the same output dtype and values and the same fp32 weight gradients, bit for bit (one kernel, one
    dtype). dL/dx is summed over the directions in a different order (measured: 1.7e-3 of its largest magnitude,
    under bf16's 2**-8 = 3.9e-3); computing the layer in fp32 instead differs by ~1e-2, in the output too. GRU is
    on no CPU autocast list: its op runs in the weights' dtype (checked below)."""
    if not onednn_bf16_supported():
        pytest.skip("no native bf16 kernels on this CPU (sequencer runs float32 there)")
    torch.manual_seed(0)
    layer = recurrence.RNN_TYPES[mode](6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6)
    with torch.backends.mkldnn.flags(enabled=True):  # the default CPU path (this module turns oneDNN off)
        got = autocast_run(torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager",
                                         fullgraph=True), layer, x)
        want = autocast_run(lambda t: layer(t)[0], layer, x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    for a, b in [(got[0], want[0]), *zip(got[2:], want[2:])]:
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert rel_err(got[1], want[1]) < 2 ** -8


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_native_op_follows_cpu_float16_autocast_like_eager(mode):
    """Under CPU fp16 autocast (``torch.autocast("cpu", dtype=torch.float16)``; ``sequencer train`` runs bf16 there)
    the compiled layer computes what eager ``run_rnn`` does, bit for bit: LSTM and tanh RNN in fp16 on ATen's own
    kernels (oneDNN's LSTM has none in fp16, and the module itself fails there: "could not create a primitive
    descriptor"), GRU's steps under autocast. dL/dx of the RNN is summed over the directions in another order."""
    torch.manual_seed(0)
    layer = recurrence.RNN_TYPES[mode](6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6)
    with torch.backends.mkldnn.flags(enabled=True):  # the default CPU path (this module turns oneDNN off)
        got = autocast_run(torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager",
                                         fullgraph=True), layer, x, torch.float16)
        want = autocast_run(lambda t: recurrence.run_rnn(layer, t, "native"), layer, x, torch.float16)
    assert got[0].dtype == want[0].dtype == (torch.float32 if mode == "gru" else torch.float16)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and (torch.equal(a, b) or i == 1 and rel_err(a, b) < 2 ** -10), i


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_native_gru_op_follows_cpu_autocast_like_the_module(input_dtype):
    """ATen's GRU is on no CPU autocast list, but it is made of ops that are: eager, under bf16 autocast its step
    matmuls run in bf16 while its hidden state keeps the input's dtype (float32 in the model). The compiled op does
    the same, bit for bit (output, dtype, and every gradient), rather than computing the layer in float32 (which
    differed from eager by 4e-3 of the largest output, 5e-2 of a weight gradient in gru_sequencer2d_s)."""
    torch.manual_seed(0)
    layer = recurrence.GRU(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6)
    got = autocast_run(torch.compile(lambda t: recurrence.run_rnn(layer, t.to(input_dtype), "native"),
                                     backend="aot_eager", fullgraph=True), layer, x)
    want = autocast_run(lambda t: layer(t.to(input_dtype))[0], layer, x)
    assert got[0].dtype == want[0].dtype == input_dtype
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_gru_op_leaves_no_weight_casts_in_the_callers_autocast_region():
    """The op runs a GRU's steps under autocast inside itself, where autograd records nothing: casts of the weights
    cached there for the rest of the caller's autocast region would reach the caller's eager GRU calls later in it,
    whose weights then got no gradient (silently: the step went on without them)."""
    torch.manual_seed(0)
    layer = recurrence.GRU(6, 5, batch_first=True, bidirectional=True)
    compiled = torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x).float().sum().backward()
        layer.zero_grad(set_to_none=True)
        layer(x)[0].float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def autocast_run(forward, layer: torch.nn.Module, x: torch.Tensor, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """[output, dL/dx, dL/dw...] of ``forward`` under CPU autocast to ``dtype``, L = sum(output^2)."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = forward(x)
    out.float().square().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


# --- training under compile: real optimizer steps, and every custom op checked with the arguments training gives

def nano_for_training(randomize, channels_last: bool, **kwargs) -> torch.nn.Module:
    """sequencer2d_nano at 16 px with perturbed weights (the zero-initialised head would make the first gradients
    of everything below it zero), no stochastic depth (compiled graphs draw their own random numbers)."""
    torch.manual_seed(0)
    model = randomize(create_model("sequencer2d_nano", img_size=16, num_classes=3, drop_path_rate=0.0, **kwargs))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fixed_batches(channels_last: bool, steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(steps)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(x.contiguous(memory_format=fmt), y) for x, y in batches]


def optimizer_steps(model: torch.nn.Module, forward, batches, make_optimizer=None
                    ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """AdamW steps (or ``make_optimizer(params)``'s) of ``forward`` (the model, compiled or not) -> [(loss,
    gradients before the step)] per step."""
    model.train()
    params = list(model.parameters())
    optimizer = (make_optimizer or partial(torch.optim.AdamW, lr=1e-3))(params)
    history = []
    for x, y in batches:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        history.append((loss.detach(), [p.grad.clone() for p in params]))
        optimizer.step()
    return history


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compiled_training_steps_match_eager(channels_last, randomize, monkeypatch):
    """Three AdamW steps of nano compiled (aot_eager) and eager from one seed: the same losses, gradients and weights.

    aot_eager runs the graph's ATen ops on the same CPU kernels as eager, in fp32; what differs is the recurrent
    layers (the custom op, whose backward recomputes the forward) and the partitioner's choice of what to save. So
    agreement to a few fp32 ulps is expected (measured: bit-equal); 1e-6 relative to each tensor's largest
    magnitude leaves room for ~10 ulps of reordering and none for a wrong gradient. (Inductor, which fuses and
    reorders, is run end to end by tests/engine/test_torchcompile_cli.py.)
    """
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    batches = fixed_batches(channels_last, steps=3)
    eager = nano_for_training(randomize, channels_last)
    compiled = nano_for_training(randomize, channels_last)
    want = optimizer_steps(eager, eager, batches)
    got = optimizer_steps(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True), batches)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert rel_err(loss, ref_loss) < 1e-6, step
        assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-6, step
    for p, ref in zip(compiled.parameters(), eager.parameters()):
        assert rel_err(p, ref) < 1e-6


# nano shrunk to two one-block stages (inductor's compile time grows with the graph: tens of seconds here)
SMALL_NANO = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))


def bf16_sgd_steps(model, forward, batches):
    """SGD steps with the forward under CPU bf16 autocast (entered per step, as training does: autocast caches its
    casts of the weights until the context exits), on the default (oneDNN) CPU kernels. SGD, not Adam: Adam divides
    by the gradients' running magnitude, which turns rounding noise in near-zero gradients into lr-sized changes."""
    def autocast_forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x).float()

    with torch.backends.mkldnn.flags(enabled=True):
        return optimizer_steps(model, autocast_forward, batches, partial(torch.optim.SGD, lr=0.02))


def norm_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||: robust for gradients with a few large entries."""
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_bf16_training_steps_match_eager_bf16(backend, randomize, monkeypatch):
    """Three SGD steps of a small nano under bf16 autocast, compiled and eager, from one seed.

    aot_eager runs the graph's ATen ops on eager's CPU kernels, the recurrent op included, with autocast's casts in
    the graph: the same numbers as eager (measured: bit-equal in every loss and gradient). The bound, 1e-6 relative,
    is far below bf16's rounding: a recurrent layer computed in fp32 instead differs by ~1e-2 (eager bf16 vs fp32
    measured 1.1e-2 to 1.9e-2 in its gradients), a missing or wrong backward by 100%.

    Inductor computes bf16 elementwise chains in fp32 and rounds once where eager rounds after each op, so it
    differs from eager bf16 by bf16 rounding, as much as eager bf16 differs from fp32: measured at most 6e-5 in the
    losses and 1.1e-2 (relative norm) in the recurrent weights' gradients, 1.3e-2 in all gradients together. The
    bounds (1e-3, 5e-2, 5e-2) catch a broken backward through the recurrent op and training that drifts from
    eager's, not a dtype (the aot_eager case does that).

    Then the trained models evaluate a new batch under bf16 autocast (eval mode, no gradient: the graph that
    ``--amp --torchcompile`` evaluates with, whose inductor case this is since the CLI's bf16 test runs aot_eager):
    eager's inference takes the fused CPU path, the graph ATen's ops, so the logits differ by bf16 rounding
    (measured with both backends: 5.4e-3 of the largest logit, about 1.5 bf16 ulps of it); the bound, 5e-2, fails a
    logit 10% off (and the eval loss, which the CLI compared, barely moves for logits this small).
    """
    if not onednn_bf16_supported():
        pytest.skip("no native bf16 kernels on this CPU (sequencer runs float32 there)")
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    batches = fixed_batches(False, steps=3)
    eager = nano_for_training(randomize, False, **SMALL_NANO)
    compiled = nano_for_training(randomize, False, **SMALL_NANO)
    want = bf16_sgd_steps(eager, eager, batches)
    compiled_forward = torch.compile(compiled, backend=backend, fullgraph=True)
    got = bf16_sgd_steps(compiled, compiled_forward, batches)
    recurrent = [i for i, (n, _) in enumerate(compiled.named_parameters()) if ".rnn_" in n]
    assert recurrent
    exact = backend == "aot_eager"
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert torch.isfinite(loss) and rel_err(loss, ref_loss) < (1e-6 if exact else 1e-3), (step, loss, ref_loss)
        if exact:
            assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-6, step
        else:
            assert max(norm_rel_err(grads[i], ref_grads[i]) for i in recurrent) < 5e-2, step
            assert norm_rel_err(torch.cat([g.flatten() for g in grads]),
                                torch.cat([r.flatten() for r in ref_grads])) < 5e-2, step
    x = fixed_batches(False, steps=1, seed=2)[0][0]
    compiled.eval(), eager.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), torch.backends.mkldnn.flags(enabled=True):
        logits, want_logits = (forward(x).float() for forward in (compiled_forward, eager))
    assert torch.isfinite(logits).all() and rel_err(logits, want_logits) < 5e-2


def recorded_copy(value):
    """A detached copy of a tensor argument with its strides, requiring grad where autograd would track it (never in
    a backward pass, which runs without grad mode); lists element-wise."""
    if isinstance(value, (list, tuple)):
        return type(value)(recorded_copy(v) for v in value)
    if isinstance(value, torch.Tensor):
        copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        copy.copy_(value.detach())
        return copy.requires_grad_(value.requires_grad and torch.is_grad_enabled())
    return value


def layouts(value) -> str:
    """Shapes and strides of the tensors in an argument list, other values as they are."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(layouts(v) for v in value) + "]"
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)}:{value.stride()}"
    return repr(value)


def record_calls(monkeypatch, module, names: list[str], calls: dict) -> None:
    """Route ``module.<name>`` (each a custom op the module calls by its global name) through a recorder that keeps
    one copy of the arguments per distinct (op, shapes, strides, flags) in ``calls``."""
    for name in names:
        op = getattr(module, name)

        def recorder(*args, _op=op, _name=name):
            key = (_name, layouts(args))
            calls.setdefault(key, (_op, recorded_copy(args)))
            return _op(*args)

        monkeypatch.setattr(module, name, recorder)


def training_steps(randomize, **model_kwargs) -> None:
    """One forward and backward of nano in train mode as ``train`` runs them, without and with --channels-last
    (which, LayerNorm's output being dense either way, hands the recurrent layers the same layouts today)."""
    for channels_last in (False, True):
        model = nano_for_training(randomize, channels_last, **model_kwargs).train()
        x, y = fixed_batches(channels_last, steps=1)[0]
        F.cross_entropy(model(x), y).backward()


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def assert_opcheck_passes_on_calls(calls: dict, expected_ops: set[str], skip: tuple[str, ...] = ()) -> None:
    """opcheck on every recorded call (but the tests in ``skip``)."""
    assert {name for name, _ in calls} == expected_ops  # each op was met (else the test checks nothing)
    for (name, signature), (_, args) in calls.items():
        overload = getattr(torch.ops.sequencer, name).default
        try:
            torch.library.opcheck(overload, args, test_utils=[t for t in OPCHECK_TESTS if t not in skip])
        except Exception as error:
            raise AssertionError(f"{name} with {signature}") from error


def test_native_rnn_ops_pass_opcheck_with_training_arguments(randomize, monkeypatch):
    """``sequencer::rnn_native`` and its backward, checked (schema, fake kernel's strides, autograd, AOT dispatch)
    on the very arguments a training step of nano hands them under compile, recorded from one.

    Under compile the op receives strided views of the token grid (a column-major sequence batch, not a dense
    tensor): the fake kernels' strides once disagreed with the real ones for those, which opcheck on dense
    made-up inputs did not see and inductor's stride assertions did, in the first backward step.
    """
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    calls = {}
    record_calls(monkeypatch, recurrence, ["rnn_native", "rnn_native_backward"], calls)
    # the branch run_rnn takes under dynamo, taken here in eager so that the arguments can be recorded
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    training_steps(randomize)
    monkeypatch.undo()
    assert_opcheck_passes_on_calls(calls, {"rnn_native", "rnn_native_backward"})


def test_fused_lstm_ops_pass_opcheck_with_training_arguments(randomize):
    """``sequencer::lstm_scan`` and its backward (the Triton backend, on the CPU under TRITON_INTERPRET=1), checked
    on the arguments a training step of nano gives them: the columns' projections are strided views of the rows'."""
    triton_lstm = pytest.importorskip("sequencer.models.kernels.triton_lstm")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("nano runs on CPU tensors here: needs TRITON_INTERPRET=1")
    calls = {}
    with pytest.MonkeyPatch.context() as patch:
        record_calls(patch, triton_lstm, ["lstm_scan", "lstm_scan_backward"], calls)
        training_steps(randomize, lstm_backend="triton")
    # AOT dispatch under the interpreter (where the ops are plain custom ops, triton_lstm.py) is checked by
    # test_kernels_triton's compiled runs; here, on every training call, it would add 9 s of CI
    assert_opcheck_passes_on_calls(calls, {"lstm_scan", "lstm_scan_backward"}, skip=("test_aot_dispatch_dynamic",))
