"""`sequencer benchmark`: throughput, step time, peak memory, parameters, GMACs and GEMM-rate fraction.

Every implementation measured in one run (ours eager, ``--optimized``, and timm's ``Sequencer2d`` with
``--compare-timm``) runs in this process with the same weights, timed *interleaved*: each iteration runs every
implementation once, in alternating order, and the median per implementation is reported. On a shared machine
this keeps the ratios honest even when the absolute numbers move with the load.

Peak memory: :mod:`.peak_memory` (what one more step of the work allocates, each implementation measured the
same way; on CPU in a fresh subprocess).

Logits are compared with timm's on the same input; a freshly initialised model's zero head is first given small
random weights (shared with timm), otherwise every logit would be 0 and the comparison vacuous.

GEMM rate: a square matrix product of ``--gemm-size`` in the benchmark's dtype, timed in the same run; on CPU the
faster of PyTorch's default (MKL for fp32) and oneDNN is taken as the machine's rate. The fraction reached is
``2 * MACs * images/s / rate`` (training counts 3x the forward MACs: forward, input and weight gradients), for the
rows that ran in that dtype: an ``--onnx`` file's row names its own precision (float32, int8) and has no GEMM %
unless it ran in the measured dtype. A ``--reference-model`` row reports that model's own parameters and MACs.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ..engine.amp import AMP_DTYPES, autocast_dtype, dtype_name
from ..engine.guest import caller_state_kept, cpu_default_device, float32_default
from ..engine.inference import check_input_size, load_model, relative_error, resolve_device
from ..errors import SequencerError
from ..hardware import cpu_info
from ..models.kernels import onednn_bf16_supported
from .benchmark_steps import (TIMM_MODELS, build_timm_twin, compiled_if_named, make_infer_step, make_train_step,
                              memory_probe, with_lstm_backend)
from .peak_memory import measure_peak_memory

_logger = logging.getLogger(__name__)



@dataclass
class BenchmarkSettings:
    """What one benchmark run measures; the fields are ``sequencer benchmark``'s flags (``device=None``: CUDA when
    available). ``data`` switches to the data-loader benchmark (``workers``, ``rounds``)."""
    model: str | None = None
    checkpoint: str = ""
    pretrained: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    input_size: tuple[int, int, int] | None = None
    use_ema: bool | None = None
    batch_size: int = 16
    mode: str = "infer"  # infer, train or both
    amp_dtype: str = "float32"
    compare_timm: bool = False
    optimized: bool = False
    torchcompile: bool = False
    lstm_backends: list[str] = field(default_factory=list)  # each adds a row ours-<backend>
    reference_model: str = ""
    device: str | None = None
    num_warmup: int = 2
    num_iter: int = 10
    memory_iter: int = 2
    gemm_size: int = 2048
    seed: int = 0
    onnx: list[str] = field(default_factory=list)
    data: str = ""
    workers: int = 2
    rounds: int = 3
    backbone: bool = False  # sequencer.tools.backbone_benchmark


@dataclass
class Result:
    # "ours" (eager), "ours-optimized", "timm", "ours-triton", "<impl>-compiled", "ref-<timm name>",
    # "ort-fp32" / "ort-fp16" / "ort-int8" (--onnx)
    impl: str
    mode: str  # "infer" or "train"
    dtype: str
    batch_size: int
    img_size: int
    img_per_s: float
    step_ms: float
    step_ms_all: list = field(default_factory=list)
    peak_memory_mb: float | None = None
    params_m: float = 0.0
    gmacs: float | None = None  # per image, forward
    achieved_gflops: float | None = None
    gemm_fraction: float | None = None
    speedup_vs_timm: float | None = None
    max_rel_diff_vs_timm: float | None = None
    top1_agreement_vs_ours: float | None = None  # inference: share of the batch whose argmax equals ours' (eager)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(dtype: torch.dtype, device: torch.device, size: int = 2048, iters: int = 5) -> float:
    """The machine's matrix-multiply rate in GFLOP/s for ``dtype``: median of ``iters`` size^3 products."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    candidates: dict[str, Callable] = {"torch.mm": lambda: torch.mm(a, b)}
    onednn_has_dtype = dtype == torch.float32 or dtype == torch.bfloat16 and onednn_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and onednn_has_dtype:
        bt = b.t()  # a linear with weight b^T is a @ b
        candidates["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    best = 0.0
    with torch.inference_mode():
        for fn in candidates.values():
            fn()
            synchronize(device)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times.append(time.perf_counter() - t0)
            best = max(best, 2 * size ** 3 / statistics.median(times) / 1e9)
    return best


def extra_impls(impls: dict[str, nn.Module], args: BenchmarkSettings, device: torch.device,
                input_size: tuple[int, int, int]) -> dict[str, nn.Module]:
    """``--lstm-backend X`` (repeatable): ours on backend X as ``ours-X`` (e.g. ``native``: cuDNN, ``triton``: the
    fused kernel, beside ``ours``, which runs ``auto``'s choice); ``--torchcompile``: a compiled twin of each eager
    implementation (named ``<impl>-compiled``); ``--reference-model``: timm's model of that name, own weights."""
    extra = {}
    for backend in dict.fromkeys(args.lstm_backends):
        extra[f"ours-{backend}"] = with_lstm_backend(impls["ours"], backend)
    if args.torchcompile:
        extra.update({f"{n}-compiled": m for n, m in {**impls, **extra}.items() if n != "ours-optimized"})
    if args.reference_model:
        ref = reference_model(args.reference_model, input_size, device)
        extra[f"ref-{args.reference_model}"] = ref
        if args.torchcompile:
            extra[f"ref-{args.reference_model}-compiled"] = ref
    return extra


def reference_model(name: str, input_size: tuple[int, int, int], device: torch.device) -> nn.Module:
    """timm's ``name`` with its own fresh weights, checked to run one image of ``input_size`` (C, H, W): an unknown
    name, or an input too small for the model, is a SequencerError naming `reference_model`, before any timing."""
    import timm

    if not timm.is_model(name):
        raise SequencerError(f"`reference_model={name}`: timm has no model of that name",
                             hint="name one of timm.list_models(), e.g. convnext_tiny")
    model = timm.create_model(name, pretrained=False).to(device)
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_size, device=device))
    except RuntimeError as error:
        raise SequencerError(f"`reference_model={name}` does not run on a {'x'.join(map(str, input_size))} input: "
                             f"{str(error).splitlines()[0]}", hint="benchmark a larger `img_size`") from None
    return model


def time_interleaved(steps: dict[str, Callable], device: torch.device, num_warmup: int,
                     num_iter: int) -> dict[str, list[float]]:
    """Seconds per call of each step; every iteration runs all steps, alternating their order."""
    for _ in range(num_warmup):
        for fn in steps.values():
            fn()
    synchronize(device)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(num_iter):
        for n in (names if i % 2 == 0 else names[::-1]):
            synchronize(device)
            t0 = time.perf_counter()
            steps[n]()
            synchronize(device)
            times[n].append(time.perf_counter() - t0)
    return times


# ---- the command -------------------------------------------------------------------------------------------------

def load_onnx_impls(args: BenchmarkSettings) -> dict[str, nn.Module]:
    """The --onnx files as ``{"ort-fp32" / "ort-fp16" / "ort-int8": OnnxModel}``; the model options default to the
    first file's."""
    from .onnx_runtime import OnnxModel

    impls = {}
    for path in args.onnx:
        # timed interleaved with PyTorch paths in this process: no busy-waiting threads left behind (ort_session)
        onnx_model = OnnxModel(path, threads=torch.get_num_threads(), spin_wait=False)
        impl = {"int8": "ort-int8", "float16": "ort-fp16"}.get(onnx_model.precision, "ort-fp32")
        impls[impl if impl not in impls else f"{impl}-{len(impls)}"] = onnx_model
    if impls and not args.model and not args.checkpoint:
        first = next(iter(impls.values()))
        args.model = first.metadata.get("arch")
        if not args.model:
            raise SequencerError(f"`onnx={args.onnx[0]!r}` names no model", hint="pass `model`")
        args.img_size = args.img_size or first.input_shape[-1]
        if isinstance(first.num_classes, int):  # the file's head, not the registry's 1000 classes
            args.num_classes = args.num_classes or first.num_classes
    if impls and not _holds_exported_weights(args):
        _logger.info(f"note: ours runs random weights (no `checkpoint`): the top-1 agreement of "
                     f"{', '.join(impls)} with ours is not measured; pass the `checkpoint` the file was exported "
                     f"from to have it")
    return impls


def files_model_kwargs(args: BenchmarkSettings, impls: dict[str, nn.Module]) -> dict | None:
    """The architecture arguments ours is built with where it is the first --onnx file's model (no `checkpoint`
    nor `pretrained`; the file's `model`): the ones the file records, so that ours, its parameters and GMACs are the
    file's model's and not the registry's defaults of its name (a run's `model_kwargs`: other layers or widths).
    None otherwise, with a note for a file that records none (an export from before they were recorded)."""
    from .onnx_runtime import metadata_json

    first = next(iter(impls.values()), None)
    if first is None or args.checkpoint or args.pretrained or first.metadata.get("arch") != args.model:
        return None
    kwargs = metadata_json(first, "model_kwargs")
    if not isinstance(kwargs, dict):
        _logger.info(f"note: {first.path.name} does not record its model's arguments (exported before they were "
                     f"recorded): ours is the registry's {args.model}, whose parameters and GMACs the rows give; "
                     f"pass the `checkpoint` the file was exported from to have the file's")
        return None
    return kwargs


def _file_figures(setup: _Setup, onnx_model) -> tuple[int, float | None]:
    """(parameters, forward MACs per image) of the model an --onnx file records (its `arch` and `model_kwargs`,
    built on the meta device), which need not be ours (a `checkpoint` of another model); ours' for a file that
    records no model arguments."""
    from ..models import create_model
    from .onnx_runtime import metadata_json

    arch, kwargs = onnx_model.metadata.get("arch"), metadata_json(onnx_model, "model_kwargs")
    if not arch or not isinstance(kwargs, dict):
        return sum(p.numel() for p in setup.model.parameters()), setup.macs
    with torch.device("meta"):
        model = create_model(arch, **kwargs).eval()
    return sum(p.numel() for p in model.parameters()), _forward_macs(model, setup.input_size)


def _holds_exported_weights(args: BenchmarkSettings) -> bool:
    """Whether ours can hold the weights an --onnx file was exported from: without a checkpoint or the released
    weights, ours is freshly initialised and its answers say nothing about the file's."""
    return bool(args.checkpoint or args.pretrained)


@dataclass
class _Setup:
    """What every implementation measured in one run shares: the model, its inputs and the machine's GEMM rate."""
    args: BenchmarkSettings
    device: torch.device
    amp: torch.dtype
    name: str
    model: nn.Module
    input_size: tuple[int, int, int]
    macs: float | None  # per image, forward
    gemm_gflops: float
    x: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # (B,) class indices
    twin: nn.Module | None  # timm's Sequencer2d with the same weights (--compare-timm)
    onnx_models: dict[str, nn.Module]  # --onnx files, {"ort-fp32" / "ort-fp16" / "ort-int8": OnnxModel}


@caller_state_kept()  # it seeds and draws its models and inputs, and compiles twins: the caller's state is given back
@float32_default()  # its rows are float32 (or autocast over float32) also under the caller's float64 default dtype
@cpu_default_device()  # its models and inputs are made where its `device` says, whatever the caller's default device
def run_benchmark(args: BenchmarkSettings) -> dict:
    """Time and measure ``args``' implementations; ``amp_dtype`` follows the one autocast rule
    (`sequencer.engine.amp.autocast_dtype`), and the report names the dtype that ran."""
    ran = autocast_dtype(args.amp_dtype, resolve_device(args.device)) or torch.float32
    args = replace(args, amp_dtype=dtype_name(ran))
    setup = _prepare(args)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    results = [r for mode in modes for r in _measure_mode(setup, mode)]
    device, cpu = setup.device, cpu_info()
    return dict(
        model=setup.name, input_size=list(setup.input_size), batch_size=args.batch_size, amp_dtype=args.amp_dtype,
        head_classes=getattr(setup.model, "num_classes", None),  # the parameter count includes this head
        device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu.model,
        # the host CPU and its matrix ISA, also for CUDA runs (it feeds the GPU)
        cpu=cpu.model, cpu_isa=cpu.matrix_isa, cpu_class=cpu.cpu_class, cpu_description=cpu.describe(),
        threads=torch.get_num_threads(), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        torch=torch.__version__, gemm_gflops=setup.gemm_gflops, num_iter=args.num_iter, num_warmup=args.num_warmup,
        results=[asdict(r) for r in results])


def _prepare(args: BenchmarkSettings) -> _Setup:
    """Check the options, load the model, count its MACs, measure the GEMM rate and draw the inputs."""
    device = resolve_device(args.device)
    amp = AMP_DTYPES[args.amp_dtype]
    if args.num_warmup < 0 or args.memory_iter < 0:
        raise SequencerError("`num_warmup` and `memory_iter` must be >= 0")
    torch.manual_seed(args.seed)
    onnx_models = load_onnx_impls(args)
    loaded = load_model(args.checkpoint, model=args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                        img_size=args.img_size, input_size=args.input_size, use_ema=args.use_ema, device=device,
                        model_kwargs=files_model_kwargs(args, onnx_models))
    model, name = loaded.model, loaded.name
    arch = getattr(model, "model_name", None) or name  # the registered architecture (an hf-hub: name's too)
    if args.compare_timm and arch not in TIMM_MODELS:
        raise SequencerError(f"`compare_timm`: timm has no {arch!r}", hint=f"use one of {', '.join(TIMM_MODELS)}")
    input_size = tuple(loaded.input_size)
    check_input_size(loaded, input_size[-1], input_size[-1])
    for impl, onnx_model in onnx_models.items():
        try:
            onnx_model.check_input_size(input_size[-1], input_size[-1])
        except ValueError as e:
            raise SequencerError(f"`onnx`: {e}", hint="benchmark at the file's size (`img_size`)") from None
        if onnx_model.fixed_batch and args.batch_size % onnx_model.fixed_batch:  # its row would time filled-up batches
            raise SequencerError(f"`onnx`: {str(onnx_model.path)!r} was exported for batches of exactly "
                                 f"{onnx_model.fixed_batch}, not `batch_size={args.batch_size}`",
                                 hint="benchmark a multiple of its batch, or re-export it with `dynamic_batch`")
    macs = _forward_macs(model, input_size)
    head = getattr(getattr(model, "head", None), "fc", None)
    if isinstance(head, nn.Linear) and not head.weight.any():
        # a freshly initialised model has a zero head: every logit would be 0 and the comparison with timm vacuous
        with torch.no_grad():
            head.weight.normal_(std=0.02, generator=torch.Generator(head.weight.device).manual_seed(args.seed))
    rate = gemm_rate(amp, device, args.gemm_size)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, *input_size, generator=gen).to(device)
    num_classes = getattr(model, "num_classes", 0) or 1
    target = torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device)
    twin = build_timm_twin(model, arch).to(device).eval() if args.compare_timm else None
    return _Setup(args, device, amp, name, model, input_size, macs, rate, x, target, twin, onnx_models)


def _measure_mode(setup: _Setup, mode: str) -> list[Result]:
    """Time every implementation in ``mode`` ("infer" or "train") interleaved, and compare each with timm's."""
    args = setup.args
    steps, outputs, modules = _steps(setup, mode)
    times = time_interleaved(steps, setup.device, args.num_warmup, args.num_iter)
    results = [_result(setup, mode, impl, ts, modules[impl]) for impl, ts in times.items()]
    if mode == "infer":
        for r in results:
            if r.impl in setup.onnx_models and not _holds_exported_weights(args):
                continue
            r.top1_agreement_vs_ours = (outputs[r.impl].float().argmax(-1) == outputs["ours"].float().argmax(-1)
                                        ).double().mean().item()
    if "timm" in times:
        timm_ms = statistics.median(times["timm"])
        for r in results:
            r.speedup_vs_timm = timm_ms / (r.step_ms / 1e3)
            if mode == "infer" and not r.impl.startswith("ref-"):
                r.max_rel_diff_vs_timm = relative_error(outputs[r.impl], outputs["timm"])
    return results


def _steps(setup: _Setup, mode: str) -> tuple[dict[str, Callable], dict[str, torch.Tensor], dict[str, nn.Module]]:
    """({implementation: one step of the work}, {implementation: its logits} for inference, {implementation: its
    module})."""
    impls: dict[str, nn.Module] = {"ours": setup.model}
    if mode == "infer" and setup.args.optimized:
        from .optimize import optimize_for_inference
        impls["ours-optimized"] = optimize_for_inference(setup.model, setup.amp)
    if setup.twin is not None:
        impls["timm"] = setup.twin
    impls.update(extra_impls(impls, setup.args, setup.device, setup.input_size))
    if mode == "infer":
        impls.update(setup.onnx_models)
    steps, outputs = {}, {}
    for impl, m in impls.items():
        if mode == "infer":
            # the optimized model applies its dtype itself; eager models run under autocast
            amp = torch.float32 if impl == "ours-optimized" else setup.amp
            steps[impl] = make_infer_step(compiled_if_named(m, impl), setup.x, amp, setup.device)
            outputs[impl] = steps[impl]()
        else:
            # each implementation trains its own copy from the same weights
            m = compiled_if_named(copy.deepcopy(m), impl)
            steps[impl] = make_train_step(m, setup.x, setup.target, setup.amp, setup.device)
    return steps, outputs, impls


def _result(setup: _Setup, mode: str, impl: str, times: list[float], module: nn.Module) -> Result:
    """The figures of one implementation from its step times (and its peak memory, measured now)."""
    args = setup.args
    step_s = statistics.median(times)
    dtype, params, macs = _row_figures(setup, impl, module)
    r = Result(impl=impl, mode=mode, dtype=dtype, batch_size=args.batch_size, img_size=setup.input_size[-1],
               img_per_s=args.batch_size / step_s, step_ms=step_s * 1e3,
               step_ms_all=[round(t * 1e3, 2) for t in times], params_m=params / 1e6,
               gmacs=macs / 1e9 if macs is not None else None)
    if macs is not None and dtype == args.amp_dtype:  # the GEMM rate was measured in the run's dtype only
        r.achieved_gflops = 2 * macs * (3 if mode == "train" else 1) * r.img_per_s / 1e9
        r.gemm_fraction = r.achieved_gflops / setup.gemm_gflops
    if args.memory_iter:
        spec = dict(impl=impl, name=setup.name, model_kwargs=dict(getattr(setup.model, "model_kwargs", {})),
                    mode=mode, dtype=args.amp_dtype, batch_size=args.batch_size, input_size=setup.input_size,
                    device=setup.device.type, iters=args.memory_iter,
                    onnx=str(setup.onnx_models[impl].path) if impl in setup.onnx_models else None)
        r.peak_memory_mb = measure_peak_memory(spec, memory_probe)
    return r


def _row_figures(setup: _Setup, impl: str, module: nn.Module) -> tuple[str, int, float | None]:
    """(dtype it ran in, parameters, forward MACs per image) of one row: an ONNX file runs in its own precision
    (int8, float16 or float32, whatever ``amp_dtype`` says) and counts the model it records (:func:`_file_figures`),
    and a ``ref-`` row is another model with its own counts."""
    if impl in setup.onnx_models:
        return (module.precision, *_file_figures(setup, module))
    if impl.startswith("ref-"):
        return setup.args.amp_dtype, sum(p.numel() for p in module.parameters()), \
            reference_macs(setup.args.reference_model, setup.input_size)
    return setup.args.amp_dtype, sum(p.numel() for p in setup.model.parameters()), setup.macs


def _forward_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int | None:
    """Multiply-adds of one image's forward (:func:`sequencer.models.flops.count_macs`); None where it cannot count."""
    from ..models.flops import count_macs
    try:
        return count_macs(model, input_size)
    except (RuntimeError, TypeError, ValueError):
        return None


def reference_macs(name: str, input_size: tuple[int, int, int]) -> int | None:
    """Multiply-adds of one image's forward of timm's ``name``: every matrix product (convolutions, linear layers,
    attention's batched products, recurrent layers), counted by torch's FlopCounterMode on a weightless (meta) copy,
    where an LSTM runs as matrix products the counter sees. `count_macs` hooks only Conv2d, Linear and RNN modules,
    so it would miss a transformer's attention products (ViT-Ti at 224 px: 1.08 of 1.25 GMACs); None where it
    cannot count. A model whose construction reads a tensor's value (timm 1.0.15's ViT: its drop-path rates by
    ``.item()``, which a meta tensor refuses) is built on the CPU and then moved to meta."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    try:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except (RuntimeError, NotImplementedError):
            with caller_state_kept():  # its random init draws no numbers from the caller's generators
                model = timm.create_model(name, pretrained=False).to("meta")
        model.eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_size, device="meta"))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return counter.get_total_flops() // 2
