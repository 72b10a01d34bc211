"""Inference-only fast path: ``sequencer.optimize_for_inference(model, dtype)``.

What it does, and why (measured on a 2-core AVX-512/BF16 CPU, see BENCHMARKS.md):

* The eager model already runs its Linear layers on oneDNN (``sequencer.models.sequencer2d.linear``), 5-20%
  faster than MKL's fp32 GEMM on AMD CPUs, fuses the MLP's GELU into the first matmul when no gradient is
  needed, and feeds the recurrent kernels sequence-first memory without extra copies. The copy made here is put
  in eval mode with gradients off, so every Linear takes the fused inference path.
* ``dtype=torch.bfloat16`` on CPU casts the weights once (rather than on every call, as autocast does) so the
  matmuls and the oneDNN LSTM run in bf16 end to end; logits come back in float32.
* On CUDA the copy runs under ``torch.autocast`` in ``dtype`` (cuDNN LSTM, tensor-core GEMMs) with fp32 weights.

``dtype="auto"`` (and ``--fast`` of ``predict`` / ``validate``) picks by the CPU class of
:func:`sequencer.hardware.cpu_info` (measured choices in BENCHMARKS.md, "CPU deployment"):

* ``amx`` and ``avx512-bf16`` (Sapphire Rapids and later, Cooper Lake, AMD Zen 4/5): bf16 weights, native bf16
  GEMMs and LSTM (1.7-2.9x fp32 at batch 16; on a trained digits model 99.78% of 1,797 answers equal to fp32's,
  the 4 that changed all near ties);
* ``avx512-vnni``, ``avx512``, ``avx2``, ``baseline``: float32 (bf16 has no native kernels there and runs
  PyTorch's reference path at ~0.17x fp32);
* CUDA: float32 (not measured here; pass ``torch.bfloat16`` or ``torch.float16`` for autocast).

``dtype=torch.bfloat16`` on a CPU without native bf16 kernels runs float32, and ``torch.float16`` off CUDA runs
bfloat16, each with a one-line note (the library's one rule, ``sequencer.engine.amp.autocast_dtype``).

Batches of two or more images on the CPU run as *streams* (OpenVINO's word for it): the batch is cut into as many
chunks as there are intra-op threads, and each chunk runs the whole model on its own Python thread with one
intra-op thread (more where the batch is smaller than the thread count). The images are independent, so the logits
are the same; what changes is that oneDNN's LSTM no longer meets its thread team at a barrier on every one of its
14-32 time steps, which at batch 16 on 2 Zen 5 cores made fp32 6-14% and bf16 15% faster, and batch 4 fp32 ~20%
(BENCHMARKS.md, "CPU deployment"). ``streams=1`` turns it off; a single image always runs on all threads.

Not done, on purpose: merging the four LSTM directions' input projections into one GEMM. oneDNN's LSTM (and
cuDNN's) computes the input projection of all time steps as one large GEMM inside the recurrent kernel already;
taking it out is what ``lstm_backend="cpu"`` (:mod:`sequencer.models.kernels.cpu_lstm`) does, and it measured
0.78-0.89x of the fused kernel on a Zen 5 CPU (BENCHMARKS.md, "CPU recurrence").
"""
from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import nn

from ..errors import SequencerError, checked_positive_int
from ..hardware import cpu_info
from ..engine.amp import autocast_dtype
from ..engine.user_data import check_weights_hold_data
from ..models.kernels import onednn_bf16_supported

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BF16_CPU_CLASSES = ("avx512-bf16", "amx")  # CPU classes whose "auto" path is bf16: native bf16 GEMMs and LSTM
def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype ``optimize_for_inference(model, "auto")`` runs on ``device`` (see the module docstring)."""
    if device.type == "cpu" and cpu_info().cpu_class in BF16_CPU_CLASSES and onednn_bf16_supported():
        return torch.bfloat16
    return torch.float32


class _StreamPool:
    """Worker threads for one :class:`InferenceModel`'s streams (:func:`_streams_of`), made again after a fork (the
    child process has none of the parent's threads). They end when the model is freed: its pool goes with it, and
    the idle workers of a ThreadPoolExecutor that is garbage exit. (One pool shared by every model left its threads
    running in the caller's process for good.)"""

    def __init__(self):
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = None
        self._size = 0

    def submit(self, workers: int, fn, *args) -> Future:
        with self._lock:
            if self._executor is None or self._pid != os.getpid() or self._size < workers:
                if self._executor is not None and self._pid == os.getpid():
                    self._executor.shutdown(wait=False)  # a smaller pool: its idle threads exit
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sequencer-stream")
                self._pid, self._size = os.getpid(), workers
            return self._executor.submit(fn, *args)


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # InferenceModel -> its _StreamPool
_POOLS_LOCK = threading.Lock()


def _streams_of(model: nn.Module) -> _StreamPool:
    """``model``'s stream pool, made at its first streamed batch (kept beside the model, which stays picklable)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(model)
        if pool is None:
            pool = _POOLS[model] = _StreamPool()
        return pool


def _run_stream(model: nn.Module, x: torch.Tensor, threads: int) -> tuple:
    """(``model(x)`` on this worker thread with ``threads`` intra-op threads, whether it set that count here).

    The count is per thread, but ``torch.set_num_threads`` also makes it the process's default, which every thread
    that starts later takes (`InferenceModel._forward_streams` puts the default back)."""
    set_here = torch.get_num_threads() != threads
    if set_here:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        return model(x), set_here


def _concat(outputs: list):
    """The streams' outputs joined along the batch: tensors, lists / tuples of them (``features_only``), or
    mappings of them in their keys' order (``create_backbone``'s OrderedDict of pyramid levels)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return type(first)((key, torch.cat([out[key] for out in outputs])) for key in first)
    return type(first)(torch.cat(parts) for parts in zip(*outputs))


_INFERENCE_ONLY = ("is inference-only (a frozen copy, its weights maybe cast to bf16, run without autograd): "
                   "{what} the original module, and call optimize_for_inference on it again")


class InferenceModel(nn.Module):
    """A frozen, eval-mode copy of a model for fast inference, and nothing else.

    ``forward(x)``: x (B, C, H, W) in any float dtype -> the wrapped model's output (logits (B, num_classes), a
    list of feature maps for ``features_only`` models, ``create_backbone``'s OrderedDict of levels), in float32,
    with no autograd graph. ``eval()`` / ``train(False)`` work; ``train()``, ``state_dict()`` and
    ``load_state_dict()`` raise SequencerError (one line) pointing at the original module, whose weights and modes
    this copy does not follow.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, streams: int | None = None):
        super().__init__()
        streams = None if streams is None else checked_positive_int("streams", streams)
        if dtype not in SUPPORTED_DTYPES:
            raise SequencerError(f"optimize_for_inference: unsupported dtype {dtype}",
                                 hint="use torch.float32 or torch.bfloat16 (float16: CUDA only)")
        device = next(model.parameters()).device
        if dtype == torch.float16 and device.type != "cuda":
            raise SequencerError("optimize_for_inference: float16 needs a CUDA model", hint="use torch.bfloat16")
        self.dtype = dtype
        self.streams = streams
        self.device_type = device.type
        # CPU: cast the weights once. CUDA: autocast keeps fp32 master weights and picks cuDNN/tensor-core kernels.
        # A model whose weights are in another dtype (``.half()``, ``.double()``) has them cast so too.
        self.weights_dtype = dtype if device.type == "cpu" else torch.float32
        model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if any(p.dtype != self.weights_dtype for p in model.parameters() if p.is_floating_point()):
            model = model.to(self.weights_dtype)
        for module in model.modules():
            if isinstance(module, nn.RNNBase):
                module.flatten_parameters()  # a deep copy leaves cuDNN's packed weights split; re-pack once here
        self.model = model
        for attr in ("pretrained_cfg", "default_cfg", "model_name", "model_kwargs", "num_classes", "feature_info",
                     "out_channels", "strides"):  # the last two: a backbone's, which torchvision's detectors read
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))
        super().train(False)

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:  # training it would silently do nothing: its forward runs under inference_mode
            raise SequencerError("optimize_for_inference's model " + _INFERENCE_ONLY.format(what="train"))
        return super().train(False)

    def state_dict(self, *args, **kwargs):
        raise SequencerError("optimize_for_inference's model " + _INFERENCE_ONLY.format(
            what="take state_dict() from"))

    def load_state_dict(self, *args, **kwargs):
        raise SequencerError("optimize_for_inference's model " + _INFERENCE_ONLY.format(
            what="load_state_dict() into"))

    @staticmethod
    def _to_float32(out):
        if isinstance(out, torch.Tensor):
            return out.float()
        if isinstance(out, (list, tuple)):
            return type(out)(InferenceModel._to_float32(o) for o in out)
        if isinstance(out, Mapping):
            return type(out)((key, InferenceModel._to_float32(o)) for key, o in out.items())
        return out

    def stream_count(self, batch: int) -> int:
        """How many streams a batch of ``batch`` images runs as (1: the plain call on all intra-op threads)."""
        if self.device_type != "cpu":
            return 1
        wanted = torch.get_num_threads() if self.streams is None else self.streams
        return max(1, min(wanted, batch))

    def forward(self, x: torch.Tensor):
        with torch.inference_mode():
            x = x.to(self.weights_dtype)
            streams = self.stream_count(x.shape[0])
            if streams > 1:
                out = self._forward_streams(x, streams)
            elif self.dtype != self.weights_dtype:  # CUDA autocast
                with torch.autocast(self.device_type, dtype=self.dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            return self._to_float32(out)

    def _forward_streams(self, x: torch.Tensor, streams: int):
        """The batch cut into ``streams`` chunks, each run on a worker thread with its share of the intra-op
        threads; this thread waits (its own thread team stays idle, so no core is taken twice)."""
        threads = torch.get_num_threads()
        chunks = x.tensor_split(streams)
        shares = [max(1, threads // streams + (i < threads % streams)) for i in range(streams)]
        pool = _streams_of(self)
        futures = [pool.submit(streams, _run_stream, self.model, chunk, share)
                   for chunk, share in zip(chunks, shares)]
        wait(futures)  # every stream, also when one failed: none sets a thread count after the default is back
        if any(f.exception() is not None or f.result()[1] for f in futures):
            # a worker's count became the process's default: without this, a thread started after the first
            # batch (a web server's next request thread) ran on one thread, and on one stream
            torch.set_num_threads(threads)  # this thread's own count, unchanged
        return _concat([f.result()[0] for f in futures])


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | str = torch.float32,
                           streams: int | None = None) -> InferenceModel:
    """Return a fast inference-only copy of ``model`` with the same outputs; ``model`` itself is not changed.

    ``dtype``: ``torch.float32`` (logits equal to the eager model's within float rounding), ``torch.bfloat16``
    (bf16 weights and activations on CPU, bf16 autocast on CUDA; logits within ~5e-2 relative) or
    ``torch.float16``, or ``"auto"``: the fastest of these that keeps fp32's top-1 answers on this device (module
    docstring). The library's one rule for a precision a device lacks (``sequencer.engine.amp.autocast_dtype``, as
    ``--amp-dtype``): float16 off CUDA runs bfloat16, and bf16 on a CPU without native bf16 kernels runs float32,
    each with a one-line note.
    A model in another dtype (``.half()``, ``.double()``) runs in ``dtype`` too: its copy's weights are cast to it
    (on CUDA, to float32 under autocast). Works for any model of the library, including ``features_only`` ones
    and ``create_backbone``'s pyramids. ``streams``: on the CPU, how many chunks a batch runs as, each on its own
    thread (default: one per intra-op thread; 1: off; module docstring).
    """
    if not isinstance(model, nn.Module):
        raise SequencerError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise SequencerError("optimize_for_inference: the model has no parameters")
    check_weights_hold_data(model, "optimize_for_inference")
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = auto_dtype(device)
    elif isinstance(dtype, str):
        raise SequencerError(f"optimize_for_inference: dtype must be a torch.dtype or 'auto', got {dtype!r}")
    if dtype in (torch.float16, torch.bfloat16):  # the one rule (engine/amp.py): float16 off CUDA runs bfloat16,
        dtype = autocast_dtype(dtype, device, "dtype") or torch.float32  # bfloat16 without bf16 kernels float32
    return InferenceModel(model, dtype, streams)
