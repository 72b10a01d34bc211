"""``sequencer benchmark --backbone``: a detection backbone's images/s, peak memory and GMACs at detection sizes.

Rows, all timed interleaved in one process (:func:`sequencer.tools.benchmark.time_interleaved`, so machine noise hits
them alike and their ratios hold on a loaded machine better than their absolute numbers):

* ``backbone``: ``create_backbone(--model)``, the trunk and its stride 4-32 pyramid (what a detector runs);
* ``trunk``: ``create_model(--model, features_only=True)``, the trunk's stage maps without the pyramid (on the
  input as given: its strided stem drops a remainder the backbone pads instead, 512 -> 504 px against 518 px);
* ``ref-<name>``: timm's ``--reference-model`` (default ``convnext_tiny``) with ``features_only=True``;
* ``ref-<name>-fpn``: the same under torchvision's ``FeaturePyramidNetwork`` to 256 channels with its stride-64
  max-pool level (``BackboneWithFPN``'s neck), the like-for-like partner of ``backbone``;
* with ``--torchcompile``, a ``-compiled`` twin of each.

Weights are freshly initialised (speed and memory do not depend on them). Inference is a forward; training is a
forward, the sum of the maps' mean squares as a stand-in loss, a backward and an AdamW step. GMACs per image are
:func:`sequencer.models.flops.count_macs`'s (convolution, linear and recurrent multiply-adds; ConvNeXt counted the
same way). Peak memory is measured as the classification benchmark measures it (a fresh process per row on CPU).
"""
from __future__ import annotations

import copy
import os
import statistics
from dataclasses import replace

import torch
from torch import nn

from ..engine.amp import autocast_dtype, dtype_name
from ..engine.guest import caller_state_kept, cpu_default_device, float32_default
from ..engine.inference import resolve_device
from ..errors import SequencerError
from ..hardware import cpu_info
from ..models.flops import count_macs
from .benchmark import BenchmarkSettings, gemm_rate, time_interleaved
# the rows' models and steps, and the memory probe, live with the classification benchmark's: the probe's fresh
# process imports that light module, not this one (which imports the engine's inference and its data pipeline)
from .benchmark_steps import backbone_memory_probe, build_row_model, compiled_if_named, make_step
from .peak_memory import measure_peak_memory

DEFAULT_REFERENCE = "convnext_tiny"
DEFAULT_IMG_SIZE = 512


def _own(model: nn.Module, mode: str) -> nn.Module:
    return copy.deepcopy(model) if mode == "train" else model


@caller_state_kept()  # it seeds and draws its models and inputs, and compiles twins: the caller's state is given back
@float32_default()  # its rows are float32 (or autocast over float32) also under the caller's float64 default dtype
@cpu_default_device()  # its models and inputs are made where its `device` says, whatever the caller's default device
def run_backbone_benchmark(args: BenchmarkSettings) -> dict:
    """Every row in every mode of ``args`` (see the module docstring) -> a JSON-ready report."""
    if not args.model:
        raise SequencerError("`backbone` needs `model` (the Sequencer to build the backbone from)")
    unused = [name for name, value in (("`checkpoint`", args.checkpoint), ("`pretrained`", args.pretrained),
                                       ("`num_classes`", args.num_classes), ("`input_size`", args.input_size),
                                       ("`compare_timm`", args.compare_timm), ("`optimized`", args.optimized),
                                       ("`onnx`", args.onnx), ("`data`", args.data)) if value]
    if unused:
        raise SequencerError(f"`backbone` does not take {', '.join(unused)} (it times freshly initialised "
                             f"backbones at `img_size`)")
    if args.num_warmup < 0 or args.memory_iter < 0:
        raise SequencerError("`num_warmup` and `memory_iter` must be >= 0")
    device = resolve_device(args.device)
    # the one precision rule (float16 off CUDA runs bfloat16, bf16 without native kernels float32, with a note);
    # the report names the dtype that ran
    amp = autocast_dtype(args.amp_dtype, device) or torch.float32
    args = replace(args, amp_dtype=dtype_name(amp))
    reference = args.reference_model or DEFAULT_REFERENCE
    size = args.img_size or DEFAULT_IMG_SIZE
    impls = ["backbone", "trunk", f"ref-{reference}", f"ref-{reference}-fpn"]
    if args.torchcompile:
        impls += [f"{impl}-compiled" for impl in impls]
    torch.manual_seed(args.seed)
    models = {impl: build_row_model(impl.removesuffix("-compiled"), args.model, reference).to(device)
              for impl in impls if not impl.endswith("-compiled")}
    figures = {impl: dict(params_m=sum(p.numel() for p in m.parameters()) / 1e6,
                          gmacs=count_macs(m, (3, size, size)) / 1e9) for impl, m in models.items()}
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    rate = gemm_rate(amp, device, args.gemm_size)  # GFLOP/s: what "GEMM %" is a fraction of
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    results = []
    for mode in modes:
        # training: each row updates its own copy of the weights
        steps = {impl: make_step(compiled_if_named(_own(models[impl.removesuffix("-compiled")], mode), impl), x,
                                 mode, amp, device) for impl in impls}
        times = time_interleaved(steps, device, args.num_warmup, args.num_iter)
        ours_ms = statistics.median(times["backbone"])
        for impl, ts in times.items():
            step_s = statistics.median(ts)
            row = dict(impl=impl, mode=mode, dtype=args.amp_dtype, batch_size=args.batch_size, img_size=size,
                       img_per_s=args.batch_size / step_s, step_ms=step_s * 1e3,
                       step_ms_all=[round(t * 1e3, 2) for t in ts], speed_vs_backbone=ours_ms / step_s,
                       **figures[impl.removesuffix("-compiled")], peak_memory_mb=None)
            # every multiply-add of the forward (three times that for forward + backward) at the GEMM rate = 100%
            row["gemm_fraction"] = 2 * row["gmacs"] * (3 if mode == "train" else 1) * row["img_per_s"] / rate
            if args.memory_iter:
                spec = dict(impl=impl, name=args.model, reference=reference, mode=mode, dtype=args.amp_dtype,
                            batch_size=args.batch_size, img_size=size, device=device.type, iters=args.memory_iter)
                row["peak_memory_mb"] = measure_peak_memory(spec, backbone_memory_probe)
            results.append(row)
    cpu = cpu_info()
    return dict(model=args.model, reference=reference, input_size=[3, size, size], batch_size=args.batch_size,
                amp_dtype=args.amp_dtype, device=device.type,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu.model,
                cpu_description=cpu.describe(), threads=torch.get_num_threads(),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None, torch=torch.__version__,
                gemm_gflops=rate, num_iter=args.num_iter, num_warmup=args.num_warmup, results=results)


def format_backbone_results(report: dict) -> str:
    lines = [f"backbones at {report['input_size'][-1]} px, batch {report['batch_size']}, {report['amp_dtype']}, on "
             f"{report['device_name']} ({report['threads']} threads); ratios: this run, interleaved; GEMM rate "
             f"{report['gemm_gflops']:.0f} GFLOP/s",
             f"{'impl':<26} {'mode':<6} {'img/s':>8} {'step ms':>9} {'vs backbone':>11} {'peak MiB':>9} "
             f"{'GMACs/img':>9} {'params M':>8} {'GEMM %':>6}"]
    for r in report["results"]:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"{r['impl']:<26} {r['mode']:<6} {r['img_per_s']:>8.2f} {r['step_ms']:>9.1f} "
                     f"{r['speed_vs_backbone']:>10.2f}x {peak:>9} {r['gmacs']:>9.3g} {r['params_m']:>8.2f} "
                     f"{100 * r['gemm_fraction']:>6.1f}")
    return "\n".join(lines)
