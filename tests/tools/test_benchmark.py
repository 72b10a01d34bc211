"""`sequencer benchmark`: results are produced, consistent and written; bad options fail cleanly.

Timings are never asserted (the machine is shared); what is checked is the structure, the arithmetic that ties the
numbers together, the side-by-side equality with timm and the error handling.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn

from sequencer.cli import main
from sequencer.models import create_model
from sequencer.models.flops import count_macs
from sequencer.tools import benchmark, benchmark_steps
from sequencer.tools.benchmark import reference_macs
from sequencer.tools.peak_memory import measure_peak_memory

TINY_S = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8), num_classes=3)


@pytest.fixture(scope="module")
def tiny_s_checkpoint(tmp_path_factory):
    """A training-format checkpoint of a tiny sequencer2d_s (so --compare-timm applies to it)."""
    torch.manual_seed(0)
    model = create_model("sequencer2d_s", **TINY_S)
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_s.pth"
    torch.save({"version": 1, "arch": "sequencer2d_s", "model_kwargs": dict(model.model_kwargs),
                "class_names": ["a", "b", "c"], "state_dict": model.state_dict()}, path)
    return path


def test_time_interleaved_alternates_order_and_counts():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = benchmark.time_interleaved(steps, torch.device("cpu"), num_warmup=1, num_iter=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_gemm_rate_is_a_plausible_rate():
    rate = benchmark.gemm_rate(torch.float32, torch.device("cpu"), size=256, iters=2)
    assert 0.1 < rate < 1e6  # GFLOP/s


def test_memory_probe_reports_training_above_inference():
    spec = dict(impl="ours", name="sequencer2d_nano", model_kwargs=dict(num_classes=4), dtype="float32",
                batch_size=8, input_size=(3, 32, 32), device="cpu", iters=1)
    infer = measure_peak_memory(dict(spec, mode="infer"), benchmark_steps.memory_probe)
    train = measure_peak_memory(dict(spec, mode="train"), benchmark_steps.memory_probe)
    assert infer is not None and train is not None
    assert 0 < infer < train  # training keeps activations and gradients


def test_memory_probe_process_imports_neither_timm_nor_torchvision():
    """What a probe's fresh process imports to run ours or an --onnx file (measure_peak_memory imports the probe's
    module there): not the data pipeline, whose timm and torchvision imports took 2.5 s of CPU of every probe. The
    backbone benchmark's probe too (its module imported the engine's inference: 5.5 s of CPU against 2.5 s)."""
    from sequencer.tools.backbone_benchmark import backbone_memory_probe
    from sequencer.tools.onnx_runtime import OnnxModel

    modules = {benchmark_steps.memory_probe.__module__, OnnxModel.__module__, backbone_memory_probe.__module__}
    code = (f"import sys; import {', '.join(sorted(modules))}; "
            "print(sorted({'timm', 'torchvision', 'sequencer.data'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_a_training_step_frees_its_gradients_so_its_peak_memory_counts_them():
    """Zeroed at the start of the next step, the gradients stayed from one step to the next: in the state the
    peak was measured from, so a training row's peak MiB left them out (64 MiB of them read as 0)."""
    from sequencer.tools import backbone_benchmark

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, target = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    steps = (benchmark_steps.make_train_step(model, x, target, torch.float32, torch.device("cpu")),
             backbone_benchmark.make_step(model, x, "train", torch.float32, torch.device("cpu")))
    for step in steps:
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert all(p.grad is None for p in model.parameters())
        assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it did update


@pytest.mark.slow
def test_benchmark_cli_compare_timm_writes_consistent_results(tiny_s_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["benchmark", "--checkpoint", str(tiny_s_checkpoint), "-b", "2", "--img-size", "56",
               "--mode", "both", "--compare-timm", "--optimized", "--num-warmup", "1", "--num-iter", "2",
               "--memory-iter", "0", "--gemm-size", "256", "--device", "cpu", "--results-file", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ours-optimized" in printed and "timm" in printed
    report = json.loads(out.read_text())
    assert report["model"] == "sequencer2d_s" and report["input_size"] == [3, 56, 56]
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {("ours", "infer"), ("ours-optimized", "infer"), ("timm", "infer"),
                         ("ours", "train"), ("timm", "train")}
    model = create_model("sequencer2d_s", **TINY_S)
    macs = count_macs(model, (3, 56, 56))
    for (impl, mode), r in rows.items():
        assert r["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
        assert r["gmacs"] == pytest.approx(macs / 1e9)
        assert r["img_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        assert len(r["step_ms_all"]) == 2
        flops = 2 * macs * (3 if mode == "train" else 1) * r["img_per_s"]
        assert r["gemm_fraction"] == pytest.approx(flops / 1e9 / report["gemm_gflops"])
        assert r["speedup_vs_timm"] > 0
    assert rows[("timm", "infer")]["speedup_vs_timm"] == pytest.approx(1.0)
    # same weights: logits agree with timm's
    assert rows[("ours", "infer")]["max_rel_diff_vs_timm"] < 1e-5
    assert rows[("ours-optimized", "infer")]["max_rel_diff_vs_timm"] < 1e-4


@pytest.mark.slow
def test_benchmark_cli_memory_and_bfloat16(tmp_path, capsys):
    """float16 on the CPU runs bfloat16 (the one autocast rule, engine/amp.py), said on stderr; the results name the
    dtype that ran (float32 on a CPU without native bf16 kernels)."""
    from sequencer.models.kernels import onednn_bf16_supported
    out = tmp_path / "r.json"
    rng = torch.get_rng_state()
    rc = main(["benchmark", "--model", "sequencer2d_nano", "-b", "4", "--img-size", "32", "--mode", "infer",
               "--amp-dtype", "float16", "--optimized", "--num-warmup", "0", "--num-iter", "1",
               "--memory-iter", "1", "--gemm-size", "128", "--device", "cpu", "--results-file", str(out)])
    assert rc == 0
    assert torch.equal(torch.get_rng_state(), rng)  # run_benchmark seeds and draws: the caller's generator is kept
    assert "note: --amp-dtype float16: float16 autocast needs CUDA; running bfloat16 on cpu" in capsys.readouterr().err
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == ["ours", "ours-optimized"]
    ran = "bfloat16" if onednn_bf16_supported() else "float32"
    assert all(r["dtype"] == ran and r["peak_memory_mb"] is not None and r["peak_memory_mb"] >= 0 for r in rows)
    assert all(r["speedup_vs_timm"] is None for r in rows)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="--device cpu: the fused kernel runs CPU tensors only under Triton's interpreter")
def test_benchmark_cli_lstm_backend_and_reference_rows(tiny_s_checkpoint, tmp_path):
    """--lstm-backend native/triton add ours on cuDNN-or-oneDNN and on the fused kernel (timm's logits), repeatable;
    --reference-model a timm model's row."""
    out = tmp_path / "r.json"
    rc = main(["benchmark", "--checkpoint", str(tiny_s_checkpoint), "-b", "2", "--img-size", "28", "--compare-timm",
               "--lstm-backend", "native", "--lstm-backend", "triton", "--reference-model", "resnet10t", "--num-warmup", "0", "--num-iter", "1",
               "--memory-iter", "0", "--gemm-size", "64", "--device", "cpu", "--results-file", str(out)])
    assert rc == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(rows) == ["ours", "ours-native", "ours-triton", "ref-resnet10t", "timm"]
    assert rows["ours-triton"]["max_rel_diff_vs_timm"] < 1e-5 and rows["ours-native"]["max_rel_diff_vs_timm"] < 1e-5
    assert rows["ref-resnet10t"]["max_rel_diff_vs_timm"] is None


def test_a_benchmark_under_the_callers_float64_default_dtype_measures_float32(monkeypatch, callers_float64_default):
    """``run_benchmark`` called where the caller set ``torch.set_default_dtype(torch.float64)``: its model and
    inputs are the float32 its report names (they were float64, timed and reported as float32), and the caller's
    default is back after it."""
    prepared, prepare = [], benchmark._prepare
    monkeypatch.setattr(benchmark, "_prepare", lambda args: prepared.append(prepare(args)) or prepared[-1])
    settings = benchmark.BenchmarkSettings(model="sequencer2d_nano", img_size=16, batch_size=2, device="cpu",
                                           num_warmup=0, num_iter=1, memory_iter=0, gemm_size=32)
    report = benchmark.run_benchmark(settings)
    assert torch.get_default_dtype() == torch.float64
    setup, = prepared
    assert report["amp_dtype"] == "float32"
    assert (setup.x.dtype, {p.dtype for p in setup.model.parameters()}) == (torch.float32, {torch.float32})


def test_benchmark_torchcompile_adds_a_compiled_twin_of_each_row():
    model = create_model("sequencer2d_s", **TINY_S)
    args = benchmark.BenchmarkSettings(lstm_backends=["native", "triton"], torchcompile=True)
    impls = benchmark.extra_impls({"ours": model, "timm": model}, args, torch.device("cpu"), (3, 28, 28))
    assert sorted(impls) == ["ours-compiled", "ours-native", "ours-native-compiled", "ours-triton",
                             "ours-triton-compiled", "timm-compiled"]
    assert {m.lstm_backend for m in impls["ours-triton"].modules() if hasattr(m, "lstm_backend")} == {"triton"}
    assert {m.lstm_backend for m in impls["ours-native"].modules() if hasattr(m, "lstm_backend")} == {"native"}
    assert model.stages[0].blocks[0].rnn_tokens.lstm_backend == "auto"  # the original is left as it was


@pytest.mark.parametrize("argv, message", [
    (["--model", "sequencer2d_nano", "--compare-timm"], "timm has no 'sequencer2d_nano'"),
    (["--model", "sequencer2d_nano", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--model", "sequencer2d_nano", "--device", "tpu"], "--device"),
    (["--model", "no_such_model", "--device", "cpu"], "unknown model"),
    # the reference row is checked before any timing: a name timm lacks, an input too small for it
    (["--model", "sequencer2d_nano", "--reference-model", "convnext_tinyy"],
     "--reference-model convnext_tinyy: timm has no model of that name"),
    (["--model", "sequencer2d_nano", "--img-size", "28", "--reference-model", "convnext_tiny"],
     "--reference-model convnext_tiny does not run on a 3x28x28 input: "),
    # refused before any work: a long benchmark must not end in an unwritable results file
    (["--model", "no_such_model", "--results-file", "/no/such/folder/r.json"], "does not exist"),
    (["--model", "sequencer2d_nano", "--results-file", "r.txt"], "unknown format"),
])
def test_benchmark_cli_errors(argv, message, capsys):
    assert main(["benchmark", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sequencer benchmark: error:") and message in err and "Traceback" not in err


def _image_folder(root):
    """A train split of two classes, six 20x20 JPEGs each."""
    import numpy as np
    from PIL import Image
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / cls / f"{i}.jpg")


def test_loader_benchmark_measures_ours_beside_timms_create_loader(tmp_path, capsys):
    _image_folder(tmp_path / "data")
    results = tmp_path / "r.json"
    assert main(["benchmark", "--data", str(tmp_path / "data"), "--compare-timm", "--img-size", "16", "-b", "2",
                 "-j", "1", "--num-iter", "2", "--rounds", "2", "--device", "cpu",
                 "--results-file", str(results)]) == 0
    report = json.loads(results.read_text())
    assert set(report["rounds"]) == {"ours", "timm"}
    assert all(len(r) == 2 and min(r) > 0 for r in report["rounds"].values())
    out = capsys.readouterr().out
    assert "training input pipeline" in out and "timm" in out
    for name, rates in report["rounds"].items():  # the median of 2 rounds is their mean (it printed the larger)
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert line.endswith(f"median {statistics.median(rates):.1f}"), line


def test_benchmark_onnx_fp32_and_int8_side_by_side(tiny_s_checkpoint, tmp_path):
    """--onnx files are timed in the same run as ours, with their logits' agreement and their own memory probe."""
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        assert main(["export", "--checkpoint", str(tiny_s_checkpoint), "--img-size", "28", "--dynamic-batch",
                     "-o", str(tmp_path / f"{name}.onnx"), *extra]) == 0
    out = tmp_path / "r.json"
    assert main(["benchmark", "--checkpoint", str(tiny_s_checkpoint), "--img-size", "28", "-b", "4", "--device", "cpu",
                 "--num-iter", "2", "--memory-iter", "1", "--gemm-size", "64", "--compare-timm",
                 "--onnx", str(tmp_path / "fp32.onnx"), "--onnx", str(tmp_path / "int8.onnx"),
                 "--results-file", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ours", "timm", "ort-fp32", "ort-int8"}
    assert rows["ort-fp32"]["max_rel_diff_vs_timm"] < 1e-4  # the same weights: the file matches timm and ours
    assert rows["ort-fp32"]["top1_agreement_vs_ours"] == 1.0
    assert 0 < rows["ort-int8"]["max_rel_diff_vs_timm"] < 0.5
    assert all(r["img_per_s"] > 0 and r["peak_memory_mb"] is not None for r in rows.values())
    # each row names the precision it ran in; GEMM % only against the rate measured in that dtype (float32 here)
    assert [rows[i]["dtype"] for i in ("ours", "ort-fp32", "ort-int8")] == ["float32", "float32", "int8"]
    assert rows["ort-int8"]["gemm_fraction"] is None  # no int8 GEMM rate was measured: no fraction of fp32's
    ours, ort = rows["ours"], rows["ort-fp32"]
    assert ort["gemm_fraction"] == pytest.approx(ours["gemm_fraction"] * ort["img_per_s"] / ours["img_per_s"])


def test_benchmark_reference_row_reports_its_own_parameters_and_macs(tmp_path):
    """--reference-model: the row's parameters and GMACs are the reference model's (here timm's resnet10t, its
    multiply-adds counted independently by torch's FlopCounterMode), not ours."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    out = tmp_path / "r.json"
    assert main(["benchmark", "--model", "sequencer2d_nano", "--img-size", "32", "-b", "2", "--device", "cpu",
                 "--reference-model", "resnet10t", "--num-warmup", "0", "--num-iter", "1", "--memory-iter", "0",
                 "--gemm-size", "64", "--results-file", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    reference = timm.create_model("resnet10t").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference(torch.zeros(1, 3, 32, 32))
    ref = rows["ref-resnet10t"]
    assert ref["params_m"] == pytest.approx(sum(p.numel() for p in reference.parameters()) / 1e6)
    assert ref["gmacs"] == pytest.approx(counter.get_total_flops() / 2 / 1e9)
    assert ref["gemm_fraction"] == pytest.approx(2 * ref["gmacs"] * 1e9 * ref["img_per_s"] /
                                                 (json.loads(out.read_text())["gemm_gflops"] * 1e9))
    ours = create_model("sequencer2d_nano")
    assert rows["ours"]["params_m"] == pytest.approx(sum(p.numel() for p in ours.parameters()) / 1e6)
    assert rows["ours"]["gmacs"] == pytest.approx(count_macs(ours, (3, 32, 32)) / 1e9)


def test_reference_macs_count_attention_products():
    """A transformer reference's GMACs (and so its GEMM %) count attention's products, which no module hook sees:
    ViT-Ti at 224 px by hand (197 tokens, width 192, 12 blocks): 1.254 GMACs; the rows said 1.075 (14% low)."""
    tokens, width, blocks = 197, 192, 12
    per_block = tokens * width * 3 * width + tokens * width * width + 2 * tokens * width * 4 * width \
        + 2 * tokens * tokens * width  # qkv, projection, MLP, q k^T and attention x v
    expected = blocks * per_block + 196 * (3 * 16 * 16) * width + width * 1000  # + patch embedding, head
    assert reference_macs("vit_tiny_patch16_224", (3, 224, 224)) == expected


def test_benchmark_onnx_alone_runs_the_files_head_and_claims_no_agreement(tmp_path):
    """--onnx without --checkpoint: ours is the file's model, its architecture with the arguments it records (here
    narrower than the registry's sequencer2d_nano, which the rows' parameters and GMACs gave: 0.58M for 0.02M) and its
    class count (not a 1000-class head), with random weights, so the file's top-1 agreement with ours is not
    reported (it would compare with noise)."""
    torch.manual_seed(0)
    model = create_model("sequencer2d_nano", num_classes=3, embed_dims=(16, 24, 24), hidden_sizes=(4, 6, 6))
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    checkpoint = tmp_path / "nano.pth"
    torch.save({"version": 1, "arch": "sequencer2d_nano", "model_kwargs": dict(model.model_kwargs),
                "class_names": ["a", "b", "c"], "state_dict": model.state_dict()}, checkpoint)
    assert main(["export", "--checkpoint", str(checkpoint), "--img-size", "16", "--dynamic-batch",
                 "-o", str(tmp_path / "m.onnx")]) == 0
    out = tmp_path / "r.json"
    common = ["-b", "2", "--device", "cpu", "--num-warmup", "0", "--num-iter", "1", "--memory-iter", "0",
              "--gemm-size", "64", "--onnx", str(tmp_path / "m.onnx"), "--results-file", str(out)]
    assert main(["benchmark", *common]) == 0
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert report["model"] == "sequencer2d_nano" and report["input_size"] == [3, 16, 16]
    assert report["head_classes"] == 3
    params, gmacs = sum(p.numel() for p in model.parameters()) / 1e6, count_macs(model, (3, 16, 16)) / 1e9
    for row in rows.values():
        assert (row["params_m"], row["gmacs"]) == (pytest.approx(params), pytest.approx(gmacs))
    assert rows["ort-fp32"]["top1_agreement_vs_ours"] is None
    # with the checkpoint the file was exported from, ours holds its weights and the agreement means something
    assert main(["benchmark", "--checkpoint", str(checkpoint), "--img-size", "16", *common]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["ort-fp32"]["top1_agreement_vs_ours"] == 1.0


def test_benchmark_onnx_of_another_size_is_refused(tiny_s_checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_s_checkpoint), "--img-size", "28", "-o",
                 str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["benchmark", "--checkpoint", str(tiny_s_checkpoint), "--img-size", "56", "--device", "cpu",
                 "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "exported for 28x28 inputs, not 56x56" in err and err.count("\n") == 1


def test_benchmark_onnx_sessions_do_not_spin_while_ours_runs(tiny_s_checkpoint, tmp_path):
    """The --onnx sessions are timed interleaved with PyTorch in one process: their threads must not busy-wait
    after a run (they held a core while our OpenMP threads ran: 0.55x instead of 0.88x at batch 1 on 2 cores), and
    switching the spinning off changes no logit."""
    from sequencer.tools.onnx_runtime import OnnxModel

    path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_s_checkpoint), "--img-size", "28", "--dynamic-batch",
                 "-o", str(path)]) == 0
    settings = benchmark.BenchmarkSettings(checkpoint=str(tiny_s_checkpoint), onnx=[str(path)])
    (impl, timed), = benchmark.load_onnx_impls(settings).items()
    spinning = OnnxModel(path)
    entry = "session.intra_op.allow_spinning"
    assert impl == "ort-fp32" and timed.session.get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # users' sessions keep the default
        spinning.session.get_session_options().get_session_config_entry(entry)
    x = torch.randn(3, 3, 28, 28)
    model = create_model("sequencer2d_s", **TINY_S).eval()
    model.load_state_dict(torch.load(tiny_s_checkpoint, weights_only=True)["state_dict"])
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(timed(x), spinning(x))
    assert ((timed(x) - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_benchmark_header_and_results_name_the_cpu_and_isa(tmp_path, capsys, monkeypatch):
    """Figures mean little without the CPU they were measured on: the header and the JSON name it and its ISA."""
    from sequencer import hardware

    monkeypatch.setenv("SEQUENCER_CPU_FLAGS", "avx2 fma avx512f avx512bw avx512vl avx512_vnni")  # as hardware reads it
    hardware.cpu_info.cache_clear()
    try:
        info = hardware.cpu_info()
        out = tmp_path / "r.json"
        assert main(["benchmark", "--model", "sequencer2d_nano", "-b", "1", "--img-size", "16", "--mode", "infer",
                     "--num-warmup", "0", "--num-iter", "1", "--memory-iter", "0", "--gemm-size", "64",
                     "--device", "cpu", "--results-file", str(out)]) == 0
    finally:
        hardware.cpu_info.cache_clear()
    header = capsys.readouterr().out.splitlines()[1]
    assert header == f"CPU {info.model} [AVX2, AVX-512, AVX512-VNNI; class avx512-vnni]"
    report = json.loads(out.read_text())
    assert (report["cpu"], report["cpu_isa"], report["cpu_class"]) == (info.model, info.matrix_isa, "avx512-vnni")
    assert report["cpu_description"] == info.describe() and report["device_name"] == info.model


def test_loader_benchmark_interrupted_in_a_round_leaves_no_worker_processes(tmp_path, monkeypatch):
    """Ctrl-C in a round of ``run_loader_benchmark``: ours and timm's loaders' workers end, though the kept exception's
    traceback still holds the loaders."""
    import multiprocessing

    from sequencer.tools import loader_benchmark
    _image_folder(tmp_path / "data")
    timed_round, rounds = loader_benchmark._round, []

    def interrupted_round(loader, batches, device):
        rounds.append(timed_round(loader, batches, device))
        if len(rounds) == 2:  # both loaders have started their workers
            raise KeyboardInterrupt

    monkeypatch.setattr(loader_benchmark, "_round", interrupted_round)
    before = set(multiprocessing.active_children())
    settings = benchmark.BenchmarkSettings(data=str(tmp_path / "data"), compare_timm=True, batch_size=2, workers=1,
                                           num_iter=1, rounds=2, device="cpu")
    with pytest.raises(KeyboardInterrupt) as raised:
        loader_benchmark.run_loader_benchmark(settings, torch.device("cpu"), 16)
    assert raised.value.__traceback__ is not None and len(rounds) == 2
    assert set(multiprocessing.active_children()) == before
