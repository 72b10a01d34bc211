"""CUDA: the model, training (AMP, torch.compile, DDP over NCCL), validation and the inference fast path on a GPU.

Skipped without a GPU (CI has none); run on a lent GPU machine with ``python -m pytest tests/engine/test_cuda.py``.
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
from sequencer.models.loading import read_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# TINY_RUN without its "--device cpu"
GPU_RUN = TINY_MODEL + ["--img-size", "16", "-b", "8", "-j", "0", "--log-interval", "1000", "--opt", "adamw",
                        "--lr", "3e-3", "--warmup-epochs", "0", "--hflip", "0"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would make fp32 GPU results differ from the CPU's by ~1e-3; these tests compare fp32 to fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


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
    model = _with_random_head(create_model("sequencer2d_s", layers=(1, 1, 2, 1))).cuda().eval()
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


@pytest.mark.parametrize("amp_dtype,compile_backend", [("bfloat16", None), ("float16", None),
                                                       ("bfloat16", "inductor")])
def test_cuda_training_then_validate_reproduces_eval_top1(image_folder, tmp_path, amp_dtype, compile_backend):
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


def test_cuda_distributed_train_sh_on_one_gpu(image_folder, tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "distributed_train.sh"), "1", str(image_folder), *map(str, GPU_RUN),
         "--output", str(tmp_path), "--experiment", "nccl", "--epochs", "1", "--amp"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cuda:0" in out
    assert [int(r["epoch"]) for r in summary_rows(tmp_path / "nccl")] == [0]
