"""The one rule for the autocast dtype of training, evaluation and benchmarks (`autocast_dtype`), and the autocast
that training and evaluation run under (`autocast`)."""
from __future__ import annotations

import logging

import torch

from ..choices import AMP_DTYPE_NAMES
from ..errors import SequencerError
from ..models.kernels import native_dtype

_logger = logging.getLogger(__name__)

AMP_DTYPES = {name: getattr(torch, name) for name in AMP_DTYPE_NAMES}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """An autocast dtype as runs record it, ``AMP_DTYPES``' name ("bfloat16"), or None for none (plain float32)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def say_notes(notes: list[str]) -> None:
    """The rule's notes (`autocast_dtype`'s ``notes``) as every run and command says them: one ``note:`` line each,
    a WARNING record (train said them as ``warning:`` lines, validate and the benchmarks as ``note:`` ones)."""
    for note in notes:
        _logger.warning(f"note: {note}")


def autocast(device_type: str, dtype: torch.dtype | None):
    """The run's autocast: to ``dtype`` (``autocast_dtype``'s result), or none at all for None or float32 (a
    benchmark row's plain precision), plain float32 also inside a caller's own ``torch.autocast`` block (a library
    call keeps to its own ``amp`` setting)."""
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device_type, dtype=dtype if enabled else torch.float32, enabled=enabled)


def autocast_dtype(requested: str | torch.dtype | None, device: torch.device | str,
                   parameter: str = "amp_dtype", notes: list[str] | None = None) -> torch.dtype | None:
    """The dtype to autocast to on ``device`` for ``requested``, or None for no autocast (plain float32).

    - None, "float32" or torch.float32: no autocast.
    - "auto": float16 on CUDA, bfloat16 on any other device.
    - float16 off CUDA: bfloat16, with a logged warning (CPU autocast's float16 runs PyTorch's slow reference
      kernels; bfloat16 is the CPU's mixed precision, as timm's ``--amp`` gets on a CPU).
    - bfloat16 on a CPU without native bf16 kernels (no AVX512-BF16/AMX): no autocast, with a logged warning
      (`native_dtype`: those kernels are ~6x slower than float32).
    The result is a fixed point: passing it back in gives it again, without a warning. ``parameter`` names the
    caller's parameter in the messages. With ``notes``, the warnings are appended to it instead of logged: a run
    under DDP says them once, on rank 0, with `say_notes`. Raises SequencerError for an unknown name.
    """
    device = torch.device(device)
    if isinstance(requested, str):
        if requested == "auto":
            requested = torch.float16 if device.type == "cuda" else torch.bfloat16
        elif requested in AMP_DTYPES:
            requested = AMP_DTYPES[requested]
        else:
            raise SequencerError(f"`{parameter}={requested}`: unknown dtype",
                                 hint=f"one of auto, {', '.join(AMP_DTYPES)}")
    if requested is None or requested == torch.float32:
        return None
    if requested == torch.float16 and device.type != "cuda":
        note = f"`{parameter}=float16`: float16 autocast needs CUDA; running bfloat16 on {device.type}"
        if notes is not None:
            notes.append(note)
        else:
            say_notes([note])
        requested = torch.bfloat16
    dtype = native_dtype(requested, device, f"`{parameter}=bfloat16`", notes)
    return None if dtype == torch.float32 else dtype
