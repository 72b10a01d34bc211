"""Segmentation evaluation: mIoU / per-class IoU / pixel accuracy, whole-image and sliding-window inference, and the
library calls under ``sequencer segment validate`` and ``sequencer segment predict``.

Metrics come from one confusion matrix of integer pixel counts over the split (ignored pixels, 255, left out),
summed over ranks under DDP: the numbers are exact and the same however the split is sharded, so a checkpoint
validates to the mIoU its training logged. Classes that appear neither in the labels nor in the predictions have no
IoU (NaN) and are left out of the mean, as mmsegmentation does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import EVAL_MODES
from ..data.class_folders import split_aliases
from ..data.loader_workers import workers_stopped_on_exit
from ..data.segmentation import IGNORE_INDEX, EvalTransform, SegmentationDataset, open_split, voc_palette
from ..errors import SequencerError
from ..fileio import input_overwritten, output_folder, write_atomically
from ..models import get_model_entry
from ..models.caller_module import caller_module_kept
from ..models.loading import checkpoint_metadata, extract_state_dict, read_checkpoint
from ..models.segmentation import Segmenter, segmenter_from_config
from .amp import autocast
from .distributed import DistInfo, process_group
from .guest import caller_state_kept, own_modes
from .user_data import check_float32_weights

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = label, columns = prediction, of ``pred``/``target`` (any equal shapes);
    pixels labelled 255 are left out."""
    valid = target != IGNORE_INDEX
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """mIoU, pixel accuracy and mean class accuracy (percent) and per-class IoU from a confusion matrix."""
    conf = confusion.double()
    hits = conf.diag()
    labelled, predicted = conf.sum(1), conf.sum(0)
    union = labelled + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    acc = torch.where(labelled > 0, hits / labelled.clamp(min=1), torch.full_like(hits, float("nan")))
    total = conf.sum().item()
    return dict(miou=100 * _nanmean(iou), pixel_acc=100 * hits.sum().item() / total if total else float("nan"),
                macc=100 * _nanmean(acc), pixels=int(total),
                per_class_iou={name: 100 * float(v) for name, v in zip(class_names, iou.tolist())})


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else float("nan")


# ------------------------------------------------------------------------------------------------ inference
@dataclass
class InferenceSettings:
    """How a segmenter is run on one image: ``mode`` whole or slide (``crop`` windows every ``stride`` pixels,
    logits averaged where they overlap), ``amp_dtype`` for autocast (None: float32)."""
    mode: str = "whole"
    crop: int = 512
    stride: int | None = None  # default: 2/3 of the crop, as mmsegmentation's 512/341
    amp_dtype: torch.dtype | None = None


def image_logits(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """(1, 3, h, w) normalised image -> (1, K, h, w) float32 logits."""
    with autocast(image.device.type, settings.amp_dtype):
        if settings.mode == "whole":
            return model(image).float()
        return _sliding_window(model, image, settings.crop, window_stride(settings.crop, settings.stride))


def window_stride(crop: int, stride: int | None) -> int:
    """The sliding windows' stride: ``stride``, by default 2/3 of the ``crop`` (mmsegmentation's 512/341)."""
    return stride or max(1, crop * 2 // 3)


def _sliding_window(model: nn.Module, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    total = counts = None
    for top in _window_starts(h, crop, stride):
        for left in _window_starts(w, crop, stride):
            window = image[..., top:top + crop, left:left + crop]
            logits = model(window).float()
            if total is None:
                total = image.new_zeros((1, logits.shape[1], h, w), dtype=torch.float32)
                counts = image.new_zeros((1, 1, h, w), dtype=torch.float32)
            total[..., top:top + crop, left:left + crop] += logits
            counts[..., top:top + crop, left:left + crop] += 1
    return total / counts


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering ``length``; the last window ends at the edge (windows overhang nothing)."""
    if length <= crop:
        return [0]
    steps = math.ceil((length - crop) / stride)
    return sorted({min(i * stride, length - crop) for i in range(steps + 1)})


def predict_mask(model: nn.Module, image: torch.Tensor, out_size, settings: InferenceSettings) -> torch.Tensor:
    """(1, 3, h, w) -> (H, W) int64 class indices at ``out_size`` (the original image's (H, W))."""
    return mask_from_logits(image_logits(model, image, settings), out_size)


def mask_from_logits(logits: torch.Tensor, out_size) -> torch.Tensor:
    """(1, K, h, w) logits -> (H, W) int64 class indices at ``out_size``."""
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, loader, num_classes: int, class_names: list[str],
                          settings: InferenceSettings, distributed: bool = False) -> dict:
    """Metrics of :func:`segmentation_metrics` over ``loader`` (batches of one: image (1, 3, h, w), mask
    (1, H, W)), plus ``images`` and ``nonfinite`` (images whose logits hold a NaN or a +inf: then mIoU, pixel and
    class accuracy are NaN, with a warning, as argmax reads NaN as the top class); counts all-reduced over ranks
    with ``distributed``. Puts ``model`` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # images, images with NaN or +inf logits
    for image, mask in loader:
        for i in range(image.shape[0]):
            logits = image_logits(model, image[i:i + 1].to(device), settings)
            counts[1] += (logits.isnan() | logits.isposinf()).any()
            confusion += confusion_matrix(mask_from_logits(logits, mask.shape[-2:]), mask[i].to(device), num_classes)
            counts[0] += 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(counts)
    metrics = segmentation_metrics(confusion.cpu(), class_names)
    images, nonfinite = counts.tolist()
    if nonfinite:
        _logger.warning(f"warning: {nonfinite} of {images} images gave logits that are NaN or +inf: mIoU, pixel and "
                        f"class accuracy are NaN")
        metrics.update(miou=float("nan"), pixel_acc=float("nan"), macc=float("nan"),
                       per_class_iou=dict.fromkeys(metrics["per_class_iou"], float("nan")))
    metrics.update(images=images, nonfinite=nonfinite)
    return metrics


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclass
class LoadedSegmenter:
    model: Segmenter
    class_names: list[str]
    data_config: dict  # mean, std, img_size, eval_size, eval_mode, stride, layout, reduce_zero_label
    checkpoint: dict


def load_segmenter(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedSegmenter:
    """A ``sequencer segment train`` checkpoint's model (or that of a ``sequencer checkpoint average`` / ``clean`` of
    such checkpoints, ``.pth`` or ``.safetensors``), in eval mode on ``device``, with its class names and data
    settings; SequencerError (one line) for a file that is not one."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint_metadata(checkpoint) if isinstance(checkpoint, dict) else {}
    if not isinstance(meta.get("segmenter"), dict):
        raise SequencerError(f"checkpoint {os.fspath(path)!r} is not a segmentation checkpoint (written by "
                             f"`sequencer segment train`)")
    model = segmenter_from_config(meta["segmenter"])
    model.load_state_dict(extract_state_dict(checkpoint))
    model.to(device).eval()
    return LoadedSegmenter(model, [str(c) for c in meta["class_names"]], dict(meta["data_config"]), checkpoint)


def inference_settings(data_config: dict, mode: str | None, stride: int | None,
                       device: torch.device) -> InferenceSettings:
    """The checkpoint's evaluation settings (mode, window, and the autocast dtype its training evaluated in, so that
    a checkpoint validates to the logged numbers), with ``mode``/``stride`` overriding them when given."""
    mode = mode or data_config.get("eval_mode", "whole")
    if mode not in EVAL_MODES:
        raise SequencerError(f"`eval_mode={mode}`: use one of {', '.join(EVAL_MODES)}")
    amp_dtype = getattr(torch, data_config["eval_amp_dtype"]) if data_config.get("eval_amp_dtype") else None
    if device.type == "cpu" and amp_dtype == torch.float16:
        amp_dtype = torch.bfloat16  # CPU autocast is a bfloat16 feature (the --amp policy)
    crop, stride = int(data_config["img_size"]), stride or data_config.get("stride")
    if mode == "slide":
        check_stride(stride, crop)
    return InferenceSettings(mode, crop, stride, amp_dtype)


def check_stride(stride: int | None, crop: int) -> None:
    """SequencerError for a sliding-window ``stride`` longer than the ``crop`` window: the rows and columns between
    two windows would have no logits (their 0/0 average is NaN, which argmax reads as class 0)."""
    if stride is not None and stride > crop:
        raise SequencerError(f"`stride={stride}` is longer than the {crop}-pixel sliding window: the pixels "
                             f"between windows would get no prediction", hint=f"use `stride={crop}` or less")


def segment_data_config(backbone: str | None, img_size: int, eval_size: int | None, eval_mode: str,
                        stride: int | None, layout: str, reduce_zero_label: bool) -> dict:
    """How a segmenter's images are prepared and evaluated, as its checkpoint records it (``data_config``):
    ``backbone``'s normalisation (ImageNet's when None), the training crop ``img_size`` (the sliding window),
    ``eval_size`` (short side; default ``img_size``), ``eval_mode``, ``stride``, the dataset ``layout`` and
    ``reduce_zero_label``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    pcfg = get_model_entry(backbone).pretrained_cfg if backbone else {}
    return dict(mean=list(pcfg.get("mean", IMAGENET_DEFAULT_MEAN)), std=list(pcfg.get("std", IMAGENET_DEFAULT_STD)),
                img_size=img_size, eval_size=eval_size or img_size, eval_mode=eval_mode, stride=stride,
                layout=layout, reduce_zero_label=reduce_zero_label)


def resumed_evaluation_change(checkpoint: dict | None, data_config: dict, val_split: str) -> tuple[str, str] | None:
    """(how a resumed run's epochs were evaluated, how this run evaluates, in words) where their mIoUs do not compare:
    another validation split (its synonyms are one split: ``validation`` is ``val``), evaluation size, mode or
    sliding window (its crop, ``img_size``, and stride). None for the same evaluation and without a checkpoint.
    ``data_config``: :func:`segment_data_config`'s, as the checkpoints record it."""
    if checkpoint is None:
        return None
    saved = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    (before, said_before), (now, said_now) = (_evaluation(checkpoint.get("data_config") or {},
                                                          saved.get("val_split") or val_split),
                                              _evaluation(data_config, val_split))
    return None if before == now else (said_before, said_now)


def _evaluation(data_config: dict, split: str) -> tuple[tuple, str]:
    """(what decides an evaluation's metrics, compared; the same in words) for a ``data_config`` and split."""
    size, mode = data_config.get("eval_size") or data_config.get("img_size"), data_config.get("eval_mode", "whole")
    split_key = frozenset(name.lower() for name in split_aliases(split))
    if mode != "slide":
        return (split_key, size, mode), f"split {split!r}, whole images at short side {size}"
    crop = int(data_config["img_size"])
    stride = window_stride(crop, data_config.get("stride"))
    return ((split_key, size, mode, crop, stride),
            f"split {split!r}, {crop}-px sliding windows {stride} px apart at short side {size}")


def eval_loader(split, data_config: dict, workers: int, device, distributed: bool = False):
    """Batches of one (image resized to the eval size, mask at its own size) over ``split``, each rank a share."""
    from ..data import create_loader

    transform = EvalTransform(data_config["eval_size"], data_config["mean"], data_config["std"])
    return create_loader(SegmentationDataset(split), None, 1, is_training=False, transform=transform,
                         num_workers=workers, device=device, distributed=distributed, normalize_on_device=False,
                         max_unreadable=0.0)


def metrics_row(metrics: dict) -> dict:
    """Metrics as summary.csv / results-file columns (text with 4 decimals): eval_miou, eval_pixel_acc, eval_macc,
    iou_<class>..."""
    row = dict(eval_miou=f"{metrics['miou']:.4f}", eval_pixel_acc=f"{metrics['pixel_acc']:.4f}",
               eval_macc=f"{metrics['macc']:.4f}")
    row.update({f"iou_{name}": f"{value:.4f}" for name, value in metrics["per_class_iou"].items()})
    return row


@dataclass
class SegmentValidationResult:
    """What :func:`validate_segmenter` measured: ``miou``, ``pixel_acc`` and ``macc`` (mean class accuracy), in
    percent; ``per_class_iou`` {class name: IoU percent, nan for a class with none}; the labelled ``pixels`` and
    the ``images`` scored; the ``checkpoint`` ("" for a model in memory), ``split`` and ``eval_mode``.
    ``result["miou"]`` reads a field too; :meth:`as_dict` is what ``--results-file`` holds."""
    miou: float
    pixel_acc: float
    macc: float
    pixels: int
    per_class_iou: dict[str, float] = field(default_factory=dict)
    images: int = 0
    nonfinite: int = 0  # images whose logits held a NaN or a +inf (the metrics are then NaN)
    checkpoint: str = ""
    split: str = "val"
    eval_mode: str = "whole"

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_segmenter(checkpoint: str | os.PathLike = "", data: str | os.PathLike = "", split: str = "val", *,
                       model: nn.Module | None = None, eval_mode: str | None = None, stride: int | None = None,
                       eval_size: int | None = None, workers: int = 0, device: str | None = None,
                       results_file: str = "") -> SegmentValidationResult:
    """mIoU, pixel accuracy and per-class IoU of a segmenter on ``split`` of the dataset folder ``data``, as
    ``sequencer segment validate`` computes them, as a :class:`SegmentValidationResult`.

    ``checkpoint``: a ``segment train`` checkpoint, evaluated with its own settings (layout, classes,
    normalisation, eval size and mode; ``eval_mode`` / ``stride`` / ``eval_size`` override them). Or ``model``: a
    segmenter in memory (:func:`sequencer.create_segmenter`'s, or any module with ``num_classes`` returning
    (N, num_classes, H, W) logits), evaluated as it is on its own device (or on ``device`` when one is given),
    then given back as it was: on its own device, in the mode it was in, each submodule's too, also when
    evaluation raises; its backbone's normalisation (ImageNet's for another module), ``eval_size`` (default 512,
    also the sliding window), the layout and class names of the folder. With ``results_file`` (.json) the results
    are also written there (by rank 0). Under torchrun, or in the caller's process group, call it on every process:
    each evaluates a share of the split and every rank returns the counts summed over them. The caller's
    ``random``, ``numpy`` and torch random state is restored on return (building a checkpoint's segmenter draws its
    initial weights from it)."""
    from .inference import resolve_device

    if (model is None) == (not checkpoint):
        raise SequencerError("validate_segmenter: pass a checkpoint or a model in memory, one of them")
    if not data:
        raise SequencerError("validate_segmenter: no dataset folder given", hint="give `data`, the dataset folder")
    resolve_device(device)  # a bad `device` is one line before a process group is joined
    if model is not None:
        check_float32_weights(model, "validate_segmenter")
    with own_modes(), caller_state_kept(), caller_module_kept(model), workers_stopped_on_exit(), \
            process_group(device) as info:
        loaded, dev = (_in_memory(model, device, info) if model is not None
                       else (load_segmenter(checkpoint, info.device), info.device))
        data_split, cfg = _split_and_settings(loaded, data, split, eval_size, in_memory=model is not None)
        settings = inference_settings(cfg, eval_mode, stride, dev)
        metrics = evaluate_segmentation(loaded.model, eval_loader(data_split, cfg, workers, dev, info.distributed),
                                        loaded.model.num_classes, loaded.class_names, settings, info.distributed)
    result = SegmentValidationResult(**metrics, checkpoint=os.fspath(checkpoint), split=split,
                                     eval_mode=settings.mode)
    if results_file and info.is_primary:
        text = json.dumps(result.as_dict(), indent=2, allow_nan=True)
        write_atomically(results_file, lambda tmp: Path(tmp).write_text(text + "\n"), what="results file")
    return result


def _in_memory(model: nn.Module, device: str | None, info: DistInfo) -> tuple[LoadedSegmenter, torch.device]:
    """The caller's segmenter as a :class:`LoadedSegmenter` and the device it runs on (its own, or ``device``
    where given, this process's under torchrun: it is moved there, and :func:`validate_segmenter` puts it back);
    its data settings hold only its backbone's name (the rest come from the call and the folder:
    :func:`_split_and_settings`)."""
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise SequencerError(f"validate_segmenter: `model={type(model).__name__}` has no `num_classes`",
                             hint="pass a segmenter from sequencer.create_segmenter, or set its num_classes")
    if device is not None:
        model.to(info.device)
    backbone = (getattr(model, "config", None) or {}).get("backbone")
    return LoadedSegmenter(model, [], {"backbone": backbone}, {}), next(model.parameters()).device


def _split_and_settings(loaded: LoadedSegmenter, data, split: str, eval_size: int | None,
                        in_memory: bool) -> tuple:
    """(the checked split, the data settings to evaluate with): a checkpoint's own (``eval_size`` overriding its
    eval size), or for a model in memory the folder's layout and class names at short side ``eval_size`` (512)."""
    cfg = loaded.data_config
    data_split = open_split(data, split, cfg.get("layout", ""), num_classes=loaded.model.num_classes,
                            reduce_zero_label=cfg.get("reduce_zero_label"), class_names=loaded.class_names or None)
    if in_memory:
        loaded.class_names = list(data_split.class_names)
        return data_split, segment_data_config(cfg["backbone"], eval_size or 512, None, "whole", None,
                                               data_split.layout, data_split.reduce_zero_label)
    return data_split, dict(cfg, eval_size=eval_size) if eval_size else cfg


# -------------------------------------------------------------------------------------------------- predict
def predict_files(checkpoint: str, files: list[Path], output: str, *, overlay: bool = False,
                  eval_mode: str | None = None, stride: int | None = None, device: str | None = None,
                  alpha: float = 0.5) -> list[Path]:
    """Segment each image file; write ``OUTPUT/<stem>.png`` (palette PNG of the dataset's label ids, VOC colours:
    class indices, or for a reduce-zero-label model such as ADE20K's class k as id k + 1, as its masks have it)
    and with ``overlay`` ``OUTPUT/<stem>_overlay.jpg`` (the picture with the classes blended over it), each marked as
    this function's (:data:`PREDICT_MARK`); a file of that name that is not marked (a folder's ground-truth mask of
    that name) is not replaced: SequencerError before any work. Returns the masks written. Unreadable images raise
    SequencerError naming the file before anything is written for it. The caller's ``random``, ``numpy`` and torch
    random state is restored on return (building the segmenter draws its initial weights from it)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from ..data.images import READ_ERRORS, load_image
    from .inference import resolve_device

    out = Path(output)
    if out.exists() and not out.is_dir():  # before any work: the masks go in a folder
        raise SequencerError(f"`output={output!r}` is a file, not a folder", hint="pass a folder for the masks")
    _check_mask_names(files, out)
    _check_no_image_replaced(files, out, overlay)
    _check_only_predictions_replaced(files, out, overlay)
    dev = resolve_device(device)
    with caller_state_kept():
        loaded = load_segmenter(checkpoint, dev)
    cfg = loaded.data_config
    settings = inference_settings(cfg, eval_mode, stride, dev)
    transform = EvalTransform(cfg["eval_size"], cfg["mean"], cfg["std"])
    with output_folder(out, "`output` folder"):  # a first image that fails leaves no empty folder behind
        palette = voc_palette()
        written = []
        for file in files:
            try:
                picture = load_image(file)
            except READ_ERRORS as e:
                raise SequencerError(f"image {file} is unreadable ({e})") from None
            image = transform.image(TF.pil_to_tensor(picture))[None].to(dev)
            with torch.inference_mode():
                pred = predict_mask(loaded.model, image, (picture.height, picture.width), settings)
            # in the label ids of the dataset's own masks: a reduce-zero-label model's class k is id k + 1 (ADE20K: 0
            # is "other"), as its annotation files and the benchmark's submissions have it
            pred = pred + 1 if cfg.get("reduce_zero_label") else pred
            mask = Image.fromarray(pred.to(torch.uint8).cpu().numpy())
            mask.putpalette(palette)  # L -> P: the indices stay, the palette colours them
            target = out / f"{file.stem}.png"
            write_atomically(target, lambda tmp: mask.save(tmp, format="PNG", pnginfo=_png_mark()), what="mask")
            written.append(target)
            if overlay:
                blended = Image.blend(picture, mask.convert("RGB"), alpha)
                write_atomically(out / f"{file.stem}_overlay.jpg",
                                 lambda tmp: blended.save(tmp, format="JPEG", quality=90, comment=PREDICT_MARK),
                                 what="overlay")
    return written


# what marks a mask (PNG text "Software") or an overlay (JPEG comment) as written by predict_files: a later run may
# replace those, and nothing else
PREDICT_MARK = "sequencer segment predict"


def _png_mark():
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Software", PREDICT_MARK)
    return info


def _outputs(files: list[Path], out: Path, overlay: bool) -> list[Path]:
    """The files :func:`predict_files` writes for ``files``: each one's mask, then with ``overlay`` its overlay."""
    return [out / f"{file.stem}{end}" for file in files for end in (".png", "_overlay.jpg")[:1 + overlay]]


def _written_by_predict(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            mark = image.info.get("Software") or image.info.get("comment")
    except (OSError, UnidentifiedImageError):
        return False
    return mark in (PREDICT_MARK, PREDICT_MARK.encode())


def _check_only_predictions_replaced(files: list[Path], out: Path, overlay: bool) -> None:
    """SequencerError, before any work, where a mask or overlay would replace a file that no earlier predict wrote
    (predicting VOC's JPEGImages/x.jpg into its SegmentationClass/ replaced the ground-truth x.png)."""
    for target in _outputs(files, out, overlay):
        if os.path.lexists(target) and not _written_by_predict(target):
            raise SequencerError(f"{target} exists and is not marked as written by `sequencer segment predict` "
                                 f"(nor are its files from before 2026-12-07); refusing to replace it",
                                 hint="pass another `output` folder, or remove the file")


def _check_no_image_replaced(files: list[Path], out: Path, overlay: bool) -> None:
    """SequencerError, before any work, where a mask or overlay would be written over one of the images (an
    ``output`` folder holding them: ``x.png``'s mask is ``x.png``)."""
    clash = input_overwritten(_outputs(files, out, overlay), files)
    if clash:
        what = "overlay" if clash[0].name.endswith("_overlay.jpg") else "mask"
        raise SequencerError(f"the {what} {clash[0]} would replace the image {clash[1]}",
                             hint="pass another `output` folder")


def _check_mask_names(files: list[Path], out: Path) -> None:
    """SequencerError, before any work, for two images whose masks would have one name (``a/x.jpg``, ``b/x.png``:
    the second mask replaced the first); names differing only in case count as one, as on macOS and Windows."""
    first: dict[str, Path] = {}
    for file in files:
        name = f"{file.stem}.png"
        earlier = first.setdefault(name.casefold(), file)
        if earlier != file:
            raise SequencerError(f"images {earlier} and {file} would both be written to {out / name}",
                                 hint="predict them into separate `output` folders, or rename one")
