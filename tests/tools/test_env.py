"""`sequencer env`: the versions, build, CPU/ISA, threads and GPUs it reports are this machine's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import timm
import torch

from sequencer import hardware
from sequencer.tools import env as env_tool


def run_env(*args: str, **environ: str) -> str:
    """`python -m sequencer env ARGS` as a user runs it; its stdout (it must succeed and print no warnings)."""
    r = subprocess.run([sys.executable, "-m", "sequencer", "env", *args], capture_output=True, text=True,
                       env=dict(os.environ, **environ), timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_json_reports_this_machine():
    report = json.loads(run_env("--json"))
    packages = report["packages"]
    assert packages["torch"] == torch.__version__ and packages["timm"] == timm.__version__
    for name in ("sequencer-vision", "torchvision", "onnx", "onnxruntime"):
        assert packages[name] == metadata.version(name), name
    cpu, info = report["cpu"], hardware.cpu_info()
    assert (cpu["model"], cpu["matrix_isa"], cpu["cpu_class"]) == (info.model, info.matrix_isa, info.cpu_class)
    assert cpu["onednn_bf16"] == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu["cpu_count"] == os.cpu_count()
    build = report["torch_build"]
    assert build["cuda_compiled"] == torch.version.cuda and build["onednn"] == torch.backends.mkldnn.is_available()
    assert build["cxx11_abi"] == torch.compiled_with_cxx11_abi()
    assert build["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["gpu"]["count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_text_names_the_isa_that_hardware_reads():
    """The ISA line follows sequencer.hardware (here told an AVX2 + AVX-VNNI CPU), not a detector of its own."""
    lines = dict(line.split(":", 1) for line in run_env(SEQUENCER_CPU_FLAGS="avx2 fma avx_vnni",
                                                                OMP_NUM_THREADS="1").splitlines())
    lines = {k: v.strip() for k, v in lines.items()}
    assert lines["matrix ISA"].startswith("AVX2, AVX-VNNI (class avx2;")
    assert lines["CPU"] == hardware.cpu_info().model
    assert lines["torch"] == torch.__version__ and lines["timm"] == timm.__version__
    assert lines["threads"].startswith("torch 1 intra-op") and lines["threads"].endswith("OMP_NUM_THREADS 1")
    assert "GPU" in lines or "GPU 0" in lines


def test_missing_packages_say_so(monkeypatch):
    monkeypatch.setattr(env_tool, "PACKAGES", (("onnxruntime", ("no-such-distribution", "onnxruntime-none")),))
    assert env_tool.package_versions() == {"onnxruntime": "not installed", "torch": torch.__version__}
    text = env_tool.format_env(dict(env_tool.collect_env(), packages=env_tool.package_versions()))
    assert re.search(r"^onnxruntime: +not installed$", text, flags=re.MULTILINE)
