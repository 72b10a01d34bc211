"""What a bug report needs about this machine and its software, in one paste (`sequencer env`).

Versions of the packages that shape the numbers, how torch was built, the CPU's model and matrix ISA (from
:mod:`sequencer.hardware`, the one place the project asks), thread counts, oneDNN's bf16 support and the GPUs.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata

import torch

from ..hardware import cpu_info
from ..models.kernels import onednn_bf16_supported

# (what is printed, the distribution names that provide it, first found wins)
PACKAGES = (("sequencer-vision", ("sequencer-vision",)), ("torch", ("torch",)), ("torchvision", ("torchvision",)),
            ("timm", ("timm",)), ("onnx", ("onnx",)), ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
            ("numpy", ("numpy",)))
NOT_INSTALLED = "not installed"


def package_versions() -> dict[str, str]:
    """{package: version or 'not installed'}, from the installed metadata (onnxruntime & co. are not imported)."""
    versions = {}
    for name, distributions in PACKAGES:
        versions[name] = NOT_INSTALLED
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    versions["torch"] = torch.__version__  # with its local part: the build (e.g. +cpu, +cu130)
    return versions


def _config_line(config: str, pattern: str) -> str | None:
    found = re.search(pattern, config, flags=re.MULTILINE)
    return found.group(1).strip() if found else None


def torch_build() -> dict:
    """How this torch was built: compiler, ABI, the CUDA/cuDNN it was compiled for, MKL, oneDNN, OpenMP."""
    config = torch.__config__.show()
    return dict(
        compiler=_config_line(config, r"^\s*- (GCC [\d.]+|clang [\d.]+|MSVC \d+)"),
        cxx11_abi=bool(torch.compiled_with_cxx11_abi()),
        cuda_compiled=torch.version.cuda, cudnn_compiled=_config_line(config, r"CUDNN_VERSION=([\w.]+)"),
        mkl=torch.backends.mkl.is_available(), mkl_version=_config_line(config, r"Math Kernel Library Version ([\d.]+)"),
        onednn=torch.backends.mkldnn.is_available(), onednn_version=_config_line(config, r"MKL-DNN (v[\d.]+)"),
        openmp=torch.backends.openmp.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        debug=torch.version.debug)


def cpu_and_threads() -> dict:
    info = cpu_info()
    return dict(model=info.model, matrix_isa=info.matrix_isa, cpu_class=info.cpu_class, describe=info.describe(),
                onednn_bf16=onednn_bf16_supported(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def gpus() -> dict:
    """CUDA devices (none without a driver or GPU), and the CUDA/cuDNN versions torch runs with."""
    if not torch.cuda.is_available():
        return dict(count=0, devices=[], cuda=None, cudnn=None)
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(dict(name=props.name, capability=f"{props.major}.{props.minor}",
                            memory_gib=round(props.total_memory / 2 ** 30, 1)))
    return dict(count=len(devices), devices=devices, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())


def collect_env() -> dict:
    return dict(python=sys.version.split()[0], platform=platform.platform(), packages=package_versions(),
                torch_build=torch_build(), cpu=cpu_and_threads(), gpu=gpus())


def _yes(flag: bool, version: str | None = None) -> str:
    return ("yes" + (f" ({version})" if version else "")) if flag else "no"


def format_env(env: dict) -> str:
    """The report as aligned 'name: value' lines."""
    build, cpu, gpu = env["torch_build"], env["cpu"], env["gpu"]
    lines = [("python", f"{env['python']} on {env['platform']}")]
    lines += list(env["packages"].items())
    lines += [("torch build", f"{build['compiler'] or '?'}, cxx11 abi {build['cxx11_abi']}, "
                              f"CUDA {build['cuda_compiled'] or 'none'}, cuDNN {build['cudnn_compiled'] or 'none'}"),
              ("MKL", _yes(build["mkl"], build["mkl_version"])),
              ("oneDNN", _yes(build["onednn"], build["onednn_version"])),
              ("OpenMP", _yes(build["openmp"])),
              ("CPU", cpu["model"]),
              ("matrix ISA", f"{cpu['matrix_isa']} (class {cpu['cpu_class']}; torch dispatch "
                             f"{build['cpu_capability']})"),
              ("oneDNN bf16", _yes(cpu["onednn_bf16"])),
              ("threads", f"torch {cpu['torch_threads']} intra-op / {cpu['torch_interop_threads']} inter-op, "
                          f"{cpu['cpu_count']} logical CPUs, OMP_NUM_THREADS {cpu['omp_num_threads'] or 'unset'}")]
    if gpu["count"]:
        lines += [(f"GPU {i}", f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)")
                  for i, d in enumerate(gpu["devices"])]
        lines += [("CUDA / cuDNN", f"{gpu['cuda']} / {gpu['cudnn']}")]
    else:
        lines += [("GPU", "none (CUDA not available)")]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in lines)
