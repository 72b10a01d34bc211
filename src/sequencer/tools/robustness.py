"""`sequencer robustness`: ImageNet-C corruption errors, CE and mCE (Hendrycks & Dietterich, ICLR 2019), by the
protocol of the Sequencer paper's evaluation.

Layout: ``DATA_C/<corruption>/<severity 1-5>/<class>/<image>`` (a grouping folder such as ``noise/`` above the
corruptions is allowed). The protocol:

* the corrupted images are already 224 px crops, so they are resized to the model's input size and not cropped
  again (``crop_pct`` 1.0, whatever the model's own eval crop);
* the 15 standard corruptions (the 4 extra ones, or folders of other names, only when named by ``--corruptions``);
  standard ones absent from the folder are named in a warning (the mCE is then over those present);
* for each corruption c the top-1 error E(s, c) at severities s = 1..5, averaged: E_c = mean_s E(s, c);
* ``CE_c = E_c / E_AlexNet,c`` (the paper's ratio of sums over the five severities) and ``mCE`` = mean CE over the
  corruptions with an AlexNet reference; ``unnormalized_mCE`` = the mean of E_c over the same corruptions.
* a corruption lacking a severity folder is averaged over the ones present, with a warning; the JSON records the
  severities each corruption used (``severities``) and those missing (``protocol.missing_severities``).

All figures are fractions. With ``--clean`` (evaluated with the model's own preprocessing, as the clean ImageNet
numbers are) the relative CE is (E_c - E_clean) / (E_AlexNet,c - E_AlexNet,clean) and its mean the relative mCE.
Corruptions without an AlexNet reference are reported without CE. The JSON records the protocol it followed.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..data.class_folders import is_hidden, walk_images
from ..data.loader_workers import workers_stopped_on_exit
from ..engine.evaluate import evaluate
from ..engine.inference import LoadedModel, eval_loader, split_to_evaluate
from ..errors import SequencerError
from ..fileio import existing_folder

_logger = logging.getLogger(__name__)

# AlexNet's top-1 error on each ImageNet-C corruption, averaged over severities 1-5: the normalisers of CE.
# Source: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
# ICLR 2019, as published in https://github.com/hendrycks/robustness (README, "Use these values to normalize raw
# corruption error to calculate mCE"). The first 15 are the standard benchmark, the last 4 the extra corruptions.
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
    # extra corruptions
    "speckle_noise": 0.845388,
    "gaussian_blur": 0.787108,
    "spatter": 0.717512,
    "saturate": 0.658248,
}
STANDARD_CORRUPTIONS = tuple(list(ALEXNET_ERRORS)[:15])
# AlexNet's clean ImageNet top-1 error, the reference of relative mCE: torchvision's AlexNet (the model whose
# ImageNet-C errors are tabulated above) has 56.522% top-1 accuracy, i.e. 43.48% error (torchvision model docs).
ALEXNET_CLEAN_ERROR = 0.43478
SEVERITIES = ("1", "2", "3", "4", "5")
# ImageNet-C's images are 224 px centre crops already: the protocol resizes them without cropping
PROTOCOL_CROP_PCT = 1.0


def find_corruptions(root: str) -> dict[str, Path]:
    """Corruption name -> folder, for every folder under ``root`` (depth <= 2) holding severity folders 1-5; hidden
    folders (``.ipynb_checkpoints``, a macOS zip's ``__MACOSX``: `is_hidden`) are not data."""
    base = existing_folder(root, "ImageNet-C folder", hint="pass the folder that holds CORRUPTION/SEVERITY/CLASS/IMAGE")

    def folders(parent: Path) -> list[Path]:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not is_hidden(p.name))

    def holds_severities(folder: Path) -> bool:
        return any((folder / s).is_dir() for s in SEVERITIES)

    found: dict[str, Path] = {}
    for level1 in folders(base):
        # a corruption's own sub-folders are its severities: classes named 1-5 below them are not corruptions
        candidates = [level1] if holds_severities(level1) else folders(level1)
        for folder in candidates:
            if holds_severities(folder):
                if folder.name in found:
                    raise SequencerError(f"corruption {folder.name!r} found twice: {found[folder.name]} and {folder}")
                found[folder.name] = folder
    if not found:
        raise SequencerError(f"no corruption folders in {root!r}",
                             hint="expected DATA_C/CORRUPTION/SEVERITY(1-5)/CLASS/IMAGE, e.g. gaussian_noise/3/...")
    return found


def corruption_summary(severity_errors: dict[str, float], name: str, clean_error: float | None = None) -> dict:
    """error (mean over the severities evaluated: ``severities``), ce and relative_ce (when AlexNet has a
    reference) for one corruption."""
    error = sum(severity_errors.values()) / len(severity_errors)
    out = {"errors": dict(severity_errors), "severities": sorted(int(s) for s in severity_errors), "error": error}
    ref = ALEXNET_ERRORS.get(name)
    if ref is not None:
        out["ce"] = error / ref
        if clean_error is not None:
            out["relative_ce"] = (error - clean_error) / (ref - ALEXNET_CLEAN_ERROR)
    return out


def summarize(per_corruption: dict[str, dict], clean_error: float | None = None) -> dict:
    """The results object: ``corruptions``, ``mCE`` and ``unnormalized_mCE`` (means over the corruptions with an
    AlexNet reference), the protocol followed, and friends."""
    referenced = [c for c in per_corruption.values() if "ce" in c]
    missing_severities = _missing_severities(per_corruption)
    # the number papers report: all 15 standard corruptions, each at all five severities
    standard = [per_corruption[n]["ce"] for n in STANDARD_CORRUPTIONS
                if n in per_corruption and n not in missing_severities]
    results = {
        "corruptions": per_corruption,
        "mCE": _mean(c["ce"] for c in referenced),
        "unnormalized_mCE": _mean(c["error"] for c in referenced),
        "mCE_standard15": sum(standard) / len(standard) if len(standard) == len(STANDARD_CORRUPTIONS) else None,
        "mean_error": _mean(c["error"] for c in per_corruption.values()),
        "without_ce": sorted(n for n, c in per_corruption.items() if "ce" not in c),
        "protocol": {"crop_pct": PROTOCOL_CROP_PCT, "corruptions": list(per_corruption),
                     "severities": sorted({s for c in per_corruption.values() for s in _severities(c)}),
                     "missing_severities": missing_severities, "normaliser": "alexnet"},
    }
    if clean_error is not None:
        results["clean_error"] = clean_error
        results["relative_mCE"] = _mean(c["relative_ce"] for c in per_corruption.values() if "relative_ce" in c)
    return results


def _severities(corruption: dict) -> list[int]:
    return corruption.get("severities") or sorted(int(s) for s in corruption["errors"])


def _missing_severities(per_corruption: dict[str, dict]) -> dict[str, list[int]]:
    """{corruption: the severities 1-5 it lacks}, for the corruptions evaluated on fewer than five."""
    every = [int(s) for s in SEVERITIES]
    missing = {name: [s for s in every if s not in _severities(c)] for name, c in per_corruption.items()}
    return {name: m for name, m in missing.items() if m}


def severity_line(severity_errors: dict[str, float]) -> str:
    """The per-severity errors labelled by severity, with the missing ones named: ``s1 0.100 s2 0.200 ... (no s4)``."""
    missing = [s for s in SEVERITIES if s not in severity_errors]
    return " ".join(f"s{s} {e:.3f}" for s, e in severity_errors.items()) + \
        (f" (no {', '.join('s' + s for s in missing)})" if missing else "")


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def select_corruptions(found: dict[str, Path], requested: list[str] | None, root: str) -> dict[str, Path]:
    """The protocol's 15 standard corruptions present in ``found``, or exactly the ``requested`` ones."""
    if requested:
        unknown = sorted(set(requested) - set(found))
        if unknown:
            raise SequencerError(f"corruption(s) {', '.join(unknown)} not found in {root!r}",
                                 hint=f"found: {', '.join(found)}")
        return {n: found[n] for n in requested}
    standard = {n: found[n] for n in STANDARD_CORRUPTIONS if n in found}
    if not standard:
        raise SequencerError(f"none of the 15 standard ImageNet-C corruptions in {root!r}",
                             hint=f"found: {', '.join(found)}; name others with `corruptions`")
    absent = [n for n in STANDARD_CORRUPTIONS if n not in standard]
    if absent:
        _logger.warning(f"warning: {len(absent)} of the 15 standard corruptions are not in {root!r} "
                        f"({', '.join(absent)}): the mCE is the mean over the {len(standard)} present, not "
                        f"comparable to a published mCE")
    others = sorted(set(found) - set(standard))
    if others:
        _logger.info(f"note: skipping {', '.join(others)} (not among the 15 standard corruptions; name them with "
                    f"`corruptions` to include them)")
    return standard


def _check_every_severity_holds_images(corruptions: dict[str, Path]) -> None:
    """SequencerError naming the first severity folder without an image, before anything is evaluated: it was
    found only when its turn came, after every corruption before it (hours, on ImageNet-C)."""
    for folder in corruptions.values():
        for severity in SEVERITIES:
            if (folder / severity).is_dir() and next(walk_images(str(folder / severity)), None) is None:
                raise SequencerError(f"no images found in {str(folder / severity)!r}",
                                     hint="every severity folder holds CLASS/IMAGE files; remove an empty one to "
                                          "evaluate the severities present")


@workers_stopped_on_exit()
def mean_corruption_error(loaded: LoadedModel, corruptions: dict[str, Path], batch_size: int = 64, workers: int = 0,
                          device="cpu", clean: str | None = None, clean_split: str | None = None) -> dict:
    """Corruption errors, CEs and mCE of ``loaded`` on ``corruptions`` ({name: folder of severity folders}, e.g.
    :func:`select_corruptions`), by the paper's protocol (resize, no crop); with ``clean`` (a dataset folder, its
    ``clean_split`` evaluated with the model's own preprocessing; by default the split validate evaluates:
    :func:`~sequencer.engine.inference.split_to_evaluate`) also the relative mCE. Logs one line per
    corruption (INFO); returns :func:`summarize`'s dict."""
    def error_of(folder: str, split: str, crop_pct: float | None) -> float:
        loader = eval_loader(folder, split, loaded, loaded.input_size, batch_size, workers, device, crop_pct)
        metrics = evaluate(loaded.model, loader, device)
        if metrics["count"] == 0:
            raise SequencerError(f"no readable images in {folder!r}")
        return 1.0 - metrics["top1"] / 100.0

    _check_every_severity_holds_images(corruptions)
    clean_error = None
    if clean:
        # clean images: the model's own preprocessing
        clean_error = error_of(clean, split_to_evaluate(loaded.checkpoint, clean, clean_split), None)
        _logger.info(f"clean: error {clean_error:.4f}")
    per_corruption = {}
    for name, folder in corruptions.items():
        # the corruption folder's splits are its severities (a class folder named 1-5 is no split)
        severity_errors = {s: error_of(str(folder), s, PROTOCOL_CROP_PCT) for s in SEVERITIES
                           if (folder / s).is_dir()}
        if len(severity_errors) < len(SEVERITIES):
            warnings.warn(f"{name}: only severities {', '.join(severity_errors)} present; its CE is not comparable "
                          f"to published ones (AlexNet's reference averages all five)", stacklevel=1)
        per_corruption[name] = c = corruption_summary(severity_errors, name, clean_error)
        _logger.info(f"{name:>18}: error {c['error']:.4f}" + (f"  CE {c['ce']:.4f}" if "ce" in c else "  (no AlexNet CE)")
                    + "  errors by severity " + severity_line(severity_errors))
    return summarize(per_corruption, clean_error)
