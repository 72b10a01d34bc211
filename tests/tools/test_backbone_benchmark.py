"""`sequencer benchmark --backbone`: the rows, their figures and their memory probe (timings are never asserted)."""
from __future__ import annotations

import json

import pytest
import torch

from sequencer.cli import main
from sequencer.models.flops import count_macs
from sequencer.tools import backbone_benchmark
from sequencer.tools.peak_memory import measure_peak_memory


def test_backbone_rows_beside_a_timm_reference_with_and_without_fpn(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["benchmark", "--backbone", "--model", "sequencer2d_nano", "--img-size", "40", "-b", "1",
               "--reference-model", "test_convnext", "--mode", "both", "--num-warmup", "0", "--num-iter", "1",
               "--memory-iter", "0", "--gemm-size", "64", "--device", "cpu", "--results-file", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["gemm_gflops"] > 0
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    impls = ["backbone", "trunk", "ref-test_convnext", "ref-test_convnext-fpn"]
    assert list(rows) == [(i, m) for m in ("infer", "train") for i in impls]
    assert report["input_size"] == [3, 40, 40] and report["reference"] == "test_convnext"
    backbone = backbone_benchmark.build_row_model("backbone", "sequencer2d_nano", "")
    assert rows["backbone", "infer"]["gmacs"] == pytest.approx(count_macs(backbone, (3, 40, 40)) / 1e9)
    assert rows["backbone", "infer"]["params_m"] == pytest.approx(sum(p.numel() for p in backbone.parameters()) / 1e6)
    # the pyramid costs MACs and parameters on top of the trunk; the FPN on top of the reference
    for a, b in (("backbone", "trunk"), ("ref-test_convnext-fpn", "ref-test_convnext")):
        assert rows[a, "infer"]["gmacs"] > rows[b, "infer"]["gmacs"] > 0
        assert rows[a, "infer"]["params_m"] > rows[b, "infer"]["params_m"]
    for r in rows.values():
        assert r["img_per_s"] == pytest.approx(1000 / r["step_ms"])
        backbone_ms = rows["backbone", r["mode"]]["step_ms"]
        assert r["speed_vs_backbone"] == pytest.approx(backbone_ms / r["step_ms"])
        # the share of the GEMM rate: every forward multiply-add (x3 with backward) per second
        flops_per_image = 2e9 * r["gmacs"] * (3 if r["mode"] == "train" else 1)
        assert r["gemm_fraction"] == pytest.approx(flops_per_image * r["img_per_s"] / 1e9 / report["gemm_gflops"])
        assert r["peak_memory_mb"] is None
    printed = capsys.readouterr().out
    assert "ref-test_convnext-fpn" in printed and "vs backbone" in printed and "GEMM %" in printed


def test_backbone_benchmark_follows_the_one_precision_rule(tmp_path):
    """float16 on the CPU runs bfloat16 (float32 where bf16 has no native kernels), as the classification benchmark,
    training and validation do, and the report names the dtype that ran (it was refused as CUDA-only)."""
    from sequencer.models.kernels import onednn_bf16_supported
    out = tmp_path / "r.json"
    rng = torch.get_rng_state()
    assert main(["benchmark", "--backbone", "--model", "sequencer2d_nano", "--img-size", "32", "-b", "1",
                 "--reference-model", "test_convnext", "--amp-dtype", "float16", "--num-warmup", "0", "--num-iter",
                 "1", "--memory-iter", "0", "--gemm-size", "64", "--device", "cpu", "--results-file", str(out)]) == 0
    assert torch.equal(torch.get_rng_state(), rng)  # it seeds and draws: the caller's generator is kept
    report = json.loads(out.read_text())
    ran = "bfloat16" if onednn_bf16_supported() else "float32"
    assert report["amp_dtype"] == ran and {r["dtype"] for r in report["results"]} == {ran}


def test_backbone_rows_under_the_callers_float64_default_dtype_are_float32(monkeypatch, callers_float64_default):
    """Called where the caller set ``torch.set_default_dtype(torch.float64)``, each row times a float32 model on
    float32 images, as its report says (they were built and drawn in float64); the caller's default comes back."""
    from sequencer.tools.benchmark import BenchmarkSettings
    seen, make_step = set(), backbone_benchmark.make_step

    def recorded(model, x, *args):
        seen.add((x.dtype, *{p.dtype for p in model.parameters()}))
        return make_step(model, x, *args)

    monkeypatch.setattr(backbone_benchmark, "make_step", recorded)
    settings = BenchmarkSettings(model="sequencer2d_nano", img_size=32, batch_size=1, reference_model="test_convnext",
                                 num_warmup=0, num_iter=1, memory_iter=0, gemm_size=64, device="cpu", backbone=True)
    report = backbone_benchmark.run_backbone_benchmark(settings)
    assert torch.get_default_dtype() == torch.float64
    assert seen == {(torch.float32, torch.float32)} and {r["dtype"] for r in report["results"]} == {"float32"}


def test_timm_reference_under_fpn_gives_torchvisions_levels():
    model = backbone_benchmark.build_row_model("ref-test_convnext-fpn", "", "test_convnext")
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [(k, tuple(m.shape[1:])) for k, m in maps.items()] == [
        ("0", (256, 16, 16)), ("1", (256, 8, 8)), ("2", (256, 4, 4)), ("3", (256, 2, 2)), ("pool", (256, 1, 1))]


@pytest.mark.slow
def test_backbone_memory_probe_reports_training_above_inference():
    spec = dict(impl="backbone", name="sequencer2d_nano", reference="", dtype="float32", batch_size=2, img_size=64,
                device="cpu", iters=1)
    infer = measure_peak_memory(dict(spec, mode="infer"), backbone_benchmark.backbone_memory_probe)
    train = measure_peak_memory(dict(spec, mode="train"), backbone_benchmark.backbone_memory_probe)
    assert infer is not None and train is not None
    assert 0 < infer < train


@pytest.mark.parametrize("argv, message", [
    ([], "--backbone needs --model"),
    (["--model", "sequencer2d_nano", "--compare-timm", "--pretrained"],
     "--backbone does not take --pretrained, --compare-timm"),
])
def test_backbone_benchmark_refuses_what_does_not_apply(argv, message, capsys):
    assert main(["benchmark", "--backbone", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
