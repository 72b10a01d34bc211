"""Every configuration the Triton LSTM's launcher chooses at Sequencer's shapes fits the shared memory of each GPU
it may run on, compiled for that chip without one.

The launcher (:func:`triton_lstm_config.choose`) is asked as it is at run time, for each chip's compute capability
and limit; its choice is compiled by Triton for that target (``triton.compile(ASTSource(...), target=GPUTarget)``)
and ``metadata.shared`` must fit the limit and not exceed the launcher's prediction. Triton sets ``shared`` in its
LLVM IR stage (``make_llir``: the shared memory allocation pass, then the translation); the two stages after it
(PTX, then ptxas's cubin) leave it as it is, so only the H100's compilations go on to a cubin (ptxas ships with the
wheel: that the kernels assemble is checked on one target) and the other chips' stop after the LLVM IR, a third of
the CPU time less.
Sequencer's shapes: hidden 48 and 96 (stages 1-2 of every model), 192 (the 2x-hidden ablation); T (14-64) is a
run-time argument and does not change the compiled kernel; batch 1 on a 14x14 grid (14 sequences) and big
batches, which on a GPU get the same block sizes (only the interpreter shrinks BLOCK_N for few sequences).
The launcher's prediction is fitted to Triton 3.8 (the pinned one); another release is checked by putting its
package first on the path, e.g. ``pip install --target DIR triton==3.9.0`` and ``PYTHONPATH=src:DIR``: 3.6, 3.7
and 3.9 passed (2026-12-07). A failure names the Triton that compiled.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import sequencer  # noqa: E402
from sequencer.models.kernels import triton_lstm_config  # noqa: E402

# NVIDIA's shared memory per block (opt-in), written out here rather than read from the launcher's table
CHIPS = {"A100 (sm_80)": ((8, 0), 163 * 1024), "RTX 30 (sm_86)": ((8, 6), 99 * 1024),
         "RTX 40 (sm_89)": ((8, 9), 99 * 1024), "H100 (sm_90)": ((9, 0), 227 * 1024)}
TIGHTEST = "RTX 30 (sm_86)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HIDDEN = (48, 96, 192)
NUM_SEQS = (14, 256 * 32)
# the kernels' pointers in the compute dtype; the others (gates, cells, state, gate gradients) are fp32
COMPUTE_DTYPE_POINTERS = {"xp_ptr", "w_ptr", "out_ptr", "dout_ptr"}
SIZE_ARGUMENTS = {"N", "S", "T", "H", "sxb", "sxs", "sxt", "sxd"}
ASSEMBLED = (9, 0)  # the chip whose compilations go on to a cubin; the others' stop once ``shared`` is known


def skip_assembly(backend=None, stages=None, *options):
    """Triton's ``knobs.runtime.add_stages_inspection_hook``: with no arguments ``triton.compile`` asks for a suffix
    of its cache key (these compilations are cached apart from assembled ones); the backend passes itself and its
    stages, and the PTX and cubin stages, which run after the LLVM IR stage has set ``metadata["shared"]``, are
    replaced by empty ones (the kernel is never launched)."""
    if stages is None:
        return "no-assembly", "no-assembly"

    def no_ptx(src, metadata):
        metadata["name"] = "not assembled"  # PTX's stage names the kernel, which Triton's metadata needs
        return ""
    stages["ptx"] = no_ptx
    stages["cubin"] = lambda src, metadata: b""


def compiled_shared_memory(job: dict) -> int:
    """Bytes of shared memory Triton gives one block of ``job``'s configuration on its chip. Runs in the compiling
    subprocess (:func:`compile_all`)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from sequencer.models.kernels import triton_lstm_kernels

    config = triton_lstm_config.KernelConfig(**job["config"])
    kernel = getattr(triton_lstm_kernels, f"lstm_{job['direction']}_{config.kernel}")
    constexprs = config.constexprs() | ({"SAVE": job["save"]} if job["direction"] == "fwd" else {})
    # as Triton specialises a launch: tensors from torch are 16-byte aligned; an integer 1 is a constant (the gate
    # stride), and with the 224 px grids (32/16/8) every size and stride is a multiple of 16
    aligned = {name for name in kernel.arg_names if name.endswith("_ptr")}
    if job["sizes_by_16"]:
        constexprs |= {"sxg": 1} if "sxg" in kernel.arg_names else {}
        aligned |= {name for name in kernel.arg_names if name in SIZE_ARGUMENTS}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (job["dtype"] if name in COMPUTE_DTYPE_POINTERS else "fp32")
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in aligned and name not in constexprs}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    major, minor = job["capability"]
    knobs.runtime.add_stages_inspection_hook = None if tuple(job["capability"]) == ASSEMBLED else skip_assembly
    compiled = triton_compile(source, target=GPUTarget("cuda", major * 10 + minor, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.metadata.shared


def compile_all(jobs: list[dict]) -> list[int]:
    """:func:`compiled_shared_memory` of every job, in a subprocess: the suite runs Triton's CPU interpreter
    (tests/conftest.py), and a process that imported Triton with it on cannot compile (its ``triton.language``
    functions are interpreter objects)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.dirname(os.path.dirname(sequencer.__file__))  # this checkout's sources, as imported here
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), capture_output=True, text=True,
                            env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def chosen(capability, limit, dtype):
    """Every (direction, config, SAVE) the launcher picks for this chip and dtype at Sequencer's shapes."""
    picks = set()
    for hidden in HIDDEN:
        for num_seqs in NUM_SEQS:
            for direction, saves in (("fwd", (False, True)), ("bwd", (False,))):
                config = triton_lstm_config.choose(direction, num_seqs, hidden, dtype, capability, limit)
                picks.update((direction, config, save) for save in saves)
    return sorted(picks, key=repr)


@pytest.mark.slow
def test_every_chosen_configuration_fits():
    """Compiled: every chip's choices in fp32 and bf16, forward as in training (saving for backward), specialised
    as a launch at 224 px is (sizes multiples of 16); the held kernels (the ones near a limit) also as a launch with
    no size a multiple of 16 is (14x14 grids, odd hidden sizes). On the tightest chip also fp16 (which the launcher
    treats as bf16, checked on every chip, and which has bf16's element size) and inference's forward (the same
    kernel with fewer stores). 86 compilations, the H100's 18 to a cubin: 100 s of CPU time on 2 Zen 5 cores
    (140 s with every one to a cubin)."""
    jobs = []
    for chip, (capability, limit) in CHIPS.items():
        assert chosen(capability, limit, torch.float16) == chosen(capability, limit, torch.bfloat16), chip
        tightest = chip == TIGHTEST
        for dtype_name, dtype in DTYPES.items():
            jobs += [dict(chip=chip, capability=capability, limit=limit, dtype=dtype_name, direction=direction,
                          config=dataclasses.asdict(config), save=save, sizes_by_16=sizes_by_16)
                     for direction, config, save in chosen(capability, limit, dtype)
                     if tightest or (dtype_name != "fp16" and (save or direction == "bwd"))
                     for sizes_by_16 in ((True, False) if config.kernel == "held" else (True,))]
    failures = []
    sizes = compile_all(jobs)
    compiler = f"Triton {triton.__version__}"  # compile_all's subprocess imports the same package
    for job, shared in zip(jobs, sizes):
        config = triton_lstm_config.KernelConfig(**job["config"])
        where = (f"{job['chip']} {job['dtype']} {job['direction']} save={job['save']} "
                 f"sizes_by_16={job['sizes_by_16']} {config}")
        print(f"{where}: {shared}")  # shown with -s, for tuning
        if shared > job["limit"]:
            failures.append(f"{where}: {shared} bytes of shared memory ({compiler}), the chip has {job['limit']}")
        predicted = triton_lstm_config.shared_memory(config, job["direction"])
        if shared > predicted:
            failures.append(f"{where}: {shared} bytes ({compiler}), the launcher predicted {predicted}")
    assert not failures, "\n".join(failures)


def test_the_launcher_holds_the_weights_where_they_fit():
    """Not a choice that merely fits: on the big chips, half-precision hidden 96 keeps W_hh on chip, and the
    tiled kernel takes over where the held one cannot fit (hidden 192 anywhere, fp32 hidden 96)."""
    h100, a100, rtx = (CHIPS[name] for name in ("H100 (sm_90)", "A100 (sm_80)", "RTX 40 (sm_89)"))
    choose = triton_lstm_config.choose
    assert choose("fwd", 8192, 96, torch.bfloat16, *h100).kernel == "held"
    assert choose("bwd", 8192, 96, torch.bfloat16, *a100).kernel == "held"
    assert choose("fwd", 8192, 48, torch.float32, *rtx).kernel == "held"
    assert choose("fwd", 8192, 96, torch.float32, *h100).kernel == "tiled"
    assert choose("bwd", 8192, 192, torch.bfloat16, *h100).kernel == "tiled"
    assert choose("fwd", 8192, 96, torch.bfloat16, *rtx).kernel == "tiled"


if __name__ == "__main__":  # the compiling subprocess of compile_all: jobs as JSON on stdin, sizes on stdout
    from concurrent.futures import ProcessPoolExecutor

    todo = json.load(sys.stdin)
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        print(json.dumps(list(pool.map(compiled_shared_memory, todo))))
