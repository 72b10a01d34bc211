"""CPUs without oneDNN bf16 kernels (no AVX-512 BF16/AMX): train --amp, validate --amp and bf16 inference fall back
to PyTorch's own kernels instead of failing in oneDNN ("could not create a primitive descriptor")."""
import numpy as np
import pytest
import torch
from PIL import Image

import sequencer
from sequencer.cli import main

USE_ONEDNN = True  # the default path users get (see conftest)
TINY_MODEL = ["--model", "sequencer2d_nano", "--model-kwargs", "layers=(1,1)", "patch_sizes=(2,1)",
              "embed_dims=(16,16)", "hidden_sizes=(4,4)", "mlp_ratios=(2,2)"]


@pytest.fixture
def no_onednn_bf16(monkeypatch):
    """The CPU reports no oneDNN bf16 support, as a pre-AVX-512-BF16 CPU does."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)


def _image_folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_train_and_validate_amp_fall_back(no_onednn_bf16, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    assert main(["train", str(data), *TINY_MODEL, "--img-size", "16", "-b", "4", "-j", "0", "--device", "cpu",
                 "--epochs", "1", "--warmup-epochs", "0", "--amp", "--output", str(tmp_path / "out"),
                 "--experiment", "bf16"]) == 0
    checkpoint = tmp_path / "out" / "bf16" / "last.pth.tar"
    assert checkpoint.is_file()
    assert main(["validate", str(data), "--checkpoint", str(checkpoint), "--amp", "-j", "0", "--device", "cpu",
                 "--split", "val"]) == 0
    assert "top1" in capsys.readouterr().out.lower()


def test_bf16_inference_and_training_step_fall_back(no_onednn_bf16):
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_nano", layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16),
                                   hidden_sizes=(4, 4), mlp_ratios=(2, 2), num_classes=3)
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training step of train --amp
        model.train()(x).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # validate --amp
            assert (model(x).float() - expected).abs().max() < 0.1 * expected.abs().max()
        fast = sequencer.optimize_for_inference(model, torch.bfloat16)
        assert (fast(x).float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_benchmark_gemm_rate_skips_onednn_bf16(no_onednn_bf16):
    from sequencer.tools.benchmark import gemm_rate
    assert gemm_rate(torch.bfloat16, torch.device("cpu"), size=64, iters=1) > 0
