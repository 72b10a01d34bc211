"""The CPU facts every speed and int8 decision reads."""
import pytest

from sequencer import hardware

ZEN5 = ("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx_vnni "
        "avx512_vbmi2")
SAPPHIRE_RAPIDS = ZEN5 + " amx_tile amx_bf16 amx_int8"
EPYC_AVX2 = "fpu sse2 avx avx2 fma"
SKYLAKE_SP = "fpu avx avx2 fma avx512f avx512dq avx512bw avx512vl"
CASCADE_LAKE = SKYLAKE_SP + " avx512_vnni"


@pytest.mark.parametrize("flags, cpu_class", [
    (ZEN5, "avx512-bf16"), (SAPPHIRE_RAPIDS, "amx"), (EPYC_AVX2, "avx2"), (SKYLAKE_SP, "avx512"),
    (CASCADE_LAKE, "avx512-vnni"), ("fpu sse2", "baseline"),
])
def test_cpu_class_follows_the_flags(monkeypatch, flags, cpu_class):
    monkeypatch.setenv("SEQUENCER_CPU_FLAGS", flags)
    hardware.cpu_info.cache_clear()
    try:
        info = hardware.cpu_info()
        assert info.cpu_class == cpu_class
        assert cpu_class in info.describe()
    finally:
        hardware.cpu_info.cache_clear()


def test_matrix_isa_names_each_extension(monkeypatch):
    monkeypatch.setenv("SEQUENCER_CPU_FLAGS", SAPPHIRE_RAPIDS)
    hardware.cpu_info.cache_clear()
    try:
        isa = hardware.cpu_info().matrix_isa
    finally:
        hardware.cpu_info.cache_clear()
    assert isa == "AVX2, AVX-512, AVX512-BF16, AVX512-VNNI, AVX-VNNI, AMX-BF16, AMX-INT8"
    assert hardware.CpuInfo("x", frozenset({"avx2", "fma", "avx_vnni"})).vnni  # AVX-VNNI counts for int8


def test_this_machine_is_read():
    hardware.cpu_info.cache_clear()
    info = hardware.cpu_info()
    assert info.model and info.cpu_class in hardware.CPU_CLASSES
