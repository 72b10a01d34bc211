"""`sequencer checkpoint average|clean`: the paper's checkpoint averaging and release-ready weight files.

``average`` takes the mean of the weights of N checkpoints (by default the ones each run evaluated: its EMA
weights where it evaluated them, as with the paper's ``avg_checkpoints.py``); ``clean`` strips
optimizer/scheduler/scaler state and keeps one set of weights. Both write a file the loaders understand: a ``.pth``
holding ``{"version", "arch", "model_kwargs", "class_names", "data_config", "data", "weights", "state_dict"}``
(``weights``: "ema" or "model"; a segmentation checkpoint's also ``segmenter``, its model config) or a
``.safetensors`` whose metadata carries the same model config as JSON strings. Every file is written atomically
(temporary file, fsync, rename), so an interrupted run leaves no partial output.
"""
from __future__ import annotations

import json

import torch

from ..engine.guest import cpu_default_device
from ..errors import SequencerError
from ..models import create_model
from ..models.loading import jsonable, read_checkpoint, weights_to_load
from ..models.registry import ReadCheckpoint
from ..models.segmentation import complete_config


def read_weights(path: str, use_ema: bool | None) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """(checkpoint, the weights to use, whether they are EMA weights): the ones every loader picks
    (``models.loading.picked_weights``: by default those its run evaluated; ``use_ema`` True or False: its EMA or
    raw weights where it has both)."""
    checkpoint = read_checkpoint(path)
    state, weights = weights_to_load(checkpoint, f"checkpoint {path!r}", use_ema)
    return checkpoint, state, weights == "ema"


def check_fits_its_model(config: dict, state: dict[str, torch.Tensor], source: str) -> None:
    """SequencerError (one line, naming the keys) where ``config`` names a classifier (``arch``) that ``state``
    does not fit (another model's keys or shapes): the file clean or average would write, promised to load with
    ``--checkpoint`` alone, is refused by validate and load_model, which build that model and load it the same way
    (its head's class count and stem's channels from the weights). A file naming no model (loaded with ``--model
    NAME``) and a segmentation checkpoint's weights are left to their loaders."""
    arch = config.get("arch")
    if not arch or config.get("segmenter"):
        return
    kwargs = {k: v for k, v in (config.get("model_kwargs") or {}).items() if k not in _REGULARISATION}
    written = ReadCheckpoint(dict(config, state_dict=state), source)  # the file as it will be written
    try:
        with cpu_default_device():
            create_model(arch, checkpoint_path=written, **kwargs)
    except SequencerError as e:
        raise SequencerError(e.message, hint=f"its weights are not those of the {arch!r} it names: validate and "
                                             f"load_model would refuse the file written from it") from None


# what must agree for an average to be one model: the architecture and its shape (a segmentation checkpoint's:
# backbone, head and widths), the classes its rows stand for, the preprocessing (image size included) it was
# trained with; regularisation (drop rates) may differ
_SAME_FOR_AVERAGE = (("arch", "model"), ("model_kwargs", "model arguments"), ("segmenter", "segmentation model"),
                     ("class_names", "class names"), ("data_config", "data config"))
_REGULARISATION = ("drop_rate", "drop_path_rate")
# a resumed run may change its preprocessing (--img-size, --crop-pct, ...): its checkpoints are of one run but not
# of one data config
_ONE_MODEL_HINTS = {"data_config": "average checkpoints written with the same preprocessing (a resume with another "
                                   "image size, crop or interpolation changes it)"}
# what a segmentation checkpoint's data config records of its run's evaluation, not of the model: the autocast
# (`--amp`; a resume may add or drop it), which an average of files that differ records as none
# (:func:`averaged_data_config`), as a classifier's top-level ``eval_amp_dtype``
_EVALUATION_ONLY = ("eval_amp_dtype",)


def check_same_model(configs: list[dict], names: list[str]) -> None:
    """SequencerError (one line, naming the file) unless the model configs (``model_config`` of each checkpoint)
    agree on model, model arguments, class names and data config; a key no file has is not compared."""
    def without_regularisation(kwargs):
        return {k: v for k, v in kwargs.items() if k not in _REGULARISATION} if isinstance(kwargs, dict) else kwargs

    def comparable(config: dict, key: str):
        value = config.get(key)
        if key == "model_kwargs":
            value = without_regularisation(value)
        elif key == "data_config" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _EVALUATION_ONLY}
        elif key == "segmenter" and isinstance(value, dict):  # a config from before a key: the model it stands for
            value = complete_config(value)
            value = dict(value, backbone_kwargs=without_regularisation(value["backbone_kwargs"]))
        return jsonable(value)

    for key, what in _SAME_FOR_AVERAGE:
        first = comparable(configs[0], key)
        for name, config in zip(names[1:], configs[1:]):
            other = comparable(config, key)
            if other != first:
                theirs, ours = _differences(other, first)
                raise SequencerError(f"cannot average: {name!r} has {what} {theirs} but {names[0]!r} has {ours}",
                                     hint=_ONE_MODEL_HINTS.get(key, "average checkpoints of one training run"))


def averaged_data_config(configs: list[dict]) -> tuple[dict | None, list[str]]:
    """(the data config an average records: the first file's, without an evaluation-only entry the files differ in;
    those entries' names) for configs that :func:`check_same_model` passed."""
    data_config = configs[0].get("data_config")
    if not isinstance(data_config, dict):
        return data_config, []
    differing = [k for k in _EVALUATION_ONLY
                 if any((c.get("data_config") or {}).get(k) != data_config.get(k) for c in configs)]
    return {k: v for k, v in data_config.items() if k not in differing}, differing


def averaged_data_record(configs: list[dict]) -> tuple[dict | None, str | None]:
    """(the ``data`` record an average keeps, None for none; a note on it, or None) from the files' model configs:
    the files' record where they agree. Where their runs carved their held-out files from one split with other seeds
    (`val_fraction`), each trained on images another held out: the average keeps only the files every run held out
    (none where no file was), so that validate scores no image one of the averaged weights trained on."""
    records = [config.get("data") for config in configs]
    if not all(isinstance(record, dict) and "train_split" in record for record in records):  # some from before it
        records = [{k: v for k, v in record.items() if k != "train_split"} if isinstance(record, dict) else record
                   for record in records]
    first = records[0]
    if all(record == first for record in records):
        return first, None
    if all(isinstance(record, dict) and record.get("files") for record in records) and \
            len({json.dumps({k: v for k, v in record.items() if k != "files"}, sort_keys=True)
                 for record in records}) == 1:
        held_out_by_all = sorted(set.intersection(*(set(record["files"]) for record in records)))
        where = f"the checkpoints' runs held out different images of {first.get('files_in')} (`val_fraction`)"
        if held_out_by_all:
            return dict(first, files=held_out_by_all), (f"{where}: the average records the {len(held_out_by_all)} "
                                                        f"that every run held out, which validate evaluates")
        return None, f"{where} and no image that every run held out: validate it on images none of them trained on"
    return None, ("the checkpoints record different training data: the average records none (validate it with "
                  "`data`, images none of their runs trained on)")


def _differences(a, b) -> tuple[str, str]:
    """Two differing values in words: for two dicts (model arguments, a segmenter config) only the entries that differ
    (``aux_head=True, fpn_convs=True`` vs ``aux_head=False, fpn_convs=False``), an absent one as ``none``."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return _shown(a), _shown(b)
    keys = [k for k in {**a, **b} if a.get(k) != b.get(k)]
    return tuple(", ".join(f"{k}={_shown(side.get(k))}" for k in keys) for side in (a, b))


def _shown(value) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "(" + ", ".join(value[:6]) + (", ..." if len(value) > 6 else "") + ")"
    return "none" if value is None else str(value)


def repeated_weights(state_dicts: list[dict[str, torch.Tensor]]) -> dict[int, int]:
    """{i: j} for each state dict i that holds exactly the weights of an earlier one j. A run's ``last.pth.tar`` and
    ``model_best.pth.tar`` are copies of its ``checkpoint-<epoch>.pth.tar`` files, so a glob of the run's folder
    names some epochs two or three times; averaged as given, those would weigh double."""
    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                            and torch.equal(a[k], b[k]) for k in a)

    repeats = {}
    for i, state in enumerate(state_dicts):
        earlier = next((j for j in range(i) if j not in repeats and same(state_dicts[j], state)), None)
        if earlier is not None:
            repeats[i] = earlier
    return repeats


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]], names: list[str] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (accumulated in float64); other tensors come from the first.

    All state dicts must have the same keys and shapes; a mismatch raises SequencerError naming the file and key.
    """
    if not state_dicts:
        raise SequencerError("no checkpoints to average")
    names = names or [f"#{i}" for i in range(len(state_dicts))]
    first = state_dicts[0]
    for name, state in zip(names[1:], state_dicts[1:]):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            what = (f"lacks {', '.join(missing[:3])}" if missing else "") + \
                   ("; " if missing and extra else "") + (f"has extra {', '.join(extra[:3])}" if extra else "")
            raise SequencerError(f"cannot average: {name!r} does not have the same weights as {names[0]!r} "
                                 f"({what})", hint="average checkpoints of one training run / architecture")
        for k, v in first.items():
            if state[k].shape != v.shape:
                raise SequencerError(f"cannot average: {k} has shape {tuple(state[k].shape)} in {name!r} but "
                                     f"{tuple(v.shape)} in {names[0]!r}",
                                     hint="average checkpoints of one training run / architecture")
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            total = torch.zeros(v.shape, dtype=torch.float64)
            for state in state_dicts:
                total += state[k].to(torch.float64)
            out[k] = (total / len(state_dicts)).to(v.dtype)
        else:  # counters such as num_batches_tracked cannot be averaged meaningfully
            out[k] = v.clone()
    return out
