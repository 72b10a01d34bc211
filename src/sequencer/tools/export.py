"""`sequencer export`: ONNX, TorchScript, torch.export or safetensors, each verified against PyTorch before the
command succeeds.

* ONNX goes through the TorchScript-based exporter (``dynamo=False``), whose LSTM path maps ``nn.LSTM`` onto the
  ONNX ``LSTM`` op; the file is then run under onnxruntime and its logits must match PyTorch's to ``--rtol``
  (relative to the largest logit), at two batch sizes with ``--dynamic-batch``. The model config (arch,
  class names, data config) is stored in the ONNX metadata properties.
* TorchScript is a trace (``torch.jit.trace``), reloaded and checked the same way; the config rides along as the
  extra file ``config.json``.
* ``--quantize int8`` (ONNX): the verified fp32 export quantised by onnxruntime (:func:`quantize_int8`) with the
  settings of this CPU's class or ``--target-cpu`` (:func:`int8_settings`), static QDQ with ``--calibration DIR``;
  ``--verify DIR`` runs both files on DIR's images and writes the int8 file only when their top-1 agree on at least
  ``--min-agreement`` of them (agreement < min-agreement refuses). Every file is checked under a temporary name and
  renamed onto --output only then.
* An exported program (``.pt2``) is ``torch.export``'s: ATen ops only, loadable with ``torch.export.load`` and no
  ``import sequencer``, compiled ahead of time by AOTInductor where wanted; reloaded and checked the same way, the
  config in the extra file ``config.json``.
* safetensors holds the weights with arch / model_kwargs / class_names / data_config (JSON) in its metadata, so
  ``--checkpoint model.safetensors`` or ``create_model(arch, checkpoint_path=..., **model_kwargs)`` rebuilds it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.class_folders import find_images, find_split_folder
from ..data.datasets import ImageFileDataset
from ..engine.guest import caller_state_kept, cpu_default_device, float32_default
from ..engine.inference import (eval_transform, held_out_files_only, leave_out_ignored_classes, read_images,
                                relative_error, split_to_evaluate)
from ..engine.user_data import check_float32_weights
from ..errors import SequencerError, optional_import, warnings_ignored
from ..fileio import write_atomically
from ..hardware import CPU_CLASSES, cpu_info
from ..models.caller_module import caller_module_kept
from ..models.loading import save_weights
from ..versions import release
from .onnx_runtime import OnnxModel, load_onnx

_logger = logging.getLogger(__name__)

try:  # the newest opset the TorchScript-based exporter writes
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:
    MAX_OPSET = 20


def _on_the_cpu_in_eval(export):
    """``export`` runs the caller's module in eval mode on the CPU and gives it back as it was (mode, device); a
    module cast whole to another dtype is refused in one line (the exports and their checks are float32, also under
    the caller's ``torch.set_default_dtype(torch.float64)``, where their sample inputs and the safetensors check's
    rebuilt model came as float64: ATen's dtype error), on the CPU also under the caller's default device."""
    @functools.wraps(export)
    def wrapper(model: nn.Module, *args, **kwargs):
        check_float32_weights(model, export.__name__, hint="pass model.float(): the exports start from float32 weights")
        with caller_module_kept(model), float32_default(), cpu_default_device():
            return export(model.eval().cpu(), *args, **kwargs)
    return wrapper


def _check_close(name: str, actual: torch.Tensor, reference: torch.Tensor, rtol: float, path: Path) -> float:
    if actual.shape != reference.shape:
        raise SequencerError(f"{name} export {str(path)!r} gives logits of shape {tuple(actual.shape)}, "
                             f"PyTorch gives {tuple(reference.shape)}")
    err = relative_error(actual, reference)
    if not err <= rtol:  # also catches NaN
        raise SequencerError(f"{name} export {str(path)!r} does not match PyTorch: relative logit error {err:.2e} "
                             f"> {rtol:.0e}", hint="report this with the model name; try another `opset`")
    return err


@torch.no_grad()
def _worst_error(name: str, exported, model: nn.Module, inputs: list[torch.Tensor], rtol: float, path: Path) -> float:
    """The largest relative logit error of ``exported`` (a callable on an input batch) against ``model`` over
    ``inputs``; SequencerError (:func:`_check_close`) at the first batch past ``rtol``. A warning where the model
    gives every image the same logits (an untrained model's all-zero head): any graph with that head matches them."""
    worst, varied = 0.0, False
    for x in inputs:
        reference = model(x)
        worst = max(worst, _check_close(name, exported(x), reference, rtol, path))
        varied = varied or bool((reference != reference.flatten()[0]).any())
    if not varied:
        _logger.warning(f"warning: the model gives every input the same logits ({reference.flatten()[0].item():.3g}; "
                        f"an untrained model's head is all zeros): the {name} check compares those, not the layers "
                        f"before the head")
    return worst


@contextlib.contextmanager
def _quiet_export():
    """The exporters warn about things that do not apply here (legacy exporter, LSTM batch/length notes)."""
    patterns = ("legacy TorchScript-based ONNX", "The feature will be removed", "Converting a tensor to a Python",
                "Exporting a model to ONNX with a batch_size other than 1", r"`torch\.jit\.",
                "were assigned during export")
    with warnings_ignored(tuple(f".*{pattern}" for pattern in patterns), (torch.jit.TracerWarning,)):
        yield


@contextlib.contextmanager
def _onnx_exporter_settings_kept():
    """torch.onnx.export leaves its module-level settings (``GLOBALS``: opset, export type, shape inference) as its
    last export set them, which torch.onnx's symbolic helpers read outside an export too; they are put back. The
    module moved in torch 2.9; where neither place has it there is nothing to put back."""
    import importlib

    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        with contextlib.suppress(ImportError):
            settings = importlib.import_module(name).GLOBALS
            break
    else:
        yield
        return
    saved = dict(vars(settings))
    try:
        yield
    finally:
        vars(settings).update(saved)


def sample_inputs(input_size: tuple[int, int, int], batch_size: int, dynamic_batch: bool,
                  sample: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Verification inputs: the export batch, plus another batch size when the batch axis is dynamic."""
    gen = torch.Generator().manual_seed(0)
    first = sample if sample is not None else torch.randn(batch_size, *input_size, generator=gen)
    inputs = [first]
    if dynamic_batch:
        inputs.append(torch.randn(first.shape[0] + 2, *first.shape[1:], generator=gen))
    return inputs


def onnx_packages() -> tuple:
    """onnx and onnxruntime, which an ONNX export writes and checks its file with; a one-line SequencerError naming
    the ``export`` extra when either is not installed (``sequencer export`` asks before it loads a model)."""
    return (optional_import("onnx", "ONNX export", extra="export"),
            optional_import("onnxruntime", "ONNX export (its check against PyTorch)", extra="export"))


# the ONNX file's dtype -> the default --rtol of its check against the float32 model. float16: 5e-3, 5 float16 steps
# (2^-10 each) of the largest logit; measured 4.9e-4 (the tests' tiny model), 6.5e-4 (sequencer2d_nano and
# gru_sequencer2d_s, random weights, 224 px) and 7.5e-4 (sequencer2d_s) on onnxruntime's CPU provider, AMD Zen 5
ONNX_DTYPES = {torch.float32: 1e-4, torch.float16: 5e-3}


@_on_the_cpu_in_eval
def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *, batch_size: int = 1,
                dynamic_batch: bool = False, opset: int = 17, rtol: float | None = None, metadata: dict | None = None,
                sample: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> float:
    """Export ``model`` (eval, CPU) to ONNX at ``path`` and verify it under onnxruntime.

    ``dtype``: torch.float32, or torch.float16 for a graph whose weights, input, computation and logits are float16
    (exported from a float16 copy of ``model``; the caller's stays float32), checked against the float32 model.
    ``sample``: optional (B, C, H, W) input used for the check instead of random data.
    Returns the worst relative logit error; raises SequencerError when above ``rtol`` (default by ``dtype``:
    :data:`ONNX_DTYPES`).
    """
    onnx, ort = onnx_packages()
    if dtype not in ONNX_DTYPES:
        raise SequencerError(f"`dtype={dtype}`: an ONNX export is torch.float32 or torch.float16")
    rtol = ONNX_DTYPES[dtype] if rtol is None else rtol
    path = Path(path)
    inputs = sample_inputs(input_size, batch_size, dynamic_batch, sample)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    exported = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype

    def run(session, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"input": x.numpy().astype(numpy_dtype)})[0]).float()

    worst = 0.0

    def write(tmp: str) -> None:
        nonlocal worst
        with _quiet_export(), _onnx_exporter_settings_kept(), torch.no_grad():
            torch.onnx.export(exported, (inputs[0].to(dtype),), tmp, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                              do_constant_folding=True)
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        set_onnx_metadata(proto, dict(metadata or {}, dtype=str(dtype).removeprefix("torch.")))
        onnx.save(proto, tmp)
        # verified before the rename: a file that fails the check never appears at ``path``
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        worst = _worst_error("ONNX", functools.partial(run, session), model, inputs, rtol, path)

    try:
        write_atomically(path, write)
    except SequencerError:
        raise
    except Exception as e:  # exporter failures: unsupported op, opset too old, ...
        raise SequencerError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                             hint="try `opset=17` or newer") from None
    return worst


def set_onnx_metadata(proto, metadata: dict | None) -> None:
    """Store ``metadata`` as the model's metadata properties (non-string values as JSON)."""
    onnx = optional_import("onnx", "ONNX metadata", extra="export")

    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                        for k, v in (metadata or {}).items()})


@_on_the_cpu_in_eval
def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *,
                       batch_size: int = 1, dynamic_batch: bool = False, rtol: float = 1e-4,
                       metadata: dict | None = None, sample: torch.Tensor | None = None) -> float:
    """Trace ``model`` to TorchScript at ``path``, reload it and verify its logits (see :func:`export_onnx`)."""
    path = Path(path)
    inputs = sample_inputs(input_size, batch_size, dynamic_batch, sample)
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, inputs[0], check_trace=False)  # checked below
    extra = {"config.json": json.dumps(metadata or {})}
    worst = 0.0

    def write(tmp: str) -> None:
        nonlocal worst
        with _quiet_export():
            torch.jit.save(traced, tmp, _extra_files=extra)
            loaded = torch.jit.load(tmp, map_location="cpu")
        worst = _worst_error("TorchScript", loaded, model, inputs, rtol, path)  # before the rename, as for ONNX

    write_atomically(path, write)
    return worst


@_on_the_cpu_in_eval
def export_program(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *,
                   batch_size: int = 1, dynamic_batch: bool = False, rtol: float = 1e-4, metadata: dict | None = None,
                   sample: torch.Tensor | None = None) -> float:
    """``torch.export`` ``model`` to an ExportedProgram file at ``path`` (``torch.export.save``, the config as the
    extra file ``config.json``), reload it and verify its logits (see :func:`export_onnx`).

    The program holds ATen ops only (the recurrent layers as ``aten.lstm``/``gru``/``rnn_tanh``), so
    ``torch.export.load`` needs no ``import sequencer`` and AOTInductor compiles it for a C++ runtime.
    """
    path = Path(path)
    inputs = sample_inputs(input_size, batch_size, dynamic_batch, sample)
    # torch.export fixes a dynamic axis that it traces at size 1, so a dynamic batch is traced at the larger batch
    example = max(inputs, key=len) if dynamic_batch else inputs[0]
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - the exporter's own failures, as for ONNX
        raise SequencerError(f"torch.export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    _check_aten_only(program, path)
    extra = {"config.json": json.dumps(metadata or {})}
    worst = 0.0

    def write(tmp: str) -> None:
        nonlocal worst
        # as open files: torch warns about a path not ending in .pt2, such as the temporary name
        with open(tmp, "wb") as f:
            torch.export.save(program, f, extra_files=extra)
        with open(tmp, "rb") as f:
            loaded = torch.export.load(f).module()
        worst = _worst_error("ExportedProgram", loaded, model, inputs, rtol, path)  # before the rename, as for ONNX

    write_atomically(path, write)
    return worst


def _check_aten_only(program, path: Path) -> None:
    """Refuses a program that calls an op outside ATen: it would not load without the package that defines it."""
    foreign = sorted({str(node.target) for node in program.graph.nodes if node.op == "call_function"
                      and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace != "aten"})
    if foreign:
        raise SequencerError(f"the exported program for {str(path)!r} calls {', '.join(foreign)}, which "
                             f"torch.export.load cannot run without the package that defines it",
                             hint="report this with the model name; ONNX and TorchScript exports are unaffected")


@_on_the_cpu_in_eval
def export_safetensors(model: nn.Module, path: str | os.PathLike, config: dict, rtol: float = 1e-6,
                       weights: str | None = None) -> float:
    """Write the weights and model config; rebuild the model from the file alone and compare logits. ``weights``:
    "ema" or "model", which of a checkpoint's weights they are (recorded, as `sequencer checkpoint clean` does, for
    `checkpoint average` and the loaders: ``models.loading.picked_weights``)."""
    from ..models import create_model
    from ..models.loading import load_state_dict_into, model_config

    from safetensors import safe_open

    path = Path(path)
    x = torch.randn(2, model.in_chans, *(config.get("data_config", {}).get("img_size", 32),) * 2,
                    generator=torch.Generator().manual_seed(0))
    errors = []

    def write(tmp: str) -> None:
        save_weights(model.state_dict(), tmp, config, safetensors=True,
                     extra={"weights": weights} if weights else None)
        with safe_open(tmp, framework="pt") as f:  # verified before the rename, as for ONNX
            stored = {k: f.get_tensor(k) for k in f.keys()}
            stored["__metadata__"] = f.metadata() or {}
        meta = model_config(stored)
        with caller_state_kept():  # its initial weights, overwritten below, are drawn from none of the caller's draws
            rebuilt = create_model(meta["arch"], **meta.get("model_kwargs", {})).eval()
        load_state_dict_into(rebuilt, {k: v for k, v in stored.items() if k != "__metadata__"}, source=str(path))
        with torch.no_grad():
            errors.append(_worst_error("safetensors", rebuilt, model, [x], rtol, path))

    write_atomically(path, write)
    return errors[0]


# --quantize int8 settings per CPU class (see `int8_settings`; BENCHMARKS.md "int8 settings by CPU" has the numbers).
#   reduce_range: weights in a 7-bit range. Without VNNI, onnxruntime's u8s8 kernels (vpmaddubsw) add pairs of
#     int8 products into saturating int16 lanes; the 7-bit range keeps those sums from clipping. With VNNI (and AMX)
#     the products accumulate in int32 and the full 8 bits are free accuracy.
#   per_channel: one weight scale per output channel (LSTM gates and MLP rows differ in range).
#   keep_float: parts left in float: "head" (the classifier Gemm/MatMul), "stem" (the patch-embedding Conv).
#   static: with --calibration DIR, activations get fixed scales from DIR's images (QDQ MatMul/Gemm/Conv; the LSTMs
#     stay dynamic int8, onnxruntime has no static LSTM).
INT8_BY_CPU_CLASS = {
    "baseline": dict(reduce_range=True, per_channel=True, keep_float=("head", "stem")),
    "avx2": dict(reduce_range=True, per_channel=True, keep_float=("head", "stem")),
    "avx512": dict(reduce_range=True, per_channel=True, keep_float=("head", "stem")),
    "avx512-vnni": dict(reduce_range=False, per_channel=True, keep_float=("head", "stem")),
    "avx512-bf16": dict(reduce_range=False, per_channel=True, keep_float=("head", "stem")),
    "amx": dict(reduce_range=False, per_channel=True, keep_float=("head", "stem")),
}
STATIC_OPS = ("MatMul", "Gemm", "Conv")  # LayerNormalization, Add, GELU stay float; LSTM is quantised dynamically
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # onnxruntime quantises LSTM only (DynamicQuantizeLSTM): GRU and RNN stay float
# the first onnxruntime whose CPU provider runs ConvInteger (a dynamically quantised Conv) with int8 weights: 1.18.0
# to 1.23.2 refuse such a file when a session loads it (the downsampling Convs of every Sequencer2D); 1.24.4 runs it
INT8_CONV_ORT = (1, 24)


def int8_settings(target_cpu: str | None = None, static: bool = False) -> dict:
    """The --quantize int8 settings for ``target_cpu`` (a `hardware.CPU_CLASSES` name; None: this CPU's class).

    Returns dict(cpu_class, static, reduce_range, per_channel, keep_float) as stored in the file's metadata.
    """
    cpu_class = target_cpu or cpu_info().cpu_class
    if cpu_class not in CPU_CLASSES:
        raise SequencerError(f"`target_cpu={cpu_class!r}` is not a CPU class",
                             hint=f"one of {', '.join(CPU_CLASSES)}")
    return dict(cpu_class=cpu_class, static=static, **INT8_BY_CPU_CLASS[cpu_class])


def describe_int8(settings: dict, float_ops: Sequence[str] = ()) -> str:
    """One phrase for the metadata's ``quantization`` entry and the command's report; ``float_ops``: the op types
    left float besides ``keep_float`` (:func:`float_recurrent_ops`; Conv where onnxruntime has no int8 ConvInteger)."""
    kind = "static QDQ (calibrated activations)" if settings["static"] else "dynamic (activations scaled per batch)"
    weights = ("per-channel" if settings["per_channel"] else "per-tensor") + \
        (" 7-bit" if settings["reduce_range"] else " 8-bit")
    kept = ", ".join([*settings["keep_float"], *(f"{op} layers" for op in float_ops)]) or "nothing"
    return f"int8 {kind}, {weights} weights, float: {kept}; for {settings['cpu_class']} CPUs"


def float_recurrent_ops(proto) -> list[str]:
    """The recurrent op types still in float in a quantised graph (e.g. ["GRU"]): onnxruntime has int8 kernels for
    LSTM only, so a GRU or RNN ablation keeps its recurrences float32 (the matmuls around them are int8)."""
    return sorted({node.op_type for node in proto.graph.node if node.op_type in RECURRENT_OPS})


def _float_node_names(proto, keep_float) -> list[str]:
    """Names of the nodes ``keep_float`` names: "head" (the last Gemm/MatMul), "stem" (the first Conv)."""
    nodes = list(proto.graph.node)
    names = []
    if "head" in keep_float:
        names += [n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")][:1]
    if "stem" in keep_float:
        names += [n.name for n in nodes if n.op_type == "Conv"][:1]
    return names


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, metadata: dict, settings: dict,
                  calibration=None) -> list[str]:
    """int8 quantisation of an fp32 export with :func:`int8_settings`; ``calibration`` (an onnxruntime
    ``CalibrationDataReader``) is required when ``settings["static"]``. Returns the op types left float besides
    ``keep_float``, which the metadata's description names, each with a logged note: GRU and RNN layers
    (:func:`float_recurrent_ops`), and Conv where this onnxruntime has no int8 ConvInteger (dynamic only).

    Dynamic: onnxruntime's ``quantize_dynamic`` on every op it quantises (MatMuls of token mixing, MLPs and head,
    the LSTMs' input and recurrent weights, the stem Conv) except ``keep_float``. Static: ``quantize_static`` (QDQ)
    on the MatMul/Gemm/Conv nodes with activation scales from the calibration images, then the LSTMs dynamically.
    LayerNormalization, the residual adds and GELU stay float either way.
    """
    onnx = optional_import("onnx", "int8 quantisation", extra="export")
    ortq = optional_import("onnxruntime.quantization", "int8 quantisation", extra="export")

    fp32_proto = onnx.load(str(fp32_path))
    exclude = _float_node_names(fp32_proto, settings["keep_float"])
    float_convs = [] if settings["static"] else _convs_this_onnxruntime_cannot_run(fp32_proto, exclude)
    exclude += float_convs
    common = dict(per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                  weight_type=ortq.QuantType.QInt8, nodes_to_exclude=exclude)
    with _ort_quantization_quiet():
        if settings["static"]:
            # the QDQ stage in a folder of our own, gone however the second step ends (a fixed name beside
            # ``out_path`` stayed behind when it raised, and was another file's name)
            with tempfile.TemporaryDirectory(prefix=".sequencer-quantize-", dir=Path(out_path).parent) as scratch:
                staged = Path(scratch) / "qdq.onnx"
                ortq.quantize_static(str(fp32_path), str(staged), calibration, quant_format=ortq.QuantFormat.QDQ,
                                     op_types_to_quantize=list(STATIC_OPS), activation_type=ortq.QuantType.QUInt8,
                                     extra_options={"ActivationSymmetric": False}, **common)
                ortq.quantize_dynamic(str(staged), str(out_path), op_types_to_quantize=["LSTM"], **common)
        else:
            ortq.quantize_dynamic(str(fp32_path), str(out_path), **common)
    proto = onnx.load(str(out_path))
    float_recurrent = float_recurrent_ops(proto)
    if float_recurrent:
        _logger.warning(f"note: onnxruntime has no int8 {' or '.join(float_recurrent)} kernel: the model's "
                        f"{'/'.join(float_recurrent)} layers stay float32 in the int8 file (the matmuls around them "
                        f"are int8)")
    float_ops = [*float_recurrent, *(["Conv"] if float_convs else [])]
    set_onnx_metadata(proto, dict(metadata, quantization=describe_int8(settings, float_ops),
                                  int8_settings=settings))
    onnx.save(proto, str(out_path))
    return float_ops


def _convs_this_onnxruntime_cannot_run(proto, exclude: Sequence[str]) -> list[str]:
    """Names of the Conv nodes (besides ``exclude``) that dynamic quantisation would make int8 ConvIntegers, where
    this onnxruntime cannot run those (before :data:`INT8_CONV_ORT`): they stay float, with a logged note, rather
    than give a file no session of this onnxruntime loads."""
    ort = optional_import("onnxruntime", "int8 quantisation", extra="export")
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv" and n.name not in exclude]
    if release(ort.__version__) >= INT8_CONV_ORT or not convs:
        return []
    _logger.warning(f"note: onnxruntime {ort.__version__} has no int8 ConvInteger kernel (it came in "
                    f"{'.'.join(map(str, INT8_CONV_ORT))}): the model's Conv layers stay float32 in the int8 file")
    return convs


@contextlib.contextmanager
def _ort_quantization_quiet():
    """onnxruntime.quantization's notes ("consider pre-processing": shape inference adds nothing here) dropped, and
    the console handler its root-logger ``logging.warning`` calls install when the root logger has none taken away
    again; other threads' log records are untouched (raising the root logger's level would silence them too)."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.addFilter(_ort_quantization_notes)
    try:
        yield
    finally:
        root.removeFilter(_ort_quantization_notes)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def _ort_quantization_notes(record: logging.LogRecord) -> bool:
    """False for onnxruntime's own records below ERROR."""
    return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname.replace("\\", "/").split("/")


class ImageCalibration:
    """An onnxruntime ``CalibrationDataReader`` over the images under ``folder``, preprocessed as validate does
    (the fp32 file's metadata), in batches of 32, or of exactly ``fixed_batch`` for a fixed-batch export (the
    images beyond the last full batch unused)."""

    def __init__(self, fp32_path: Path, folder: str, fixed_batch: int | None = None):
        loaded = load_onnx(fp32_path)
        ok, tensors, _ = read_images(find_images([folder]), eval_transform(loaded))
        batch = fixed_batch or 32
        usable = len(tensors) - len(tensors) % batch if fixed_batch else len(tensors)
        if not usable:
            raise SequencerError(f"`calibration={folder!r}` has {len(tensors)} readable images, fewer than the "
                                 f"export batch {batch}", hint="add images or export with `dynamic_batch`")
        self.batches = iter([torch.stack(tensors[i:i + batch]).numpy() for i in range(0, usable, batch)])
        self.input_name = loaded.model.input_name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def top1_agreement(fp32_path: Path, int8_path: Path, folder: str) -> dict:
    """Run both ONNX files on the images of ``folder`` (preprocessing from the fp32 file's metadata).

    Returns dict(count, agreement, scored, fp32_top1, int8_top1): the agreement over all ``count`` readable images;
    the top-1s (fractions) over the ``scored`` ones that validate would score (:func:`_scored_images`), None
    (``scored`` 0) unless ``folder`` holds class subfolders named like the model's classes.
    """
    fp32, int8 = load_onnx(fp32_path), load_onnx(int8_path)
    files = find_images([folder])
    ok, tensors, _ = read_images(files, eval_transform(fp32))
    if not ok:
        raise SequencerError(f"`verify={folder!r}`: no readable images")
    preds = {}
    for name, loaded in (("fp32", fp32), ("int8", int8)):
        preds[name] = torch.cat([loaded.model(torch.stack(tensors[i:i + 32])).argmax(-1)
                                 for i in range(0, len(tensors), 32)])
    result = dict(count=len(ok), agreement=(preds["fp32"] == preds["int8"]).double().mean().item(), scored=0,
                  fp32_top1=None, int8_top1=None)
    names = fp32.class_names or []
    if not names or Path(folder) in {f.parent for f in ok}:  # images outside class subfolders: no labels
        return result
    scored = _scored_images(folder, fp32, ok)
    keep = torch.tensor([f in scored for f in ok])
    labels = [f.parent.name for f in ok if f in scored]
    if labels and all(label in names for label in labels):
        targets = torch.tensor([names.index(label) for label in labels])
        result["scored"] = len(targets)
        result["fp32_top1"] = (preds["fp32"][keep] == targets).double().mean().item()
        result["int8_top1"] = (preds["int8"][keep] == targets).double().mean().item()
    return result


def _scored_images(folder: str, loaded, files: list[Path]) -> set[Path]:
    """The ones of ``files`` (images under ``folder``, labelled by their class folders) that ``validate folder``
    would score for ``loaded``'s checkpoint: those of the split it picks (``split_to_evaluate``: the validation
    split of a folder with split folders, none when it has none); of that split only the held-out files where the
    checkpoint's run carved them from it (`val_fraction`: ``engine.inference.held_out_files_only``) and none of the
    classes its training left out (its class map: ``leave_out_ignored_classes``), each said in a note."""
    split = split_to_evaluate(loaded.checkpoint, folder, None)
    try:
        root = find_split_folder(folder, split)
    except SequencerError as e:  # validate refuses such a folder; the agreement over its images still holds
        _logger.warning(f"warning: no top-1, as validate would refuse {folder}: {e}")
        return set()
    under = [f for f in files if f.is_relative_to(root)]
    classes = sorted({f.parent.name for f in under})
    dataset = ImageFileDataset(root, [(str(f), classes.index(f.parent.name)) for f in under], classes)
    leave_out_ignored_classes(dataset, loaded)
    return {Path(path) for path, _ in held_out_files_only(dataset, loaded).samples}


@_on_the_cpu_in_eval
def export_onnx_int8(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *,
                     verify: str | None = None, min_agreement: float = 0.99, metadata: dict | None = None,
                     settings: dict | None = None, calibration: str | None = None, **onnx_kwargs) -> dict:
    """fp32 ONNX export (checked against PyTorch), int8 quantisation with ``settings`` (default: :func:`int8_settings`
    for this CPU, static when ``calibration`` names an image folder), then the accuracy check.

    With ``verify`` (an image folder) both files run on its images and the int8 file is written only when its top-1
    agrees with the fp32 file's on at least ``min_agreement`` of them, i.e. refused when agreement < min_agreement
    (SequencerError, nothing written). Returns the :func:`top1_agreement` dict (None entries without ``verify``) plus
    ``rel_error`` of the fp32 export, the ``settings`` used and ``float_ops`` (op types left float:
    :func:`quantize_int8`).
    """
    path = Path(path)
    settings = settings or int8_settings(static=calibration is not None)
    result = {"settings": settings}

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix=".sequencer-export-", dir=path.parent) as scratch:
            fp32 = Path(scratch) / "fp32.onnx"
            result["rel_error"] = export_onnx(model, fp32, input_size, metadata=metadata, **onnx_kwargs)
            reader = None
            if settings["static"]:
                fixed = None if onnx_kwargs.get("dynamic_batch") else onnx_kwargs.get("batch_size", 1)
                reader = ImageCalibration(fp32, calibration, fixed)
            result["float_ops"] = quantize_int8(fp32, tmp, metadata or {}, settings, reader)
            logits = OnnxModel(tmp).run_numpy(np.zeros((onnx_kwargs.get("batch_size", 1), *input_size), np.float32))
            if not np.isfinite(logits).all():
                raise SequencerError(f"int8 model {str(path)!r} gives non-finite logits; nothing written")
            if verify:
                result.update(top1_agreement(fp32, Path(tmp), verify))
                _check_agreement(result, min_agreement, verify)

    try:
        write_atomically(path, write)
    except SequencerError:
        raise
    except Exception as e:  # onnxruntime's quantiser on an op it cannot handle, ...
        raise SequencerError(f"int8 quantisation failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                             ) from None
    return result


def _check_agreement(result: dict, min_agreement: float, verify: str) -> None:
    if result["agreement"] < min_agreement:
        raise SequencerError(
            f"int8 model agrees with fp32 on {100 * result['agreement']:.2f}% of {result['count']} "
            f"images in {verify!r}, below `min_agreement={100 * min_agreement:g}%`; nothing written",
            hint="export fp32 (drop `quantize`), add `calibration=DIR`, or lower `min_agreement`")
