"""Reading checkpoints safely, mapping foreign layouts onto ours, and writing release-ready weight files.

Supported files: the authors' release (``blocks.<stage>.<i>...``, ``head.weight``), timm's port
(``stages.<s>...``, ``head.fc``), our own training checkpoints and timm train.py's (a dict with ``state_dict``
and maybe ``state_dict_ema``; timm's names its model in ``args``), and ``.safetensors``. Pickles are only ever
read with ``weights_only=True``. Every loader takes a checkpoint's weights as :func:`picked_weights` picks them:
by default the ones its run evaluated.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import SequencerError, warnings_ignored
from ..fileio import write_atomically

_logger = logging.getLogger(__name__)

_HEAD_KEYS = ("head.fc.weight", "head.fc.bias")


def _safe_metadata_globals() -> list:
    """Harmless non-tensor types found in checkpoints written by timm's train.py (``args`` is an
    ``argparse.Namespace``, metrics may be numpy scalars); allow-listed so such files load with weights_only."""
    import numpy as np
    np_core = np._core if hasattr(np, "_core") else np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [argparse.Namespace, np_core.multiarray.scalar, np.dtype, *dtypes]


def _pickled_global(path: Path) -> str | None:
    """The first class/function a plain (non-zip) pickle file would import, found by scanning its opcodes with
    ``pickletools`` (nothing is executed); None for zip checkpoints and unreadable files.

    torch's weights-only unpickler rejects some pickles (e.g. protocol 4 frames) before it reaches their imports;
    this names the object so the refusal says why the file is unsafe rather than calling it corrupt.
    """
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return None
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                found = None
                if opcode.name == "GLOBAL":
                    found = str(arg).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found = f"{strings[-2]}.{strings[-1]}"
                elif isinstance(arg, str):
                    strings.append(arg)
                # tensor rebuilders and OrderedDict are what plain weights use; name the first other object
                if found and not found.startswith(("torch.", "collections.OrderedDict")):
                    return found
    except Exception:  # not a pickle at all
        return None
    return None


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol a ``torch.save`` file was written with (``pickle_protocol``; 2 by default), read from its
    pickle's first opcode; None where there is none to read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                head = archive.open(name).read(2) if name else b""
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None  # PROTO opcode, then its number


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file into a dict without executing any code it may carry.

    Raises SequencerError for a missing, unreadable or unsafe file, and for a ``path`` that is no path (a caller's
    ``checkpoint_path=5`` failed in pathlib with 'expected str, bytes or os.PathLike object, not int').
    """
    if not isinstance(path, (str, os.PathLike)):
        raise SequencerError(f"checkpoint {path!r}: a file path (str or os.PathLike), not {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise SequencerError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise SequencerError(f"checkpoint {str(path)!r} is not a valid safetensors file ({e})") from None
        if meta:
            out["__metadata__"] = meta
        return out
    _refuse_exports(path)
    try:
        with torch.serialization.safe_globals(_safe_metadata_globals()), \
                warnings_ignored(("Detected pickle protocol",)):  # refused below if unsafe
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, ... for foreign content
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        blocked = blocked.group(1) if blocked else _pickled_global(path)
        if blocked:
            raise SequencerError(
                f"refusing to load checkpoint {str(path)!r}: it contains the Python object {blocked}, "
                f"which is not plain weights, and loading it could run code",
                hint="only load checkpoints you trust; re-save the weights as a plain state_dict or safetensors"
            ) from None
        # torch's message opens with generic advice; the specific reason follows "WeightsUnpickler error:"
        text = str(e).split("WeightsUnpickler error:")[-1].strip()
        reason = text.splitlines()[0][:160] if text and not isinstance(e, LookupError) else "unrecognised content"
        protocol = _pickle_protocol(path)
        if protocol not in (None, 2) and reason.startswith("Unsupported operand"):
            raise SequencerError(
                f"checkpoint {str(path)!r} was written with pickle protocol {protocol}, which torch's safe loader "
                f"(torch.load with weights_only=True) cannot read ({reason})",
                hint="save it again with torch.save's default protocol (no `pickle_protocol`), or as safetensors"
            ) from None
        raise SequencerError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file ({reason})") from None
    if not isinstance(obj, dict):
        raise SequencerError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


_EXPORT_HINT = "for sequencer commands pass the training checkpoint (.pth.tar) or a .safetensors export of it"


def _refuse_exports(path: Path) -> None:
    """Name our TorchScript, exported-program and ONNX exports when one is passed where a checkpoint belongs
    (torch.load would call a TorchScript or .pt2 file corrupt)."""
    if path.suffix.lower() == ".onnx":
        raise SequencerError(f"{str(path)!r} is an ONNX export, not a checkpoint",
                             hint=f"pass the .pth.tar / .safetensors it came from (validate, predict and benchmark "
                                  f"also run the file itself: `onnx={path}`)")
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise SequencerError(f"{str(path)!r} is a TorchScript export (a compiled model), not a checkpoint",
                             hint=f"run it with torch.jit.load(); {_EXPORT_HINT}")
    # torch.export.save's package (torch >= 2.7: <name>/archive_format; 2.6: serialized_exported_program.json at the
    # top); torch.save writes neither
    if any(n.endswith("/archive_format") or n.endswith("serialized_exported_program.json") for n in names):
        raise SequencerError(f"{str(path)!r} is a torch.export program (.pt2), not a checkpoint",
                             hint=f"run it with torch.export.load(); {_EXPORT_HINT}")


# where training scripts store the two sets of weights: ours and timm's train.py (state_dict, state_dict_ema); DeiT's
# (model, model_ema)
_EMA_KEYS = ("state_dict_ema", "model_ema")
_MODEL_KEYS = ("state_dict", "model")


def _weights_entry(checkpoint: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if isinstance(checkpoint.get(k), dict) and checkpoint[k]), None)


def evaluated_weights_of(checkpoint: dict) -> str:
    """Whose held-out metrics a training checkpoint's are (its run logged them and picked its best epoch by them):
    "ema" or "model", as its ``evaluated_weights`` records. A file from before that was recorded: "model" without
    ``model_ema``; the EMA's with it, except an EMA kept on the CPU (``model_ema_force_cpu``) by a run on another
    device, which evaluated the raw model: its ``device``, or where that was left to the run (CUDA when
    available), CUDA where the RNG state the run saved holds CUDA's. A file whose settings do not say (timm's,
    the authors'): its EMA weights where it has them."""
    if checkpoint.get("evaluated_weights") in ("ema", "model"):
        return checkpoint["evaluated_weights"]
    saved = _saved_args(checkpoint)
    if "model_ema" not in saved:
        return "ema" if _weights_entry(checkpoint, _EMA_KEYS) else "model"
    if not saved["model_ema"]:
        return "model"
    if not saved.get("model_ema_force_cpu"):
        return "ema"
    rng = checkpoint.get("rng_state")
    ran_with_cuda = isinstance(rng, list) and bool(rng) and isinstance(rng[0], dict) and "cuda" in rng[0]
    device = str(saved.get("device") or ("cuda" if ran_with_cuda else "cpu"))
    return "ema" if device.split(":")[0] == "cpu" else "model"


def _saved_args(checkpoint: dict) -> dict:
    """A training checkpoint's settings: ours (a dict) or timm's train.py's (an ``argparse.Namespace``); {} for
    none."""
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return args if isinstance(args, dict) else {}


def picked_weights(checkpoint: dict, use_ema: bool | None = None) -> str | None:
    """Which weights of a checkpoint every loader takes: "ema" or "model" (None: a file of one set of weights that
    does not say whose, as a run's without EMA, the authors' release and timm's weights). ``use_ema=None``: the ones
    its run evaluated (:func:`evaluated_weights_of`), so that validating it reproduces the metrics it logged; True:
    its EMA weights where it has them; False: its raw model's. A file of one set (``sequencer checkpoint clean`` /
    ``average``) holds the weights its ``weights`` entry names."""
    if _weights_entry(checkpoint, _EMA_KEYS):
        return "ema" if (evaluated_weights_of(checkpoint) == "ema" if use_ema is None else use_ema) else "model"
    recorded = checkpoint.get("weights", (checkpoint.get("__metadata__") or {}).get("weights"))
    return recorded if recorded in ("ema", "model") else None


def extract_state_dict(checkpoint: dict, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict that :func:`picked_weights` picks (``state_dict_ema`` / ``model_ema`` or
    ``state_dict`` / ``model``; a plain state dict as it is), without DDP's and torch.compile's key prefixes."""
    ema = _weights_entry(checkpoint, _EMA_KEYS)
    key = ema if ema and picked_weights(checkpoint, use_ema) == "ema" else _weights_entry(checkpoint, _MODEL_KEYS)
    if key is not None:
        checkpoint = checkpoint[key]
    state = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue
        # DDP's and torch.compile's wrappers, in either order: torch.compile(DDP(model)), the order torch's DDP
        # documentation compiles in, saves `_orig_mod.module.<key>`
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        state[k] = v
    return state


# The model config a checkpoint carries besides its weights (training contract); all JSON-serialisable.
# ``data``: the dataset it was trained and evaluated on (sequencer.engine.data_record); ``segmenter``: a segmentation
# checkpoint's model (backbone, head, widths: sequencer.models.segmentation.segmenter_from_config), so that
# `checkpoint average` / `clean` of one write a file `segment validate` loads.
# `data_config["img_size"]` is the size a file's preprocessing expects (a training checkpoint's: the size it trained
# at; an export's: the size it was exported at); `trained_size`, written by `sequencer export`, the size its weights
# were trained at, which the export size need not be (a file without it: its img_size is both); `probabilities`: how
# the logits become probabilities (:func:`recorded_probabilities`); `eval_amp_dtype`: the autocast its run evaluated
# under; `architecture`: what a run of a caller's module (no `arch`) holds, in words; `averaged_from`: the files a
# `checkpoint average` averaged (a clean of the average keeps it: no run evaluated those weights)
CONFIG_KEYS = ("arch", "model_kwargs", "class_names", "data_config", "trained_size", "ignored_classes", "data",
               "segmenter", "probabilities", "eval_amp_dtype", "architecture", "averaged_from")
PROBABILITIES = ("softmax", "sigmoid")


def checkpoint_metadata(checkpoint: dict | None) -> dict:
    """The model config (arch, model_kwargs, class_names, data_config) a checkpoint carries.

    Training checkpoints hold them as plain entries; our ``.safetensors`` files (``sequencer export``,
    ``sequencer checkpoint clean``) keep them as JSON strings in the file's metadata.
    """
    if not checkpoint:
        return {}
    meta = checkpoint.get("__metadata__")
    if not isinstance(meta, dict):
        if isinstance(checkpoint.get("args"), argparse.Namespace) and "model_kwargs" not in checkpoint:
            return {**_timm_train_record(vars(checkpoint["args"])), **checkpoint}
        return checkpoint
    out = {}
    for key in CONFIG_KEYS:
        if key in meta:
            try:
                out[key] = meta[key] if key == "arch" else json.loads(meta[key])
            except ValueError:
                raise SequencerError(f"safetensors metadata entry {key!r} is not valid JSON") from None
    return out


def _timm_train_record(args: dict) -> dict:
    """What a checkpoint of timm's train.py records in its ``args`` (an ``argparse.Namespace``), as our checkpoints'
    entries: ``arch`` (``--model``), ``model_kwargs`` (what train.py built it with: ``--model-kwargs``,
    ``--num-classes``, ``--in-chans`` or ``--input-size``'s channels, ``--gp``) and ``data_config`` (``--img-size``
    or ``--input-size``, ``--mean``, ``--std``, ``--crop-pct``, ``--interpolation``, where given). Values of
    another type than timm gives them are left out."""
    def given(key, types):
        value = args.get(key)
        return value if isinstance(value, types) and not isinstance(value, bool) and value != "" else None

    input_size = given("input_size", (list, tuple))
    input_size = input_size if input_size and len(input_size) == 3 else None
    kwargs = dict(args["model_kwargs"]) if isinstance(args.get("model_kwargs"), dict) else {}
    for key, value in (("num_classes", given("num_classes", int)),
                       ("in_chans", given("in_chans", int) or (int(input_size[0]) if input_size else None)),
                       ("global_pool", given("gp", str))):
        if value is not None:
            kwargs[key] = value
    data = {"img_size": int(input_size[-1]) if input_size else given("img_size", int)}
    for key in ("mean", "std"):
        data[key] = list(given(key, (list, tuple)) or []) or None
    data.update(crop_pct=given("crop_pct", float), interpolation=given("interpolation", str))
    record = {"model_kwargs": kwargs, "data_config": {k: v for k, v in data.items() if v is not None}}
    if given("model", str):
        record["arch"] = args["model"]
    return record


def model_config(checkpoint: dict) -> dict:
    """The :data:`CONFIG_KEYS` entries a checkpoint has (JSON-safe), ``probabilities`` and ``data`` also where its
    run's settings say them (a training checkpoint from before they were recorded), so that a cleaned or averaged
    file keeps them."""
    config = {k: v for k, v in checkpoint_metadata(checkpoint).items() if k in CONFIG_KEYS and v is not None}
    probabilities = recorded_probabilities(checkpoint)
    trained_on = recorded_training_data(checkpoint)  # an older checkpoint's from its run's settings too
    return dict(config, **({"probabilities": probabilities} if probabilities else {}),
                **({"data": trained_on} if trained_on else {}))


def recorded_probabilities(checkpoint: dict | None) -> str | None:
    """How a checkpoint's logits become probabilities: "sigmoid" where its run trained with a binary cross-entropy
    loss (``bce_loss``: one sigmoid per class), "softmax" where it trained with cross-entropy. Its
    ``probabilities`` entry, else (a training checkpoint from before it was recorded, or timm train.py's) its run's
    ``args``; None for a file that says neither (a cleaned, averaged or exported file from before, the authors'
    release, timm's weights)."""
    recorded = checkpoint_metadata(checkpoint).get("probabilities")
    if recorded in PROBABILITIES:
        return recorded
    bce_loss = _saved_args(checkpoint or {}).get("bce_loss")
    if isinstance(bce_loss, bool):
        return "sigmoid" if bce_loss else "softmax"
    return None


PREPROCESSING_KEYS = ("mean", "std", "crop_pct", "interpolation")


def recorded_cfg(checkpoint: dict | None, num_classes: int | None, in_chans: int) -> dict:
    """The ``pretrained_cfg`` entries a checkpoint's record gives the model it loads into: its preprocessing
    (``mean``, ``std``, ``crop_pct``, ``interpolation``; ``input_size`` from its ``img_size``) and, where they name
    exactly the model's ``num_classes`` outputs, its class names as ``label_names`` (timm's key). {} for a file
    that records none (the authors' release, timm's weights)."""
    meta = checkpoint_metadata(checkpoint)
    data = meta.get("data_config") if isinstance(meta.get("data_config"), dict) else {}
    cfg = {k: tuple(data[k]) if isinstance(data[k], (list, tuple)) else data[k]
           for k in PREPROCESSING_KEYS if data.get(k) is not None}
    if data.get("img_size"):
        cfg["input_size"] = (in_chans, int(data["img_size"]), int(data["img_size"]))
    names = meta.get("class_names")
    if names and len(names) == num_classes:
        cfg.update(label_names=[str(n) for n in names], num_classes=num_classes)
    return cfg


def recorded_ignored_classes(checkpoint: dict | None) -> list[str]:
    """The class folders a checkpoint's training left out (its class map did not name them); [] when it records
    none. Evaluation leaves them out too, as training did."""
    return [str(n) for n in checkpoint_metadata(checkpoint).get("ignored_classes") or []]


def recorded_training_data(checkpoint: dict | None) -> dict | None:
    """The data a checkpoint's run trained and evaluated on (its ``data`` entry: root, held-out split, the files
    carved out by ``--val-fraction``; see `sequencer.engine.data_record`), or None when it records none. A training
    checkpoint of ours from before the entry was recorded: the record its run's settings (``args``) give, DATA as
    it was given."""
    meta = checkpoint_metadata(checkpoint)
    record = meta.get("data")
    if isinstance(record, dict) and record:
        return dict(record)
    args = meta.get("args")
    if not isinstance(args, dict) or not ("data" in args or "dataset" in args):
        return None
    return {"dataset": args.get("dataset") or ("" if args.get("data") else "digits"), "root": args.get("data"),
            "split": args.get("val_split") or "validation"}


def jsonable(value):
    """Tuples -> lists, recursively, so a config reads back the same from JSON and from a .pth."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, config: dict | None = None,
                 safetensors: bool | None = None, extra: dict | None = None) -> Path:
    """Write weights plus model config atomically as ``.pth`` (dict) or ``.safetensors`` (config in metadata).

    ``safetensors=None`` picks the format from the file suffix.
    """
    path = Path(path)
    config = {k: v for k, v in (config or {}).items() if k in CONFIG_KEYS and v is not None}
    if safetensors is None:
        safetensors = path.suffix == ".safetensors"
    # contiguous, storage-independent CPU copies: safetensors refuses shared or strided tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if safetensors:
        from safetensors.torch import save_file
        metadata = {"format": "pt"}
        for key, value in config.items():
            metadata[key] = value if key == "arch" else json.dumps(jsonable(value))
        for key, value in (extra or {}).items():
            metadata[key] = value if isinstance(value, str) else json.dumps(jsonable(value))
        return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    obj = {"version": 1, **config, **(extra or {}), "state_dict": tensors}
    return write_atomically(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Map the authors' release layout onto ours (timm's); other layouts pass through. ``model`` is unused: it makes
    this timm's ``filter_fn`` (``timm.models.load_checkpoint(model, path, filter_fn=checkpoint_filter_fn)``).

    Release: ``blocks.<s>.<i>.*`` are blocks, ``blocks.<s>.<layers[s]>.down`` is the downsample *after* stage s,
    which in our layout opens stage s+1; ``head.*`` is the linear head (``head.fc.*`` here).
    """
    if not any(k.startswith("blocks.") for k in state_dict):
        return dict(state_dict)
    # A downsample entry is the one index in its stage whose keys contain ".down."
    down_at = {}
    for k in state_dict:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.down\.", k)
        if m:
            down_at[int(m.group(1))] = int(m.group(2))
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", k)
        if m:
            s, i, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if down_at.get(s) == i:
                k = f"stages.{s + 1}.downsample.{rest}"
            else:
                k = f"stages.{s}.blocks.{i}.{rest}"
        elif k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def to_release_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`checkpoint_filter_fn`: our/timm keys -> the authors' release keys."""
    depth: dict[int, int] = {}
    for k in state_dict:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, i = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), i + 1)
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"stages\.(\d+)\.downsample\.(.*)", k)
        if m:
            s = int(m.group(1))
            k = f"blocks.{s - 1}.{depth.get(s - 1, 0)}.{m.group(2)}"  # a stage without blocks: index 0
        else:
            k = re.sub(r"^stages\.(\d+)\.blocks\.", r"blocks.\1.", k)
            k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def _describe(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def head_rows(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count of a state dict's classifier head (any supported layout), None when it has none."""
    weight = state_dict.get("head.fc.weight", state_dict.get("head.weight"))
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def stem_channels(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The input channels a state dict's stem takes, None when it has no patch-embedding stem."""
    weight = state_dict.get("stem.proj.weight")
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None


def resample_position_embedding(pos: torch.Tensor, grid) -> torch.Tensor:
    """A (1, H, W, C) position embedding resampled to ``grid`` (rows, columns) as timm resamples a ViT's, when its
    weights load at another image size and in its forward at another input size
    (``timm.layers.resample_abs_pos_embed``: bicubic, antialiased, in float32, here without class tokens); the same
    tensor where the grid is its own. Computed as two products with :func:`_antialiased_bicubic` weights, which
    every exporter takes (ONNX has no antialiased bicubic resize)."""
    grid = (int(grid[0]), int(grid[1]))
    if tuple(pos.shape[1:3]) == grid:
        return pos
    rows, cols = (torch.tensor(_antialiased_bicubic(int(old), new), dtype=torch.float32, device=pos.device)
                  for old, new in zip(pos.shape[1:3], grid))
    return torch.einsum("ih,bhwc,jw->bijc", rows, pos.float(), cols).to(pos.dtype)


@functools.lru_cache(maxsize=64)
def _antialiased_bicubic(old: int, new: int) -> tuple:
    """The (new, old) weights by which torch's ``interpolate(mode="bicubic", antialias=True, align_corners=False)``
    resamples a length ``old`` to ``new`` (PIL's filter: the cubic with a = -0.5, widened by the scale when
    shrinking, each row normalised), as nested tuples of floats."""
    def cubic(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = old / new
    support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
    rows = []
    for i in range(new):
        center = scale * (i + 0.5)
        first, last = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), old)
        weights = [cubic((j - center + 0.5) * inv) for j in range(first, last)]
        total = sum(weights)
        rows.append(tuple(weights[j - first] / total if first <= j < last else 0.0 for j in range(old)))
    return tuple(rows)


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                         new_head: bool = True) -> None:
    """Load weights in any supported layout into ``model``, adapting what starting from pretrained weights needs:

    * a classifier head of another class count (or none in the checkpoint) keeps the model's fresh zero-initialised
      head, with a warning; with ``new_head=False`` (the file is the model: ``create_model(checkpoint_path=...)``,
      ``sequencer validate --checkpoint``) another class count is an error instead; a model without a head
      (``num_classes=0``) ignores the checkpoint's;
    * a stem for another number of input channels is adapted as timm does (summed for 1 channel, repeated and
      rescaled otherwise), with a warning;
    * a position embedding for another token grid is resampled to the model's (:func:`resample_position_embedding`).

    Any other mismatch raises SequencerError naming the offending keys.
    """
    state_dict = checkpoint_filter_fn(state_dict)
    own = model.state_dict()
    model_head = tuple(own["head.fc.weight"].shape) if "head.fc.weight" in own else None
    ckpt_head = tuple(state_dict["head.fc.weight"].shape) if "head.fc.weight" in state_dict else None
    keep_model_head = ckpt_head != model_head and (new_head or model_head is None or ckpt_head is None)
    if keep_model_head:
        for k in _HEAD_KEYS:
            state_dict.pop(k, None)
    _adapt_stem(state_dict, own, source)
    pos = state_dict.get("absolute_pos_embed")
    if pos is not None and "absolute_pos_embed" in own and pos.dim() == 4 \
            and pos.shape[3] == own["absolute_pos_embed"].shape[3] and pos.shape != own["absolute_pos_embed"].shape:
        grid = own["absolute_pos_embed"].shape[1:3]
        _logger.info(f"{source}: position embedding resized from its {pos.shape[1]}x{pos.shape[2]} token grid to "
                     f"this model's {grid[0]}x{grid[1]} (bicubic, antialiased)")
        state_dict["absolute_pos_embed"] = resample_position_embedding(pos, grid)
    missing = set(own) - set(state_dict)
    if keep_model_head:
        missing -= set(_HEAD_KEYS)
    unexpected = set(state_dict) - set(own)
    wrong_shape = {k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape}
    if (wrong_shape and not missing and not unexpected and wrong_shape <= set(_HEAD_KEYS)
            and ckpt_head[0] != model_head[0]):  # another class count (a head of other in-features is named below)
        raise SequencerError(f"{source} has a {ckpt_head[0]}-class head but `num_classes` is {model_head[0]}",
                             hint=f"drop `num_classes` or set it to {ckpt_head[0]}; a new {model_head[0]}-class head "
                                  f"starts from its weights as pretrained weights (`sequencer train "
                                  f"--initial-checkpoint PATH`, `create_model(name, pretrained=True, "
                                  f"pretrained_cfg_overlay=dict(file=PATH))`)")
    if missing or unexpected or wrong_shape:
        _refuse_mismatch(model, state_dict, own, missing, unexpected, wrong_shape, source)
    if keep_model_head and model_head is not None:  # only once the rest fits: no transfer note before an error
        what = f"classifier head has shape {ckpt_head}" if ckpt_head else "has no classifier head"
        warnings.warn(f"{source}: {what}, the model's is {model_head}; the head is re-initialised "
                      f"(transfer learning)", stacklevel=3)
    model.load_state_dict(state_dict, strict=False)


def _adapt_stem(state_dict: dict, own: dict, source: str) -> None:
    """A stem made for another number of input channels, adapted in ``state_dict`` (with a warning)."""
    stem = "stem.proj.weight"
    ckpt_stem, own_stem = state_dict.get(stem), own.get(stem)
    if ckpt_stem is not None and own_stem is not None and ckpt_stem.shape[1] != own_stem.shape[1] \
            and ckpt_stem.shape[:1] + ckpt_stem.shape[2:] == own_stem.shape[:1] + own_stem.shape[2:]:
        warnings.warn(f"{source}: the stem made for {ckpt_stem.shape[1]} input channels is adapted to "
                      f"{own_stem.shape[1]}", stacklevel=4)
        state_dict[stem] = _adapted_stem(ckpt_stem, own_stem.shape[1], source)


def _refuse_mismatch(model, state_dict, own, missing, unexpected, wrong_shape, source) -> None:
    arch = getattr(model, "model_name", type(model).__name__)
    parts = []
    if wrong_shape:
        parts.append("shape mismatch: " + _describe(
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape))
    if missing:
        parts.append("missing: " + _describe(missing))
    if unexpected:
        parts.append("unexpected: " + _describe(unexpected))
    prefix = _wrapper_prefix(unexpected, set(own))
    hint = (f"its model's weights are under {prefix!r} (the state dict of a module that holds the model, as "
            f"nn.Sequential's): load the file into that module, or save {{k[{len(prefix)}:]: v for k, v in "
            f"sd.items() if k.startswith({prefix!r})}} as the model's weights") if prefix else \
        "check `model` matches the architecture the checkpoint was trained with"
    raise SequencerError(f"{source} does not fit model {arch!r}: " + "; ".join(parts), hint=hint)


def _wrapper_prefix(unexpected: set[str], own: set[str]) -> str | None:
    """The key prefix under which ``unexpected`` holds every one of the model's keys but its head's (a state dict
    of a module wrapping the model: ``1.`` in an nn.Sequential, ``backbone.``...); None when there is none."""
    counts: dict[str, int] = {}
    for key in unexpected:
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1:] in own:
                counts[key[:i + 1]] = counts.get(key[:i + 1], 0) + 1
    needed = len(own - set(_HEAD_KEYS))
    return next((p for p, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= needed), None)


def embedding_img_size(model_kwargs: dict, state_dict: dict[str, torch.Tensor], recorded: int | None = None,
                       source: str = "checkpoint") -> int | None:
    """The ``img_size`` to build a model of ``model_kwargs`` (every argument, defaults included) at so that it holds
    ``state_dict``'s position embedding (``v_sequencer_s_pe``'s ``absolute_pos_embed``) on the checkpoint's own
    token grid, where the asked size gives another one (said in a note naming ``source``); None where it fits (or
    neither has one, or their widths differ: ``load_state_dict_into`` names that mismatch). ``recorded``: the size
    the file records, taken where it gives that grid. A model built so interpolates the embedding once, in its
    forward, to each input's grid: at the checkpoint's size it runs exactly the checkpoint's weights, at any other
    size one bicubic resample of them, as a model built at the checkpoint's size does (resizing at load, then again
    in forward, would resample twice)."""
    pos = checkpoint_filter_fn(state_dict).get("absolute_pos_embed") if model_kwargs.get("ape") else None
    if pos is None or pos.dim() != 4 or pos.shape[3] != model_kwargs["embed_dims"][0]:
        return None
    patch = int(model_kwargs["patch_sizes"][0])
    if int(model_kwargs["img_size"]) // patch == pos.shape[1] == pos.shape[2]:
        return None
    size = int(recorded) if recorded and int(recorded) // patch == pos.shape[1] else int(pos.shape[1]) * patch
    _logger.info(f"{source}: position embedding kept on its {pos.shape[1]}x{pos.shape[2]} token grid (a {size} px "
                 f"model), interpolated (bicubic) to each input's grid")
    return size


def weights_to_load(checkpoint: dict, source: str, use_ema: bool | None = None,
                    other: str = "`use_ema=True` takes its EMA weights") -> tuple[dict[str, torch.Tensor], str | None]:
    """(the weights every loader takes from ``checkpoint``, which they are: :func:`picked_weights`); SequencerError
    naming ``source`` when it holds none. Where the default takes the raw model's weights of a file that also holds
    EMA weights (the run evaluated and logged the raw ones), a note says so, ending with ``other``: how to take the
    EMA weights instead."""
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    if not state:
        raise SequencerError(f"{source} holds no weights")
    weights = picked_weights(checkpoint, use_ema)
    if use_ema is None and weights == "model" and picked_weights(checkpoint, True) == "ema":
        _logger.info(f"note: {source}: loading its raw model weights, the ones its run evaluated and logged, not its "
                     f"EMA weights" + (f"; {other}" if other else ""))
    if (use_ema is True and weights != "ema") or (use_ema is False and weights == "ema"):  # a file of one set
        held = {"ema": "holds only its EMA weights", "model": "holds only its raw model weights"}.get(
            weights, "holds no EMA weights")
        _logger.warning(f"note: {source} {held}: `use_ema={use_ema}` cannot pick "
                        f"{'EMA' if use_ema else 'raw model'} weights; loading the ones it holds")
    return state, weights


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool | None = None) -> dict:
    """Load the weights of ``path`` into ``model`` (:func:`weights_to_load`: by default the ones its run
    evaluated); returns the raw checkpoint dict (for its metadata)."""
    checkpoint = read_checkpoint(path)
    state, _ = weights_to_load(checkpoint, f"checkpoint {str(path)!r}", use_ema)
    load_state_dict_into(model, state, source=f"checkpoint {str(path)!r}")
    return checkpoint


def _adapted_stem(weight: torch.Tensor, in_chans: int, source: str) -> torch.Tensor:
    """timm's ``adapt_input_conv``: (out, base, k, k) -> (out, in_chans, k, k). Before timm 1.0.31 it took only
    3-channel weights (no ``base_chans``), which pyproject's floor (1.0.15) still allows."""
    import inspect

    import timm
    from timm.models import adapt_input_conv

    base = weight.shape[1]
    if base == 3:
        return adapt_input_conv(in_chans, weight)
    if "base_chans" not in inspect.signature(adapt_input_conv).parameters:
        raise SequencerError(f"{source}: adapting a stem made for {base} input channels to {in_chans} needs timm "
                             f"1.0.31 or newer (this is {timm.__version__})", hint="pip install -U timm")
    return adapt_input_conv(in_chans, weight, base_chans=base)
