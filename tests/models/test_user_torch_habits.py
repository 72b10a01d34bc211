"""Plain PyTorch a researcher applies to a model from ``create_model``: pruning and hooks on its layers, deferred
(meta-device) construction, whole-module pickling, other dtypes, frozen stages, checkpointing with drop path."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import sequencer

USE_ONEDNN = True  # the fused oneDNN paths (the default CPU path) are the ones that read a layer's weights

# one layer of each kind a fused path reads: the MLP's fc1, the mixer's fc, the 1x1 downsample, an LSTM
PRUNED = ("stages.0.blocks.0.mlp_channels.fc1", "stages.1.blocks.0.rnn_tokens.fc", "stages.2.downsample.down",
          "stages.0.blocks.0.rnn_tokens.rnn_v")


@pytest.fixture
def nano(randomize):
    torch.manual_seed(0)
    return randomize(sequencer.create_model("sequencer2d_nano", num_classes=5))


def batch(n=4, side=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 5, (n,), generator=g)


def weight_name(module):
    return "weight_hh_l0" if isinstance(module, torch.nn.RNNBase) else "weight"


@pytest.mark.parametrize("amp,compiled", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "bf16_autocast", "compiled"])
def test_pruned_layers_train_as_pruned_and_their_hooks_fire(nano, amp, compiled):
    """``torch.nn.utils.prune`` makes ``weight`` a tensor its forward pre-hook recomputes from ``weight_orig``. The
    fused oneDNN paths read ``fc1.weight`` without calling ``fc1``: before, ``weight_orig`` got no gradient (the
    pruned MLP never trained) and a forward hook on ``fc1`` never fired in training. Now each hooked layer is called:
    its gradient is the unpruned model's (with the pruned weights) times the mask."""
    x, y = batch()
    pruned, plain = copy.deepcopy(nano).train(), copy.deepcopy(nano).train()
    fired = []
    for name in PRUNED:
        layer = pruned.get_submodule(name)
        prune.l1_unstructured(layer, weight_name(layer), amount=0.5)
        layer.register_forward_hook(lambda *args, name=name: fired.append(name))
        with torch.no_grad():
            getattr(plain.get_submodule(name), weight_name(layer)).copy_(getattr(layer, weight_name(layer)))
    for model in (torch.compile(pruned, backend="aot_eager") if compiled else pruned, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model(x), y).backward()
    torch._dynamo.reset()
    assert sorted(set(fired)) == sorted(PRUNED)
    for name in PRUNED:
        layer, reference = pruned.get_submodule(name), plain.get_submodule(name)
        w = weight_name(layer)
        expected = getattr(reference, w).grad * getattr(layer, w + "_mask")
        got = getattr(layer, w + "_orig").grad
        assert got is not None, name
        # bf16: the hooked layer runs as its module (a conv), the plain one as a matmul; their bf16 roundings differ
        # by CPU (equal with oneDNN's bf16 kernels, 0.6% of the largest gradient on an AVX2-only CPU's)
        tolerance = dict(rtol=0, atol=2e-2 * expected.abs().max().item()) if amp else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got, expected, **tolerance, msg=name)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_compiled_lstm_reads_a_parametrized_weight_as_it_is_now(amp):
    """``parametrizations.weight_norm`` on an LSTM weight: compiled code read ``rnn._flat_weights``, a cache only the
    module's own forward refreshes, so it ran the unparametrized original (0.0028 off in nano's logits with the
    ``cpu`` backend, whose eager path never calls the module) or the weight of the last eager call, and gave the
    parametrization no gradient. Compiled = eager, outputs and gradients."""
    from sequencer.models.sequencer2d import RNN2d
    torch.manual_seed(0)
    mixer = RNN2d(8, 4, lstm_backend="native")
    torch.nn.utils.parametrizations.weight_norm(mixer.rnn_v, "weight_hh_l0")
    with torch.no_grad():
        mixer.rnn_v.parametrizations.weight_hh_l0.original0.mul_(2)  # the norm doubled after the cache was filled
    x = torch.randn(2, 3, 5, 8)
    results = []
    # compiled first: before, it ran the cache's unparametrized weight (after an eager call: that call's weight, whose
    # graph was freed by its backward, "Trying to backward through the graph a second time")
    for run in (torch.compile(mixer, backend="aot_eager", fullgraph=True), mixer):
        mixer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = run(x)
        out.float().square().sum().backward()
        results.append([out.float()] + [p.grad.clone() if p.grad is not None else None for p in mixer.rnn_v.parametrizations.weight_hh_l0.parameters()])
    torch._dynamo.reset()
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=2e-2 if amp else 1e-5, atol=1e-3 if amp else 1e-6)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_frozen_stages_stay_as_they_were_and_the_rest_trains_as_unfrozen(randomize, backend):
    """Stem and first stage frozen with ``requires_grad_(False)`` (the fused oneDNN and ``cpu`` LSTM paths read their
    weights directly), trained in train mode by two AdamW steps with weight decay: the frozen weights get no gradient
    and stay bit for bit, their flags stay off, and every other weight gets the unfrozen model's gradient."""
    x, y = batch()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(randomize(sequencer.create_model("sequencer2d_nano", num_classes=5, lstm_backend=backend)))
    frozen, plain = models
    frozen.stem.requires_grad_(False)
    frozen.stages[0].requires_grad_(False)
    kept = {k: v.clone() for k, v in frozen.state_dict().items() if k.startswith(("stem.", "stages.0."))}
    optimizer = torch.optim.AdamW(frozen.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        frozen.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(frozen.train()(x), y).backward()
        F.cross_entropy(plain.train()(x), y).backward()
        for name, p in frozen.named_parameters():
            if name.startswith(("stem.", "stages.0.")):
                assert p.grad is None and not p.requires_grad, name
            else:
                torch.testing.assert_close(p.grad, plain.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
        optimizer.step()
        with torch.no_grad():
            plain.load_state_dict(frozen.state_dict())  # the next comparison starts from the stepped weights
    for k, v in kept.items():
        assert torch.equal(frozen.state_dict()[k], v), k


@pytest.mark.parametrize("backend", ["native", "cpu"])
def test_a_meta_built_model_loaded_either_way_computes_the_loaded_weights(nano, backend):
    """``with torch.device("meta")`` then ``load_state_dict(sd, assign=True)`` or ``to_empty`` + ``load_state_dict``:
    the LSTMs' flat-weight cache must follow the loaded parameters (the ``cpu`` backend reads the attributes). A whole
    module survives ``torch.save`` and runs float64 through the kernels."""
    x, _ = batch(2)
    nano.eval()
    with torch.no_grad():
        expected = nano(x)
    for assign in (True, False):
        with torch.device("meta"):
            model = sequencer.create_model("sequencer2d_nano", num_classes=5, lstm_backend=backend)
        if not assign:
            model.to_empty(device="cpu")
        model.load_state_dict(nano.state_dict(), assign=assign)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).double()  # a whole pickled module: only in a test
    with torch.no_grad():
        torch.testing.assert_close(restored(x.double()).float(), expected, rtol=1e-5, atol=1e-6)


# bounds on the relative error against the float64 model: several roundings of the dtype (fp16 ~1e-3 and bf16 ~1e-2
# measured for nano on AVX512-BF16 and AVX2-capped kernels), loose enough for any x86 CPU's rounding
LOW_PRECISION_BOUNDS = {"float16": 1e-2, "bfloat16": 6e-2, "float16_autocast": 1e-2}


@pytest.mark.parametrize("precision", list(LOW_PRECISION_BOUNDS))
def test_a_half_or_bfloat16_model_or_float16_autocast_trains_near_the_float64_model(nano, precision):
    """``model.half()`` / ``model.bfloat16()`` compute and train in that dtype (logits and gradients in it);
    ``torch.autocast("cpu", dtype=torch.float16)`` with ``torch.amp.GradScaler("cpu")`` gives float16 logits and
    float32 gradients. Each within a few of the dtype's roundings of the float64 model's logits and gradients."""
    x, y = batch()
    reference = copy.deepcopy(nano).double()
    expected = reference(x.double())
    F.cross_entropy(expected, y).backward()
    model = copy.deepcopy(nano)
    if precision == "float16_autocast":
        scaler, optimizer = torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.0)
        scales = []
        while len(scales) < 8 and scaler.get_scale() not in scales:  # a loop's steps until one is taken: the
            scales.append(scaler.get_scale())  # scaler skips those whose float16 gradients overflow, halving its scale
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(x)
            scaler.scale(F.cross_entropy(logits, y)).backward()
            scaler.step(optimizer)  # unscales the gradients in place
            scaler.update()
        assert scaler.get_scale() == scales[-1]  # this step was taken (lr 0: the weights are unchanged)
        dtypes = (torch.float16, torch.float32)
    else:
        dtype = getattr(torch, precision)
        model.to(dtype)
        logits = model(x.to(dtype))
        F.cross_entropy(logits.float(), y).backward()
        dtypes = (dtype, dtype)
    assert (logits.dtype, *{p.grad.dtype for p in model.parameters()}) == dtypes
    bound = LOW_PRECISION_BOUNDS[precision]
    assert (logits.double() - expected).abs().max() <= bound * expected.abs().max()
    grads, expected_grads = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (model, reference)]
    assert (grads - expected_grads).norm() <= bound * expected_grads.norm()


def test_a_float64_model_stays_float64_under_autocast():
    """Autocast casts no float64 tensor, so a ``.double()`` model computes in float64 under it, as plain PyTorch
    does. Before, float16 autocast cast the LSTMs' input to float16 against float64 weights (an ATen dtype error),
    the ``cpu`` backend ran bfloat16 under bfloat16 autocast (1.2e-3 off, silently), and compiled training under
    bfloat16 autocast sent float64 to oneDNN's LSTM (a fake-tensor error)."""
    from sequencer.models.sequencer2d import RNN2d
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    for backend in ("native", "cpu"):
        mixer = RNN2d(8, 4, lstm_backend=backend).double()
        with torch.no_grad():
            expected = mixer(x)
            for dtype in (torch.float16, torch.bfloat16):
                with torch.autocast("cpu", dtype=dtype):
                    got = mixer(x)
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{backend} {dtype}")
    mixer.zero_grad()
    mixer(x).square().sum().backward()
    expected = [p.grad.clone() for p in mixer.parameters()]
    mixer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(mixer, backend="aot_eager", fullgraph=True)(x)
    out.square().sum().backward()
    torch._dynamo.reset()
    assert out.dtype == torch.float64
    for got, want in zip([p.grad for p in mixer.parameters()], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_gradient_penalty_trains_the_float32_model_as_the_float64_one(nano):
    """Double backward (``torch.autograd.grad(..., create_graph=True)``, then ``backward()`` of a penalty on that
    gradient, as WGAN-GP or R1 regularisation do) gives the float64 model's parameter gradients on the default CPU
    path, and under bf16 autocast (where a CPU with bf16 kernels runs the MLP's oneDNN path on autocast's copies) to
    bf16's rounding (measured 6e-3 on AVX512-BF16). Before, the oneDNN matmuls in the MLP and the axes' mixing were
    constants to the second differentiation and the MLP's saved pre-activation had no history: gradients 30-70% off
    (62% under autocast), with only torch's warning."""
    x, _ = batch(n=2, side=16)
    grads = {}
    for dtype, amp in ((torch.float64, False), (torch.float32, False), (torch.float32, True)):
        model = copy.deepcopy(nano).to(dtype)
        inputs = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(inputs).float().square().sum()
        (grad_x,) = torch.autograd.grad(out, inputs, create_graph=True)
        grad_x.square().sum().backward()
        grads[dtype, amp] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    exact = grads[torch.float64, False]
    assert exact.norm() > 0
    assert (grads[torch.float32, False] - exact).norm() <= 1e-4 * exact.norm()
    assert (grads[torch.float32, True] - exact).norm() <= 3e-2 * exact.norm()


def test_forward_mode_ad_through_a_frozen_block_gives_the_float64_tangent(nano):
    """``torch.autograd.forward_ad`` (a dual input, frozen weights, so that no gradient is needed) gets the float64
    tangent (float64 runs ATen's ops only) through a block's MLP, the fused oneDNN matmul's place, and the ``cpu``
    LSTM backend's in-place scan steps aside for ATen's LSTM. Before, both dropped the tangent silently (the MLP's
    output had none, nano's with the ``cpu`` backend was 80% off). (The model as a whole is not run: the first
    forward-mode pass through ATen's LSTM imports 900 modules, seconds of CPU; oneDNN's LSTM, the default, has no
    forward derivative and torch says so.)"""
    from torch.autograd import forward_ad
    from sequencer.models.kernels import cpu_lstm_applies

    block = copy.deepcopy(nano.stages[0].blocks[0]).eval().requires_grad_(False)
    x = torch.randn(2, 8, 8, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(2))
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    mixer = block.rnn_tokens
    with forward_ad.dual_level():
        assert not cpu_lstm_applies([mixer.rnn_v, mixer.rnn_h], "cpu", forward_ad.make_dual(x, t))
        got = forward_ad.unpack_dual(block.mlp_channels(forward_ad.make_dual(x, t))).tangent
        expected = forward_ad.unpack_dual(block.mlp_channels.double()(
            forward_ad.make_dual(x.double(), t.double()))).tangent
    assert cpu_lstm_applies([mixer.rnn_v, mixer.rnn_h], "cpu", x)  # outside forward AD: inference takes it
    assert got is not None and expected.norm() > 0
    assert (got.double() - expected).norm() <= 1e-5 * expected.norm()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_torch_ao_dynamic_quantization_finds_only_the_head_as_the_readme_says(nano):
    """README: ``torch.ao.quantization.quantize_dynamic`` matches layer types exactly, and the model's LSTMs and
    block linears are subclasses; if this changes (torch, or the model's classes), the README's note must too."""
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(nano).eval())
    assert [name for name, m in quantized.named_modules()
            if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")] == ["head.fc"]
