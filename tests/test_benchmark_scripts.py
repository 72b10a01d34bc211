"""The benchmark scripts of ``benchmarks/`` run as a user runs them (a subprocess, on a tiny model) and write what
BENCHMARKS.md quotes; what they measure is not asserted here (speed is never a unit test)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_deployment_script_writes_every_path_and_both_extra_lines(tmp_path, monkeypatch, capsys):
    """The script as a user runs it (a subprocess); then ``--render-only`` on its JSON, in this process (the same
    ``main``, without paying torch's import a second time). A 256-wide GEMM probe: its rate is not asserted, and
    the default 2048 took ~40% of the test's time."""
    results = tmp_path / "deployment.json"
    cmd = [sys.executable, "benchmarks/deployment.py", "--models", "sequencer2d_nano", "--threads", "1",
           "--batches", "1", "2", "--num-iter", "1", "--memory-iter", "0", "--agreement-images", "4",
           "--gemm-size", "256", "--train-batch", "2", "--train-iter", "1", "--trained-epochs", "1",
           "--results", str(results)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = json.loads(results.read_text())
    assert report["gemm_gflops"]["float32"] > 0
    assert list(report["rows"]) == ["ours-fp32", "ours-fp32-1stream", "ours-bf16", "ours-fast", "ort-fp32",
                                    "ort-int8"]
    for impl, row in report["rows"].items():
        assert row["img_per_s_b1"] > 0 and row["img_per_s_b2"] > 0, impl
        if row["dtype"] == "float32":  # fp32 paths: the eager model's logits (the script itself refuses 1e-4)
            assert row["logit_err_b2"] < 1e-4, impl
    training = report["training"]
    assert training["batch"] == 2 and training["img_per_s_float32"] > 0 and training["img_per_s_bfloat16"] > 0
    trained = report["trained_agreement"]
    assert trained["images"] == 1797 and 0 <= trained["agreement"] <= 1  # bf16 rounding differs by CPU
    assert trained["flips"] == len(trained["flip_margins"]) == round((1 - trained["agreement"]) * 1797)
    table = proc.stdout[proc.stdout.index("| path |"):]
    assert "| img/s b2 | vs ORT fp32 b2 |" in table and "| ours-fp32-1stream |" in table
    assert "Training (AdamW, batch 2)" in table and "on a digits nano trained 1 epochs" in table
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its sibling int8_settings, as the script's own path
    monkeypatch.setattr(sys, "argv", ["deployment.py", "--render-only", "--results", str(results)])
    capsys.readouterr()
    load_script("deployment").main()
    rendered = capsys.readouterr().out
    assert rendered.strip() and rendered.strip() in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refuses only without CUDA")
def test_gpu_lstm_script_refuses_in_one_line_without_cuda(tmp_path):
    """benchmarks/gpu_lstm.py times only on a GPU: without one it says so in one line and writes nothing."""
    out = tmp_path / "gpu_lstm.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_lstm.py", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "gpu_lstm.py times the LSTM on a CUDA GPU, and this machine has none"
    assert not out.exists()


def load_script(name: str):
    """``benchmarks/NAME.py`` as a module (the folder is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_gpu_lstm():
    return load_script("gpu_lstm")


def test_gpu_session_steps_parse_their_command_lines(tmp_path):
    """Every step of benchmarks/gpu_session.sh, all stages, as the script would run it (GPU_SESSION_DRY_RUN=1 logs
    the commands without running them): its test files exist, and ``sequencer benchmark`` and gpu_lstm.py accept
    its flags. A GPU lease is minutes, once: a step that dies on its own command line wastes its share."""
    from sequencer import cli

    stages = ["tests", "mixer", "model", "profile", "compiled", "sweep", "reference"]
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tmp_path), *stages], cwd=REPO, text=True,
                          env=dict(os.environ, GPU_SESSION_DRY_RUN="1", PYTHON="python3"), capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = dict(line[4:].split(": ", 1) for line in (tmp_path / "session.log").read_text().splitlines())
    assert list(steps) == ["device", "kernel-tests", "cuda-tests", "gpu-lstm", "model-infer", "model-train",
                           "gpu-profile", "compiled-infer", "compiled-train", "sweep", "reference-mixer",
                           "reference-profile-train", "reference-profile-infer"]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary[1:]] == list(steps)
    gpu_lstm = load_gpu_lstm()
    for name, command in steps.items():
        python, *argv = command.split()
        assert python == "python3", name
        if argv == ["-"]:  # the device probe, its code on stdin
            assert name == "device"
        elif argv[:2] == ["-m", "pytest"]:
            assert (REPO / argv[-1]).is_file(), name
        elif argv[:2] == ["-m", "sequencer"]:
            assert cli.build_parser(argv[2]).parse_args(argv[2:]).device == "cuda", name
        elif argv[0] == "benchmarks/gpu_lstm.py":
            gpu_lstm.build_parser().parse_args(argv[1:])
        else:  # issue 24's tools, copied in for the lease (not in the repository)
            assert argv[0].startswith(".issue-tools/gpu_"), name


def test_gpu_session_keeps_within_its_budget(tmp_path):
    """gpu_session.sh with a stand-in python (the tests pass at once, the mixer benchmark hangs) and a 13-s budget:
    the hung step is interrupted when the budget less the kill grace (10 s) is spent, its output so far stays in
    the log, the steps after it are skipped, and the summary says each step's outcome: a GPU call is cut at
    600 s, and what the script does not bring back by then is lost."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\ncase "$*" in *gpu_lstm.py*) echo "gpu_lstm started"; exec sleep 60 ;; esac\n'
                      'echo "ran: $*"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), GPU_SESSION_BUDGET="13", GPU_SESSION_MIN_STEP="1")
    env.pop("GPU_SESSION_DRY_RUN", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out)], cwd=REPO, text=True, env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = dict(line.split(None, 1) for line in (out / "summary.txt").read_text().splitlines()[1:])
    assert list(summary) == ["device", "kernel-tests", "cuda-tests", "gpu-lstm", "model-infer", "model-train",
                             "gpu-profile"]
    assert all(summary[name].startswith("ok after") for name in ("device", "kernel-tests", "cuda-tests")), summary
    # 13 s less the grace, less the second the steps before may have ticked over (bash counts whole seconds)
    assert re.fullmatch(r"timed out after [2-4] s \(limit [23] s\)", summary["gpu-lstm"]), summary
    assert all(summary[name].startswith("skipped") for name in ("model-infer", "model-train", "gpu-profile"))
    log = (out / "session.log").read_text()
    assert "ran: -m pytest -v -p no:cacheprovider tests/engine/test_cuda.py" in log and "gpu_lstm started" in log
    assert summary["gpu-lstm"] in proc.stdout  # also in the call's own output


def test_gpu_lstm_table_shows_times_and_crashes():
    """The markdown table of a GPU run's JSON: a timed row with its speed-up, and a crashed case with its error."""
    gpu_lstm = load_gpu_lstm()
    shape = dict(batch=128, grid=16, dim=384, hidden=96, mode="train")
    report = dict(device="GPU", torch="2", triton="3", cudnn=9, iters=20, rounds=5, rows=[
        dict(case="s2-train", dtype="bf16", native_ms=8.0, triton_ms=4.0, triton_speedup=2.0, rel_diff=1e-3,
             triton_kernel="fwd held N32 B128 w8 s3", **shape),
        dict(case="s2-train", dtype="fp32", error="OutOfResources: out of resource: shared memory",
             triton_kernel="fwd tiled N32 B32 w4 s1", **shape)])
    table = gpu_lstm.render(report).splitlines()
    assert table[0].startswith("BiLSTM2D mixer on GPU") and "median of 5 interleaved rounds of 20 steps" in table[0]
    assert table[4] == ("| s2-train | 128, 16x16, 384, 96 | bf16 | 8.00 | 4.00 | 2.00x | 1.0e-03 | "
                        "fwd held N32 B128 w8 s3 |")
    assert "**OutOfResources: out of resource: shared memory**" in table[5]


def test_gpu_lstm_sweep_forces_each_variant_where_it_fits():
    """``--sweep``'s variants reach the Triton launcher as asked (kernel, BLOCK_N, warps; the first pipeline depth
    that fits), one that cannot fit the chip is refused, and the launcher is itself again afterwards."""
    import torch

    from sequencer.models.kernels import triton_lstm_config

    gpu_lstm = load_gpu_lstm()
    h100 = ((9, 0), 232448)
    with gpu_lstm.forced_variant("held", 64, 4):
        config = triton_lstm_config.choose("bwd", 4096, 96, torch.bfloat16, *h100)
        assert (config.kernel, config.block_n, config.num_warps) == ("held", 64, 4)
        deeper = dataclasses.replace(config, num_stages=config.num_stages + 1)
        assert triton_lstm_config.shared_memory(config, "bwd") <= h100[1] < triton_lstm_config.shared_memory(
            deeper, "bwd")
        with pytest.raises(gpu_lstm.DoesNotFit, match="held N64 w4 does not fit fwd at hidden 192"):
            triton_lstm_config.choose("fwd", 4096, 192, torch.bfloat16, *h100)
    with gpu_lstm.forced_variant("tiled", 16, 8):
        config = triton_lstm_config.choose("fwd", 4096, 48, torch.bfloat16, *h100)
        assert (config.kernel, config.block_n, config.num_warps, config.block) == ("tiled", 16, 8, 16)
    assert triton_lstm_config.choose("fwd", 4096, 48, torch.bfloat16, *h100).kernel == "held"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="its triton rows run on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py)")
def test_gpu_lstm_profile_lists_each_backends_costliest_kernels():
    """``--profile``'s breakdown, run on the CPU at a tiny size: a total per backend, then its costliest ops, whose
    shares are percentages of that total in decreasing order."""
    gpu_lstm = load_gpu_lstm()
    lines = gpu_lstm.kernel_breakdown("tiny", 2, 4, 8, 8, "train", "fp32", steps=1, top=3, device="cpu")
    totals = [i for i, line in enumerate(lines) if not line.startswith("  ")]
    assert [lines[i].split(":")[0] for i in totals] == ["tiny fp32 native", "tiny fp32 triton"]
    for start, end in zip(totals, totals[1:] + [len(lines)]):
        assert lines[start].endswith("ms of cpu time per step") and 1 <= end - start - 1 <= 3
        shares = [float(line.split("%")[0]) for line in lines[start + 1:end]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01


# ---------------------------------------------------------------------------------------- run_benchmarks.py
def fake_report(model: str, device: str, img_per_s: float) -> dict:
    """One ``sequencer benchmark --results-file`` JSON as run_benchmarks.py reads it (figures made up)."""
    result = dict(mode="infer", dtype="float32", batch_size=16, impl="ours", img_per_s=img_per_s, step_ms=100.0,
                  speedup_vs_timm=1.0, peak_memory_mb=None, gmacs=1.0, gemm_fraction=0.5, max_rel_diff_vs_timm=None)
    return dict(model=model, amp_dtype="float32", device=device, device_name=None, threads=2, torch="2",
                load_average=[0.1, 0.1, 0.1], gemm_gflops=100.0, results=[result])


def test_run_benchmarks_rewrites_only_its_own_parts(tmp_path):
    """BENCHMARKS.md's hand-written text before, between and after the generated parts survives byte for byte;
    the parts between the markers are replaced; a part whose markers are missing is appended at the end."""
    script = load_script("run_benchmarks")
    cpu_begin, cpu_end = script.markers("cpu")
    method_begin, method_end = script.markers("method")
    hand = {"before": "# Benchmarks\n\nA hand-written intro.  \n\n", "between": "\n\n## CPU\n\n**CPU: a note**\n\n",
            "after": "\n\n## Detection backbone\n\n| hand | table |\n|---|---|\n| 1 | 2 |\n"}
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"{hand['before']}{method_begin}\nstale method\n{method_end}{hand['between']}"
                    f"{cpu_begin}\n| stale | 1.00 |\n{cpu_end}{hand['after']}")
    script.write_markdown(path, {"cpu": ([fake_report("seqA", "cpu", 123.45)], "made by a test", "")})
    text = path.read_text()

    assert text.startswith(hand["before"] + method_begin) and "stale" not in text
    assert f"{method_end}{hand['between']}{cpu_begin}" in text
    cpu = text[text.index(cpu_begin):text.index(cpu_end)]
    assert "Made with: `made by a test`" in cpu and "| seqA | infer | float32 | 16 | ours | 123.45 |" in cpu
    gpu_begin, gpu_end = script.markers("gpu")  # no gpu markers in the file: appended after the hand-written end
    assert text.index(cpu_end) < text.index(hand["after"]) < text.index("## GPU") < text.index(gpu_begin)
    assert text[text.index(cpu_end) + len(cpu_end):].startswith(hand["after"] + "\n## GPU\n\n" + gpu_begin)
    assert "Not measured yet (no GPU was available)" in text and text.endswith(f"{gpu_end}\n")

    script.write_markdown(path, {"cpu": ([fake_report("seqA", "cpu", 99.0)], "made by a test", "")})
    again = path.read_text()  # a second run replaces the parts in place: nothing appended twice
    assert again == text.replace("123.45", "99.00") and again.count(gpu_begin) == 1


def test_run_benchmarks_refuses_unpaired_markers(tmp_path):
    script = load_script("run_benchmarks")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"hand\n{script.markers('cpu')[0]}\nno end marker\n")
    with pytest.raises(SystemExit, match="markers of 'cpu'"):
        script.write_markdown(path, {})
    assert path.read_text() == f"hand\n{script.markers('cpu')[0]}\nno end marker\n"


def test_run_benchmarks_renders_the_checked_in_results_as_benchmarks_md_shows_them(tmp_path):
    """--render-only on today's results leaves BENCHMARKS.md as it is (other scripts' JSON beside them is not read
    as a run's result); so the markers sit exactly around what the script writes."""
    output = tmp_path / "BENCHMARKS.md"
    output.write_bytes((REPO / "BENCHMARKS.md").read_bytes())
    proc = subprocess.run([sys.executable, "benchmarks/run_benchmarks.py", "--render-only", "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert output.read_bytes() == (REPO / "BENCHMARKS.md").read_bytes()



def test_data_scale_script_measures_each_size_and_deletes_its_trees(tmp_path, capsys):
    """benchmarks/data_scale.py's main at two tiny sizes: a row per size, its trees gone afterwards."""
    results = tmp_path / "data_scale.json"
    script = load_script("data_scale")
    assert script.main(["--sizes", "200", "400", "--classes", "10", "--workdir", str(tmp_path), "--results",
                        str(results)]) == 0
    rows = json.loads(results.read_text())["rows"]
    assert [r["files"] for r in rows] == [200, 400] and [r["held_out"] for r in rows] == [20, 40]
    assert all(r["train_after"] + r["held_out_after"] == r["files"] and r["dataset_bytes"] > 0 for r in rows)
    if sys.platform == "linux":  # measured in a forked child; too few files here to compare the two (page noise)
        assert all(isinstance(r[k], int) for r in rows for k in ("worker_copied_packed_bytes",
                                                                 "worker_copied_tuples_bytes"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_scale.json"]
    assert "| 400 |" in capsys.readouterr().out
