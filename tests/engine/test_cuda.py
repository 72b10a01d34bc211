"""CUDA: the model, training (AMP, torch.compile, DDP over NCCL, the Triton LSTM), validation, ``auto``'s backend
choice and the inference fast path on a GPU.

Skipped without a GPU (CI has none); run on a lent GPU machine with ``python -m pytest tests/engine/test_cuda.py``.
Every fp32 reference runs with TF32 off (the autouse fixture below).
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from run_helpers import REPO, TINY_MODEL, subprocess_env, summary_rows, train_cli
from sequencer import optimize_for_inference
from sequencer.cli import main as cli_main
from sequencer.models import create_model
from sequencer.models.kernels import recurrence
from sequencer.models.loading import read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"

# TINY_RUN without its "--device cpu"
GPU_RUN = TINY_MODEL + ["--img-size", "16", "-b", "8", "-j", "0", "--log-interval", "1000", "--opt", "adamw",
                        "--lr", "3e-3", "--warmup-epochs", "0", "--hflip", "0"]


@pytest.fixture(autouse=True)
def exact_fp32(no_tf32):
    """TF32 would make fp32 GPU results differ from the CPU's by ~1e-3; these tests compare fp32 to fp32."""


def _with_random_head(model):
    torch.nn.init.normal_(model.head.fc.weight, std=0.02)
    return model


@pytest.mark.parametrize("name", ["sequencer2d_s", "gru_sequencer2d_s", "rnn_sequencer2d_s",
                                  "sequencer2d_vertical", "sequencer2d_s_add", "sequencer2d_s_unidirectional",
                                  "sequencer2d_s_without_fc", "v_sequencer_s_pe"])
def test_cuda_logits_and_gradients_match_cpu(name):
    torch.manual_seed(0)
    kwargs = {} if name.startswith("v_") else {"layers": (1, 1, 1, 1)}
    # train mode (cuDNN's RNN backward needs it); no dropout or drop-path is configured, so it computes as eval
    cpu = _with_random_head(create_model(name, **kwargs)).train()
    gpu = create_model(name, **kwargs).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 3, 224, 224)
    ref = cpu(x)
    out = gpu(x.cuda())
    assert ((out.cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-4
    ref.square().sum().backward()
    out.square().sum().backward()
    for (n, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        if p_cpu.grad is None or p_cpu.grad.abs().max() == 0:
            continue
        rel = ((p_gpu.grad.cpu() - p_cpu.grad).abs().max() / p_cpu.grad.abs().max()).item()
        assert rel < 1e-3, (n, rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_optimize_for_inference(dtype):
    import timm
    torch.manual_seed(0)
    # cuDNN, as timm (auto would take the Triton kernel for half-precision inference on an H100)
    model = _with_random_head(create_model("sequencer2d_s", layers=(1, 1, 2, 1), lstm_backend="native")).cuda().eval()
    reference = timm.create_model("sequencer2d_s", layers=(1, 1, 2, 1)).cuda().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            timm_out = reference(x).float()
    fast = optimize_for_inference(model, dtype=dtype)
    out = fast(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    # the same kernels as timm under autocast, so the same numbers up to reduction order
    assert ((out - timm_out).abs().max() / timm_out.abs().max()).item() < (1e-5 if dtype == torch.float32 else 2e-2)
    # cuDNN's reduced-precision LSTM puts timm and us equally ~5-7% (max abs / max abs) from fp32 (measured on
    # an H100, bf16 and fp16 alike); on the CPU the bf16 path stays within 1e-2
    assert ((out - fp32).abs().max() / fp32.abs().max()).item() < (1e-4 if dtype == torch.float32 else 1e-1)
    assert next(model.parameters()).dtype == torch.float32  # the eager model is untouched


@pytest.mark.parametrize("amp_dtype,compile_backend,lstm_backend", [
    ("bfloat16", None, "native"), ("float16", None, "native"), ("bfloat16", "inductor", "native"),
    ("float16", "inductor", "native"), ("bfloat16", None, "triton"), ("bfloat16", "inductor", "triton"),
    ("float16", None, "triton")])
def test_cuda_training_then_validate_reproduces_eval_top1(image_folder, tmp_path, monkeypatch, amp_dtype,
                                                          compile_backend, lstm_backend):
    """`sequencer train` then `validate` as a user runs them on a GPU: AMP in both dtypes, eager and compiled, on
    cuDNN and on the Triton LSTM (SEQUENCER_LSTM_BACKEND, read by both commands)."""
    monkeypatch.setenv(recurrence.BACKEND_ENV, lstm_backend)
    args = [image_folder, *GPU_RUN, "--device", "cuda", "--amp", "--amp-dtype", amp_dtype, "--epochs", "2",
            "--output", tmp_path, "--experiment", "gpu", "--model-ema", "--mixup", "0.5", "--channels-last"]
    if compile_backend:
        args += ["--torchcompile", compile_backend]
    assert train_cli(args) == 0
    folder = tmp_path / "gpu"
    rows = summary_rows(folder)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(float(r["train_loss"]))) for r in rows)
    ckpt = read_checkpoint(folder / "model_best.pth.tar")
    assert not any(k.startswith("_orig_mod.") for k in ckpt["state_dict"])  # saved unwrapped from compile
    results = tmp_path / "val.json"
    assert cli_main(["validate", str(image_folder), "--checkpoint", str(folder / "model_best.pth.tar"),
                     "--device", "cuda", "--amp-dtype", amp_dtype, "-b", "8", "-j", "0",
                     "--results-file", str(results)]) == 0
    measured = json.loads(results.read_text())
    # the trainer evaluates the EMA copy too; model_best holds whichever metric was best
    assert measured["top1"] == pytest.approx(ckpt["metric"], abs=1e-3)


@pytest.mark.parametrize("entry", ["validate", "validate_segmenter"])
def test_cuda_evaluating_a_cpu_module_gives_it_back_on_the_cpu(entry, tmp_path):
    """``validate`` / ``validate_segmenter`` with ``device="cuda"`` run the caller's CPU module on the GPU, then
    give it back on the CPU holding its own tensors, in the mode it was in (tests/engine/test_guest_state.py checks
    the same on the CPU through the 'meta' device)."""
    import sequencer
    from segmentation_helpers import make_voc
    from test_api_objects import Blobs

    if entry == "validate":
        model = create_model("sequencer2d_nano", num_classes=2, img_size=16).train()
        run = lambda: sequencer.validate(model=model, data=Blobs(8, 1, pil=True),  # noqa: E731
                                         device=DEVICE, workers=0, progress=False)
    else:
        model = sequencer.create_segmenter("sequencer2d_nano", 3, head_channels=16, out_channels=16).train()
        voc = make_voc(tmp_path / "voc", n_train=1, n_val=2)
        run = lambda: sequencer.validate_segmenter(data=voc, model=model, eval_size=32, device=DEVICE)  # noqa: E731
    tensors = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    result = run()
    assert result.images in (2, 8)
    assert model.training and {v.device.type for v in model.state_dict().values()} == {"cpu"}
    after = model.state_dict(keep_vars=True)
    assert all(after[k].data_ptr() == t.data_ptr() and torch.equal(after[k], copy) for k, (t, copy) in tensors.items())


def test_cuda_distributed_train_sh_on_one_gpu(image_folder, tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "distributed_train.sh"), "1", str(image_folder), *map(str, GPU_RUN),
         "--output", str(tmp_path), "--experiment", "nccl", "--epochs", "1", "--amp"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cuda:0" in out
    assert [int(r["epoch"]) for r in summary_rows(tmp_path / "nccl")] == [0]


# --- model-level checks of the compiled and Triton paths (TF32 off: fp32 references are exact fp32)

SMALL_S = dict(layers=(1, 1, 1, 1))  # sequencer2d_s's widths (hidden 48 and 96) with one block per stage


def _small_s(lstm_backend: str = "native", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _with_random_head(create_model("sequencer2d_s", lstm_backend=lstm_backend, **SMALL_S)).to(DEVICE)


def _batches(steps: int, batch: int = 4, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g).to(DEVICE),
             torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)) for _ in range(steps)]


def _sgd_steps(model, forward, batches, amp_dtype):
    """SGD steps, the forward under autocast in ``amp_dtype`` (None: fp32) -> [(loss, [gradients])] per step."""
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.02)
    history = []
    for x, y in batches:
        with torch.autocast(DEVICE, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        history.append((loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                        for p in params]))
        optimizer.step()
    return history


def _norm_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _recurrent(model) -> list[int]:
    return [i for i, (n, _) in enumerate(model.named_parameters()) if ".rnn_" in n]


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cuda_compiled_amp_training_matches_eager_amp(amp_dtype):
    """Three SGD steps under autocast, inductor-compiled and eager, from one seed. The recurrent op follows
    autocast as cuDNN's nn.LSTM does (fp16, also under bf16 autocast), so both run the same cuDNN kernels; inductor
    rounds fused elementwise chains once, so the two differ by half-precision rounding (bounds as the CPU test's
    in tests/models/test_compile.py). This once raised "Cannot access storage of TensorWrapper" in the backward."""
    torch._dynamo.reset()
    batches = _batches(3)
    eager, compiled = _small_s(), _small_s()
    want = _sgd_steps(eager, eager, batches, amp_dtype)
    got = _sgd_steps(compiled, torch.compile(compiled), batches, amp_dtype)
    recurrent = _recurrent(compiled)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item()), step
        assert max(_norm_rel(grads[i], ref_grads[i]) for i in recurrent) < 5e-2, step


def test_cuda_compiled_native_op_follows_cudnn_autocast_rule():
    """Under bf16 autocast the compiled recurrent op gets what eager nn.LSTM gets on CUDA: fp16 (ATen's
    AutocastRNN.cpp), so its output equals eager's bit for bit."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(32, 16, batch_first=True, bidirectional=True).to(DEVICE)
    x = torch.randn(8, 10, 32, device=DEVICE)
    compiled = torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = compiled(x), layer(x)[0]
    assert got.dtype == want.dtype == torch.float16
    assert torch.equal(got, want)


@pytest.mark.parametrize("compile_backend", [None, "inductor"])
def test_cuda_triton_training_matches_cudnn_in_fp32(compile_backend):
    """sequencer2d_s's widths (hidden 48 and 96, the sizes that once ran out of shared memory) trained on the
    Triton LSTM against cuDNN, fp32 with TF32 off on both sides: three SGD steps' losses and every gradient agree
    to fp32 reordering over the recurrence (1e-4 / 1e-3 relative, the CPU-vs-GPU bounds above)."""
    torch._dynamo.reset()
    batches = _batches(3)
    triton, cudnn = _small_s("triton"), _small_s("native")
    forward = torch.compile(triton) if compile_backend else triton
    got = _sgd_steps(triton, forward, batches, None)
    want = _sgd_steps(cudnn, cudnn, batches, None)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert abs(loss.item() - ref_loss.item()) < 1e-4 * abs(ref_loss.item()), step
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            if r.abs().max() > 0:
                assert ((g - r).abs().max() / r.abs().max()).item() < 1e-3, (step, i)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cuda_triton_amp_logits_are_closer_to_fp32_than_cudnn_amp(amp_dtype):
    """Triton keeps h, c and the accumulation in fp32; cuDNN under autocast runs fp16. Measured on an H100 at
    sequencer2d_s, 224 px (BENCHMARKS.md "GPU"): worst logit error 6.2e-3 (bf16) / 7.1e-4 (fp16) on Triton,
    7.3e-2 / 7.4e-2 on cuDNN. Here with one block per stage: Triton's error must stay below cuDNN's."""
    x = torch.randn(8, 3, 224, 224, device=DEVICE)
    errors = {}
    with torch.no_grad():
        reference = _small_s("native").eval()(x)
        for backend in ("triton", "native"):
            with torch.autocast(DEVICE, dtype=amp_dtype):
                out = _small_s(backend).eval()(x).float()
            errors[backend] = ((out - reference).abs().max() / reference.abs().max()).item()
    assert errors["triton"] < errors["native"], errors


def test_cuda_auto_runs_triton_inference_where_measured_and_cudnn_training():
    """``auto`` on this GPU: where recurrence.AUTO_TRITON_MEASURED lists its compute capability, half-precision
    inference gives the Triton backend's logits exactly and training cuDNN's; elsewhere cuDNN's throughout."""
    measured = torch.cuda.get_device_capability() in recurrence.AUTO_TRITON_MEASURED["capabilities"]
    auto, triton, native = _small_s("auto"), _small_s("triton"), _small_s("native")
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = auto.eval()(x)
        assert torch.equal(out, (triton if measured else native).eval()(x))
    batches = _batches(1)
    got = _sgd_steps(auto, auto, batches, torch.bfloat16)[0][0]
    want = _sgd_steps(native, native, batches, torch.bfloat16)[0][0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
