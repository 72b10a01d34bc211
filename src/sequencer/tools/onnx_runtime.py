"""An exported ONNX classifier (``sequencer export``, fp32 or int8) run under onnxruntime on CPU.

The one ONNX-runtime wrapper of the package, shared by ``export --verify``, ``validate --onnx``, ``predict --onnx``
and ``benchmark --onnx``. The file's metadata properties (written by ``sequencer export``) give the model name,
class names, input size and preprocessing, so ``load_onnx(path)`` returns the same ``LoadedModel`` a checkpoint
gives and the commands run it through their usual code.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import SequencerError, optional_import
from ..hardware import cpu_info

if TYPE_CHECKING:
    from ..engine.inference import LoadedModel

_logger = logging.getLogger(__name__)

METADATA_KEYS = ("arch", "model_kwargs", "class_names", "data_config", "input_size", "trained_size", "probabilities",
                 "data", "ignored_classes")


def ort_session(path: str | os.PathLike, threads: int | None = None, memory_arena: bool = True,
                spin_wait: bool = True):
    """A CPU onnxruntime InferenceSession for ``path``; SequencerError naming the file when it is not ONNX.

    ``spin_wait=False`` stops onnxruntime's intra-op threads from busy-waiting for work after a run. Benchmarks that
    time it against PyTorch in one process need that: the spinning threads otherwise hold CPU cores while PyTorch's
    OpenMP threads run (on 2 Zen 5 cores our batch-1 fp32 model ran at 0.55-0.56x onnxruntime beside a spinning
    session and 0.88x beside a sleeping one, onnxruntime itself no slower; BENCHMARKS.md, issue 20).
    """
    ort = optional_import("onnxruntime", f"running ONNX file {str(path)!r}", extra="export")
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # onnxruntime's own warnings are not for the user
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SequencerError(f"{str(path)!r} is not an ONNX model onnxruntime can run ({first})",
                             hint="pass a file written by `sequencer export` (sequencer.tools.export.export_onnx)"
                             ) from None


class OnnxModel(nn.Module):
    """(B, C, H, W) float32 images -> (B, num_classes) logits through onnxruntime (CPU, no parameters).

    An ``nn.Module`` so the shared evaluation and prediction loops run it unchanged; the input is moved to the CPU.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, memory_arena: bool = True,
                 spin_wait: bool = True):
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(path, threads, memory_arena, spin_wait)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = list(self.session.get_inputs()[0].shape)  # [batch or "batch", C, H, W]
        # what the graph takes: float32, or float16 for an `export --dtype float16` file (images are cast to it)
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.num_classes = self.session.get_outputs()[0].shape[-1]
        # the batch a file exported without a dynamic batch axis takes (None: any)
        self.fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.quantized = self.metadata.get("quantization", "")
        # the precision it computes in, as the benchmarks name it
        self.precision = "int8" if self.quantized else "float16" if self.input_dtype == np.float16 else "float32"

    def check_input_size(self, height: int, width: int) -> None:
        """ValueError when the file was exported for another input size."""
        expected = self.input_shape[2:]
        if all(isinstance(d, int) for d in expected) and [height, width] != expected:
            raise ValueError(f"{str(self.path)!r} was exported for {expected[0]}x{expected[1]} inputs, "
                             f"not {height}x{width}")

    def run_numpy(self, images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, num_classes) float32 logits (a float16 file's cast both ways). A file of a
        fixed export batch runs any B in chunks of that batch, the last one filled up with copies of its last image
        whose logits are dropped: the images do not interact, and repeated images leave an int8 file's dynamic
        (per-batch) activation ranges as they are."""
        fixed = self.fixed_batch
        images = images.astype(self.input_dtype, copy=False)
        if fixed is None or images.shape[0] == fixed:
            return self.session.run(None, {self.input_name: images})[0].astype(np.float32, copy=False)
        logits = []
        for start in range(0, images.shape[0], fixed):
            chunk = images[start:start + fixed]
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            logits.append(self.session.run(None, {self.input_name: filled})[0][:len(chunk)])
        return np.concatenate(logits).astype(np.float32, copy=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input_size(*images.shape[-2:])
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.run_numpy(array)).to(images.device)


def metadata_json(model: OnnxModel, key: str):
    """The JSON value of ``model``'s metadata entry ``key`` (None where it has none)."""
    try:
        return json.loads(model.metadata[key]) if key in model.metadata else None
    except ValueError:
        raise SequencerError(f"{str(model.path)!r}: ONNX metadata entry {key!r} is not valid JSON") from None


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> LoadedModel:
    """The exported model at ``path`` with its name, class names, input size and preprocessing from its metadata.

    Files without our metadata fall back to ImageNet preprocessing at the graph's input size.
    """
    # here, not at the top: a memory probe's process runs an OnnxModel and needs none of the engine's data
    # pipeline (timm, torchvision) that the engine's inference imports
    from ..engine.inference import LoadedModel

    path = Path(path)
    if not path.is_file():
        raise SequencerError(f"`onnx={str(path)!r}` does not exist or is not a file")
    model = OnnxModel(path, threads)
    data_config = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
                       interpolation="bicubic")
    data_config.update(metadata_json(model, "data_config") or {})
    input_size = metadata_json(model, "input_size") or model.input_shape[1:]
    if not all(isinstance(d, int) for d in input_size):
        raise SequencerError(f"{str(path)!r} has no fixed input size", hint="export it with `sequencer export`")
    class_names = metadata_json(model, "class_names") or None
    if class_names is None and model.num_classes == 1000:
        from ..data.imagenet_classes import IMAGENET_CLASSES
        class_names = list(IMAGENET_CLASSES)
    name = model.metadata.get("arch") or path.stem
    # the class names stand in for a checkpoint's, so validate maps a dataset's class folders onto them; the record of
    # the data its run trained on too, so validate evaluates that data and leaves out what the checkpoint's path does
    record = {"class_names": class_names} if class_names else {}
    record.update({key: value for key in ("data", "ignored_classes") if (value := metadata_json(model, key))})
    trained_size = metadata_json(model, "trained_size")  # None in files written before it was recorded
    # None in an export of ours from before it was recorded; a file not written by `sequencer export`: softmax
    probabilities = model.metadata.get("probabilities") or (None if "arch" in model.metadata else "softmax")
    return LoadedModel(model, name, class_names, tuple(input_size), data_config, record or None,
                       trained_size=int(trained_size) if trained_size else None, probabilities=probabilities,
                       source=f"ONNX file {str(path)!r}")


def note_other_cpu(model: OnnxModel) -> None:
    """A logged warning when an int8 file was quantised for another CPU class than this one's."""
    made_for = (metadata_json(model, "int8_settings") or {}).get("cpu_class")
    here = cpu_info().cpu_class
    if made_for and made_for != here:
        _logger.warning(f"note: {model.path.name} was quantised for {made_for} CPUs, this one is {here}; re-export "
                       f"here (`quantize=int8`, or `target_cpu={here}`) for its int8 settings")
