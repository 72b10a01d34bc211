"""`sequencer export`: ONNX, TorchScript or safetensors, each verified against PyTorch before the command succeeds.

* ONNX goes through the TorchScript-based exporter (``dynamo=False``), whose LSTM path maps ``nn.LSTM`` onto the
  ONNX ``LSTM`` op; the file is then run under onnxruntime and its logits must match PyTorch's to ``--rtol``
  (relative to the largest logit), at two batch sizes with ``--dynamic-batch``. The model config (arch,
  class names, data config) is stored in the ONNX metadata properties.
* TorchScript is a trace (``torch.jit.trace``), reloaded and checked the same way; the config rides along as the
  extra file ``config.json``.
* safetensors holds the weights with arch / model_kwargs / class_names / data_config (JSON) in its metadata, so
  ``--checkpoint model.safetensors`` or ``create_model(arch, checkpoint_path=..., **model_kwargs)`` rebuilds it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..cli_common import add_model_args, check_input_size, load_model_from_args, positive_int, relative_error
from ..errors import SequencerError
from ..fileio import write_atomically
from ..models.loading import save_weights

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript", ".jit"), "safetensors": (".safetensors",)}


def _check_close(name: str, actual: torch.Tensor, reference: torch.Tensor, rtol: float, path: Path) -> float:
    if actual.shape != reference.shape:
        raise SequencerError(f"{name} export {str(path)!r} gives logits of shape {tuple(actual.shape)}, "
                             f"PyTorch gives {tuple(reference.shape)}")
    err = relative_error(actual, reference)
    if not err <= rtol:  # also catches NaN
        raise SequencerError(f"{name} export {str(path)!r} does not match PyTorch: relative logit error {err:.2e} "
                             f"> {rtol:.0e}", hint="report this with the model name; try another --opset")
    return err


@contextlib.contextmanager
def _quiet_export():
    """The exporters warn about things that do not apply here (legacy exporter, LSTM batch/length notes)."""
    with warnings.catch_warnings():
        for pattern in ("legacy TorchScript-based ONNX", "The feature will be removed",
                        "Converting a tensor to a Python", "Exporting a model to ONNX with a batch_size other than 1",
                        r"`torch\.jit\."):
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def sample_inputs(input_size: tuple[int, int, int], batch_size: int, dynamic_batch: bool,
                  sample: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Verification inputs: the export batch, plus another batch size when the batch axis is dynamic."""
    gen = torch.Generator().manual_seed(0)
    first = sample if sample is not None else torch.randn(batch_size, *input_size, generator=gen)
    inputs = [first]
    if dynamic_batch:
        inputs.append(torch.randn(first.shape[0] + 2, *first.shape[1:], generator=gen))
    return inputs


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *, batch_size: int = 1,
                dynamic_batch: bool = False, opset: int = 17, rtol: float = 1e-4, metadata: dict | None = None,
                sample: torch.Tensor | None = None) -> float:
    """Export ``model`` (eval, CPU) to ONNX at ``path`` and verify it under onnxruntime.

    ``sample``: optional (B, C, H, W) input used for the check instead of random data.
    Returns the worst relative logit error; raises SequencerError when above ``rtol``.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = model.eval().cpu()
    inputs = sample_inputs(input_size, batch_size, dynamic_batch, sample)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None

    def write(tmp: str) -> None:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(model, (inputs[0],), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                            for k, v in (metadata or {}).items()})
        onnx.save(proto, tmp)

    try:
        write_atomically(path, write)
    except SequencerError:
        raise
    except Exception as e:  # exporter failures: unsupported op, opset too old, ...
        raise SequencerError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                             hint="try --opset 17 or newer") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            reference = model(x)
        got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
        worst = max(worst, _check_close("ONNX", got, reference, rtol, path))
    return worst


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int], *,
                       batch_size: int = 1, dynamic_batch: bool = False, rtol: float = 1e-4,
                       metadata: dict | None = None, sample: torch.Tensor | None = None) -> float:
    """Trace ``model`` to TorchScript at ``path``, reload it and verify its logits (see :func:`export_onnx`)."""
    path = Path(path)
    model = model.eval().cpu()
    inputs = sample_inputs(input_size, batch_size, dynamic_batch, sample)
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, inputs[0], check_trace=False)  # checked below
    extra = {"config.json": json.dumps(metadata or {})}
    with _quiet_export():
        write_atomically(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=extra))
        loaded = torch.jit.load(str(path), map_location="cpu")
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            worst = max(worst, _check_close("TorchScript", loaded(x), model(x), rtol, path))
    return worst


def export_safetensors(model: nn.Module, path: str | os.PathLike, config: dict, rtol: float = 1e-6) -> float:
    """Write the weights and model config; rebuild the model from the file alone and compare logits."""
    from ..models import create_model
    from ..models.loading import load_state_dict_into, model_config, read_checkpoint

    path = Path(path)
    model = model.eval().cpu()
    save_weights(model.state_dict(), path, config, safetensors=True)
    stored = model_config(read_checkpoint(path))
    rebuilt = create_model(stored["arch"], **stored.get("model_kwargs", {})).eval()
    load_state_dict_into(rebuilt, {k: v for k, v in read_checkpoint(path).items() if k != "__metadata__"},
                         source=str(path))
    x = torch.randn(2, model.in_chans, *(config.get("data_config", {}).get("img_size", 32),) * 2,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return _check_close("safetensors", rebuilt(x), model(x), rtol, path)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    raise SequencerError(f"cannot tell the export format from {args.output!r}",
                         hint="pass --format onnx|torchscript|safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--format", "-f", choices=sorted(FORMATS), default=None,
                        help="export format (default: from the --output suffix: .onnx, .pt/.ts, .safetensors)")
    parser.add_argument("--output", "-o", required=True, metavar="PATH", help="file to write")
    parser.add_argument("--dynamic-batch", action="store_true", help="ONNX/TorchScript: variable batch size")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the example input")
    parser.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (>= 17)")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="allowed max |exported - PyTorch| / max |PyTorch| of the logits")


def run(args: argparse.Namespace) -> int:
    fmt = _format(args)
    if fmt == "onnx" and args.opset < 17:
        raise SequencerError(f"--opset {args.opset} is too old; LayerNormalization needs opset 17 or newer")
    loaded = load_model_from_args(args, "cpu")
    model, input_size = loaded.model, loaded.input_size
    check_input_size(loaded, *input_size[1:])
    data_config = dict(loaded.data_config, img_size=input_size[-1])
    config = {"arch": loaded.name, "model_kwargs": dict(getattr(model, "model_kwargs", {}) or {}),
              "class_names": loaded.class_names, "data_config": data_config}
    meta = {"arch": loaded.name, "class_names": loaded.class_names or [], "data_config": data_config,
            "input_size": list(input_size)}
    out = Path(args.output)
    if fmt == "onnx":
        err = export_onnx(model, out, input_size, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                          opset=args.opset, rtol=args.rtol, metadata=meta)
        how = f"onnxruntime logits match PyTorch (relative error {err:.1e})"
    elif fmt == "torchscript":
        err = export_torchscript(model, out, input_size, batch_size=args.batch_size,
                                 dynamic_batch=args.dynamic_batch, rtol=args.rtol, metadata=meta)
        how = f"reloaded trace matches PyTorch (relative error {err:.1e})"
    else:
        err = export_safetensors(model, out, config)
        how = f"model rebuilt from the file matches (relative error {err:.1e})"
    size = out.stat().st_size / 2**20
    print(f"exported {loaded.name} ({loaded.num_params / 1e6:.2f}M params, input {'x'.join(map(str, input_size))}) "
          f"to {fmt}: {out} ({size:.1f} MiB); {how}")
    return 0
