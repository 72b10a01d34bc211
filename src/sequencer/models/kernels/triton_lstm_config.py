"""Which Triton LSTM kernel runs, with which block sizes: the choice that makes every GPU fit.

A CUDA block may use at most the chip's shared memory per block (opt-in): sm_80 (A100) 163 KB, sm_86/sm_89
(RTX 30/40) 99 KB, sm_90 (H100) 227 KB. :func:`choose` walks the candidates of :func:`candidates` (in the order
expected fastest, not yet measured: weights held on chip before weights read per step, more pipeline stages before
fewer) and takes
the first whose shared memory, as :func:`shared_memory` predicts it, fits the limit of the device that runs it. The
last candidate (the tiled kernels, a few small tiles whatever the hidden size) fits every chip.

:func:`shared_memory` is fitted to what Triton 3.8 allocates for these kernels; ``tests/models/test_triton_fits_gpus``
compiles every configuration :func:`choose` picks at Sequencer's shapes for sm_80/86/89/90, without a GPU, and
checks both the fit and that the prediction is not below the compiled size. Triton 3.6 (torch 2.11), 3.7 (torch
2.12) and 3.9 passed the same test (2026-12-07): none allocates more than 3.8 for any choice (BENCHMARKS.md lists
where they allocate less). The prediction must hold: under ``torch.compile`` inductor launches the chosen kernel
itself, and the launcher's fallback on ``OutOfResources`` (eager launches only) never sees a refusal.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton

# Shared memory per block (opt-in) by compute capability, for chips the runtime query cannot be asked about (the
# fit test compiles for them without one). Unknown chips count as the smallest.
SHARED_MEMORY_LIMITS = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}
SMALLEST_LIMIT = min(SHARED_MEMORY_LIMITS.values())

# Block sizes keyed on (chip's compute capability or "any", compute dtype class, kernel, padded hidden block):
# (BLOCK_N, num_warps). NOT YET TUNED ON A GPU: these are the values the H100 run of issue 24 used (BLOCK_N 32, 8
# warps from block 64 on) and the tiled kernels' first guess; a tuning run replaces them (see BENCHMARKS.md).
BLOCK_TABLE = {
    ("any", "half", "held", 16): (32, 4), ("any", "half", "held", 32): (32, 4),
    ("any", "half", "held", 64): (32, 8), ("any", "half", "held", 128): (32, 8),
    ("any", "fp32", "held", 16): (32, 4), ("any", "fp32", "held", 32): (32, 4),
    ("any", "fp32", "held", 64): (32, 8), ("any", "fp32", "held", 128): (32, 8),
    ("any", "half", "tiled", 16): (32, 4), ("any", "half", "tiled", 32): (32, 4), ("any", "half", "tiled", 64): (32, 4),
    ("any", "fp32", "tiled", 16): (32, 4), ("any", "fp32", "tiled", 32): (32, 4), ("any", "fp32", "tiled", 64): (32, 4),
}
PIPELINE_STAGES = (3, 2, 1)  # Triton's default first; the held backward's stages buffer every per-step load
INTERPRETER_BLOCK_N = 128  # the CPU interpreter pays per program, not per register: fewer, bigger programs


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch of a kernel pair member. ``kernel``: "held" or "tiled"; ``block``: BLOCK_H (held, hidden padded
    to a power of two) or BLOCK_K (tiled, the hidden tile); ``upcast``: fp32 matmul operands."""
    kernel: str
    block_n: int
    block: int
    upcast: bool
    precision: str
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        """The kernel's block-size arguments (SAVE is the caller's)."""
        block_name = "BLOCK_H" if self.kernel == "held" else "BLOCK_K"
        return {"BLOCK_N": self.block_n, block_name: self.block, "UPCAST": self.upcast, "PRECISION": self.precision}

    def launch_kwargs(self) -> dict:
        return {**self.constexprs(), "num_warps": self.num_warps, "num_stages": self.num_stages}


def tile_width(hidden: int) -> int:
    """The tiled kernels' BLOCK_K: the widest of 64/32/16 that divides ``hidden`` (48 -> 16, 96 -> 32, 192 -> 64),
    else 16 (the least padding; ``tl.dot`` needs 16)."""
    return next((k for k in (64, 32, 16) if hidden % k == 0), 16)


def _blocks(chip: tuple[int, int] | None, half: bool, kernel: str, block: int) -> tuple[int, int]:
    dtype_class = "half" if half else "fp32"
    return BLOCK_TABLE.get((chip, dtype_class, kernel, block), BLOCK_TABLE[("any", dtype_class, kernel, block)])


def candidates(direction: str, hidden: int, dtype: torch.dtype, chip: tuple[int, int] | None,
               interpreted: bool = False) -> list[KernelConfig]:
    """Every configuration for ``direction`` ("fwd" or "bwd") at this hidden size and compute dtype, in the order
    expected fastest. The held kernels pipeline only in backward (forward's held loop has no load worth buffering:
    its compiled size does not change with the stages)."""
    upcast = interpreted or dtype == torch.float32  # the interpreter's tl.dot is wrong on bf16 operands
    precision = "ieee" if dtype == torch.float32 else "tf32"
    half = not upcast
    block_h = max(16, triton.next_power_of_2(hidden))
    configs = []
    if block_h <= 128:  # beyond, four gate tiles of W_hh fit no chip even in half precision
        block_n, warps = _blocks(chip, half, "held", block_h)
        for stages in (PIPELINE_STAGES if direction == "bwd" else PIPELINE_STAGES[:1]):
            configs.append(KernelConfig("held", block_n, block_h, upcast, precision, warps, stages))
    block_k = tile_width(hidden)
    block_n, warps = _blocks(chip, half, "tiled", block_k)
    # one stage: the tiled kernels hand state between threads through global memory across a barrier, which
    # software pipelining (loads issued an iteration early) must not cross
    configs.append(KernelConfig("tiled", block_n, block_k, upcast, precision, warps, 1))
    if interpreted:
        configs = [dataclasses.replace(c, block_n=INTERPRETER_BLOCK_N) for c in configs]
    return configs


def shared_memory(config: KernelConfig, direction: str) -> int:
    """Bytes of shared memory a block of ``config`` needs, as Triton 3.8 compiles these kernels (3.6, 3.7 and 3.9
    allocate no more): an upper bound.
    Triton specialises each launch on its sizes (multiples of 16, a unit stride), which moves the held backward's
    allocation by up to one (BLOCK_N, BLOCK_H) fp32 tile either way; that tile is added."""
    n, b = config.block_n, config.block
    tile = n * b * 4  # one (BLOCK_N, block) fp32 tile
    if config.kernel == "tiled":
        return 4 * b * b * 4 + 2 * tile
    weights = 4 * b * b * (4 if config.upcast else 2)  # the four gate tiles of W_hh
    if direction == "fwd":
        return weights + tile  # + h, converted to the matmul's operand layout
    # backward: the gate gradients' operand conversion and the specialisation tile, plus each extra stage's
    # buffered loads (gates, c, c_prev, dL/dh: 6 fp32 tiles' worth with a half dL/dh, 7 with an fp32 one)
    if config.upcast:
        return weights + 6 * tile + 7 * (config.num_stages - 1) * tile
    return weights + 2 * tile + 6 * (config.num_stages - 1) * tile


def choose(direction: str, num_seqs: int, hidden: int, dtype: torch.dtype, chip: tuple[int, int] | None,
           limit: int, interpreted: bool = False) -> KernelConfig:
    """The first of :func:`candidates` that fits ``limit`` bytes of shared memory (the tiled kernel always does).
    Under the interpreter, few sequences get a smaller BLOCK_N (``tl.dot`` needs 16); on a GPU BLOCK_N is the
    table's, so that the configurations the fit test compiles are all there are."""
    options = candidates(direction, hidden, dtype, chip, interpreted)
    if interpreted:
        most = max(16, triton.next_power_of_2(num_seqs))
        options = [dataclasses.replace(c, block_n=min(c.block_n, most)) for c in options]
    return next((c for c in options if shared_memory(c, direction) <= limit), options[-1])


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, shared memory per block opt-in) of a CUDA device, asked once."""
    props = torch.cuda.get_device_properties(device_index)
    chip = (props.major, props.minor)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_LIMITS.get(chip, SMALLEST_LIMIT)
    return chip, limit


def choose_for(direction: str, num_seqs: int, hidden: int, dtype: torch.dtype, device: torch.device,
               interpreted: bool, limit: int | None = None) -> KernelConfig:
    """:func:`choose` for the device tensors live on, within its shared memory or ``limit`` bytes. The interpreter
    (CPU) plans for the smallest chip, so that its tests run the path an RTX card would."""
    if device.type == "cuda":
        chip, device_limit = device_limits(device.index if device.index is not None else torch.cuda.current_device())
    else:
        chip, device_limit = None, SMALLEST_LIMIT
    return choose(direction, num_seqs, hidden, dtype, chip, device_limit if limit is None else limit, interpreted)
