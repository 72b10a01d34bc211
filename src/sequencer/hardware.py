"""What this CPU can do for matrix work: the one place the project asks.

Kernel choice (bf16, int8, the fast inference path), the int8 export's settings, `sequencer env` and benchmark
headers all depend on the same few facts, read once from the OS (``/proc/cpuinfo`` on Linux) with torch's own
answer as a fallback elsewhere.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

# The CPU classes the project distinguishes, best last. Each one includes what the ones before it have:
#   avx2         AVX2/FMA only: no bf16 matmul kernels in oneDNN, int8 needs onnxruntime's 7-bit range;
#   avx512       AVX-512 without VNNI (Skylake-SP): int8 still needs the 7-bit range;
#   avx512-vnni  AVX-512 with VNNI (Cascade Lake, Ice Lake): int8 dot products in hardware, full 8-bit range;
#   avx512-bf16  AVX-512 with VNNI and BF16 (Cooper Lake, AMD Zen 4/5): native bf16 matmuls;
#   amx          AMX tiles for bf16 and int8 (Sapphire Rapids and later).
CPU_CLASSES = ("baseline", "avx2", "avx512", "avx512-vnni", "avx512-bf16", "amx")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name and the instruction-set extensions that matter for matrix work."""

    model: str
    flags: frozenset

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags and "fma" in self.flags

    @property
    def avx512(self) -> bool:
        return {"avx512f", "avx512bw", "avx512vl"} <= self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot-product instructions (AVX512-VNNI, or AVX-VNNI on AVX2-only cores that have it)."""
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.flags

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def cpu_class(self) -> str:
        """The best of `CPU_CLASSES` this CPU has."""
        if self.amx:
            return "amx"
        if self.avx512_bf16 and "avx512_vnni" in self.flags:
            return "avx512-bf16"
        if self.avx512 and "avx512_vnni" in self.flags:
            return "avx512-vnni"
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "baseline"

    @property
    def matrix_isa(self) -> str:
        """The matrix-relevant extensions in words, e.g. 'AVX-512, AVX512-BF16, AVX512-VNNI'."""
        names = [("AVX2", self.avx2), ("AVX-512", self.avx512), ("AVX512-BF16", self.avx512_bf16),
                 ("AVX512-VNNI", "avx512_vnni" in self.flags), ("AVX-VNNI", "avx_vnni" in self.flags),
                 ("AMX-BF16", "amx_bf16" in self.flags), ("AMX-INT8", "amx_int8" in self.flags)]
        return ", ".join(name for name, present in names if present) or "none of AVX2/AVX-512/AMX"

    def describe(self) -> str:
        """One line naming the CPU and its matrix ISA, as benchmark headers and bug reports print it."""
        return f"{self.model} [{self.matrix_isa}; class {self.cpu_class}]"


def _read_proc_cpuinfo() -> tuple[str, frozenset] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return (model, flags) if flags else None


def _flags_from_torch() -> frozenset:
    """A coarse answer where the OS gives none (macOS, Windows): torch's dispatch level and oneDNN's bf16 check."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # 'DEFAULT', 'AVX2', 'AVX512', ...
    flags = set()
    if capability in ("AVX2", "AVX512"):
        flags |= {"avx2", "fma"}
    if capability == "AVX512":
        flags |= {"avx512f", "avx512bw", "avx512vl"}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        flags |= {"avx512_bf16", "avx512_vnni"}
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU. ``SEQUENCER_CPU_FLAGS`` (space-separated) overrides the flags, for tests and what-ifs."""
    found = _read_proc_cpuinfo()
    model, flags = found if found else (platform.processor() or platform.machine(), _flags_from_torch())
    override = os.environ.get("SEQUENCER_CPU_FLAGS")
    if override is not None:
        flags = frozenset(override.split())
    return CpuInfo(model=model or "unknown CPU", flags=flags)
