"""Transforms, data config and the loader that feeds batches to a device.

Transforms are timm's (`timm.data.create_transform`: RandomResizedCrop, RandAugment, colour jitter, random
erasing, ...); the eval transform is resize to ``size / crop_pct`` then centre-crop ``size``. Training and
`sequencer validate` both build their eval loader here, so a checkpoint validates to the accuracy training logged.
"""
from __future__ import annotations

import copy
import itertools
import logging
import multiprocessing
from collections.abc import Mapping

import torch
import torch.utils.data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import create_transform as timm_create_transform
from torch.utils.data import DataLoader, default_collate

from ..choices import INTERPOLATIONS
from ..errors import SequencerError
from .augment import keep_zero_bit_posterize
from .datasets import READ_ERRORS, UnreadableImageError
from .loader_workers import track

_logger = logging.getLogger(__name__)


# timm's training-augmentation defaults, used unless the caller or the dataset (``augment_defaults``) says otherwise
TIMM_AUGMENT_DEFAULTS = dict(hflip=0.5, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), color_jitter=0.4)


def resolve_data_config(args_or_dict=None, model: torch.nn.Module | None = None, recorded: Mapping | None = None
                        ) -> dict:
    """Input size and preprocessing: explicit options first, then what a run ``recorded`` (a checkpoint's
    ``data_config``), then the model's ``pretrained_cfg``, then defaults.

    ``args_or_dict`` (a dict, or an object whose attributes are the options) may hold ``input_size`` (C, H, W), ``img_size``, ``mean``,
    ``std``, ``crop_pct`` and ``interpolation``; None values are ignored. A checkpoint's ``data_config`` works too.
    Recorded statistics are defaults, not options: for a 1-channel input, RGB ones are averaged as the model's are.
    Returns dict(input_size=(C, H, W), mean, std, crop_pct, interpolation).
    """
    if args_or_dict is None or isinstance(args_or_dict, Mapping):
        args = dict(args_or_dict or {})
    else:
        args = vars(args_or_dict)
    args = {k: v for k, v in args.items() if v is not None}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {}) if model is not None else {}
    in_chans = int(getattr(model, "in_chans", 0) or (cfg.get("input_size") or (3,))[0])
    cfg.update({k: v for k, v in (recorded or {}).items() if k in ("mean", "std", "crop_pct", "interpolation")})

    if args.get("input_size"):
        input_size = tuple(int(v) for v in args["input_size"])
        if len(input_size) != 3:
            raise SequencerError(f"input size {args['input_size']} must be C H W")
    elif args.get("img_size"):
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        input_size = (in_chans, int(h), int(w))
    elif cfg.get("input_size"):
        input_size = tuple(int(v) for v in cfg["input_size"])
    else:
        input_size = (in_chans, 224, 224)
    if min(input_size) <= 0:
        raise SequencerError(f"input size {' '.join(map(str, input_size))} must be positive")

    def per_channel(key, default):
        given = key in args
        value = args[key] if given else cfg.get(key, default)
        value = (value,) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(value) == 1:
            value = value * input_size[0]
        if len(value) != input_size[0] and not given and input_size[0] == 1:
            value = (sum(value) / len(value),)  # a 1-channel (grayscale) input: the average of the RGB statistics
        if len(value) != input_size[0]:
            source = f"`{key}`" if given else f"the {key} the model or its checkpoint gives"
            raise SequencerError(f"{source} has {len(value)} values for {input_size[0]} input channels",
                                 hint=f"pass `{key}` with {input_size[0]} values")
        return tuple(float(v) for v in value)

    mean = per_channel("mean", IMAGENET_DEFAULT_MEAN)
    std = per_channel("std", IMAGENET_DEFAULT_STD)
    if any(s <= 0 for s in std):
        raise SequencerError(f"`std={' '.join(map(str, std))}` must be positive")
    crop_pct = float(args.get("crop_pct", cfg.get("crop_pct", 0.875)))
    if not 0 < crop_pct <= 2:
        raise SequencerError(f"`crop_pct={crop_pct}` must be in (0, 2] (1.0 = no crop)")
    interpolation = str(args.get("interpolation", cfg.get("interpolation", "bicubic"))) or "bicubic"
    one_each = [name for name in INTERPOLATIONS if name != "random"]  # the eval resize is one interpolation
    if interpolation == "random":
        raise SequencerError("`interpolation=random`: the evaluation resize takes one interpolation ('random' is "
                             "for `train_interpolation`)", hint=f"one of {', '.join(one_each)}")
    if interpolation not in INTERPOLATIONS:
        raise SequencerError(f"unknown `interpolation={interpolation}`", hint=f"one of {', '.join(one_each)}")
    return dict(input_size=input_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)


def create_transform(input_size, is_training: bool = False, *, mean=IMAGENET_DEFAULT_MEAN,
                     std=IMAGENET_DEFAULT_STD, crop_pct: float | None = None, interpolation: str = "bicubic",
                     hflip: float = 0.5, vflip: float = 0.0, scale=None, ratio=None, color_jitter: float = 0.4,
                     auto_augment: str | None = None, re_prob: float = 0.0, re_mode: str = "pixel",
                     re_count: int = 1, uint8_output: bool = False):
    """PIL RGB image -> normalised float tensor (C, H, W) via timm's transform factory.

    ``input_size`` is an int or (C, H, W); a 1-channel size converts to grayscale first. ``uint8_output``:
    uint8 (C, H, W) instead, neither normalised nor erased (`DeviceNormalize` does both on the batch). A 0-bit
    posterize in the ``auto_augment`` policy gives a black image, as on the Pillow the paper trained with
    (`augment`).
    """
    from torchvision import transforms

    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    input_size = tuple(input_size)
    if input_size[0] not in (1, 3):
        raise SequencerError(f"images have 3 (or 1) channels, not {input_size[0]}")
    kwargs = dict(input_size=input_size, is_training=is_training, mean=tuple(mean), std=tuple(std),
                  interpolation=interpolation, crop_pct=crop_pct, use_prefetcher=uint8_output)
    if is_training:
        kwargs.update(hflip=hflip, vflip=vflip, scale=tuple(scale) if scale else None,
                      ratio=tuple(ratio) if ratio else None, color_jitter=color_jitter, auto_augment=auto_augment,
                      re_prob=re_prob, re_mode=re_mode, re_count=re_count)
    transform = keep_zero_bit_posterize(timm_create_transform(**kwargs))
    if input_size[0] == 1:
        transform = transforms.Compose([transforms.Grayscale(1), transform])
    return transform


class DeviceNormalize:
    """uint8 batch (N, C, H, W) on the device -> float, normalised by ``mean``/``std`` (0-1 scale), then timm's
    random erasing (``re_prob`` > 0) on the device: the work timm's CUDA prefetcher takes off the CPU workers."""

    def __init__(self, mean, std, device, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1):
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(shape)
        self.std = torch.tensor([255.0 * v for v in std], device=device).view(shape)
        self.erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().sub_(self.mean).div_(self.std)
        return self.erase(images) if self.erase is not None else images


def _with_transform(dataset, transform):
    """A shallow copy of ``dataset`` reading with ``transform``; the caller's dataset keeps its own transform (and
    shares its ``skipped`` record: the unreadable files of its images, found through any loader)."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


class _SkippingView(torch.utils.data.Dataset):
    """What the DataLoader indexes: items ``(image, target, unreadable files)``.

    For training an unreadable image is replaced by the next readable one (batches keep their size, as Mixup
    needs); for evaluation it is dropped (image None), so metrics cover exactly the readable images.
    """

    MAX_REPLACEMENTS = 16

    def __init__(self, dataset, replace: bool):
        self.dataset = dataset
        self.replace = replace

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # loader.dataset.class_names etc. reach the real dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        """``key`` is an index, or ``(index, batch seed or None)`` from a `_BatchSeededSampler`."""
        index, *batch_seed = key if isinstance(key, tuple) else (key,)
        if batch_seed and batch_seed[0] is not None:
            _seed_worker_for_batch(batch_seed[0])
        failed = []
        for attempt in range(self.MAX_REPLACEMENTS if self.replace else 1):
            try:
                img, target = self.dataset[(index + attempt) % len(self.dataset)]
                return img, target, failed
            except UnreadableImageError as e:
                failed.append(e.path)
        return None, -1, failed


def _seed_worker_for_batch(seed: int) -> None:
    """In a data-loader worker, seed random, numpy and torch with ``seed`` as a batch begins (its first item). A
    batch's augmentation then depends on the seed, rank, epoch and its place in the pass only, not on which worker
    loads it nor on how many there are: a pass resumed after its first batches, with any ``num_workers``, draws
    what the whole pass drew. No-op in the main process (``num_workers=0`` draws from the process's own state)."""
    import random

    import numpy as np
    if torch.utils.data.get_worker_info() is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _BatchSeededSampler(torch.utils.data.Sampler):
    """``base``'s indices less the first ``skip`` of the pass, each as ``(index, batch seed)`` (``keyed``, for
    data-loader workers; else plain indices): the seed, ``pass_seed`` plus the batch's number in the pass, goes with a
    batch's first item, None with the others. The loader sets ``pass_seed`` and ``skip`` before each pass."""

    def __init__(self, base, batch_size: int, keyed: bool = True):
        self.base, self.batch_size, self.keyed = base, batch_size, keyed
        self.pass_seed = self.skip = 0

    def __len__(self):
        return len(self.base)

    def __getattr__(self, name):  # set_epoch, epoch, ... of the wrapped sampler
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __iter__(self):
        kept = itertools.islice(enumerate(self.base), self.skip, None)
        if not self.keyed:
            return (index for _, index in kept)
        return ((index, self._batch_seed(place)) for place, index in kept)

    def _batch_seed(self, place: int) -> int | None:
        batch, within = divmod(place, self.batch_size)
        return (self.pass_seed + batch) % 2 ** 63 if within == 0 else None


def _collate(batch):
    """Default collate of the readable samples, plus the unreadable files: (images | None, targets | None, files,
    own files). An item's own file is the first it failed on; the others are replacements it tried, which under DDP
    may lie in another rank's share."""
    failed = [path for _, _, paths in batch for path in paths]
    own = [paths[0] for _, _, paths in batch if paths]
    good = [(img, target) for img, target, _ in batch if img is not None]
    if not good:
        return None, None, failed, own
    images, targets = default_collate(good)
    return images, targets, failed, own


class _ShardSampler(torch.utils.data.Sampler):
    """Rank ``r`` of ``w`` gets indices r, r+w, r+2w, ...: every sample exactly once, no padding (exact eval)."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class _EpochRandomSampler(torch.utils.data.Sampler):
    """A random permutation that depends only on ``seed`` and the epoch (``set_epoch``, like DistributedSampler)."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


def _worker_errors_as_one_line(batches):
    """``batches``, with an exception raised inside a data-loader worker re-raised as one SequencerError line.

    The DataLoader re-raises a worker's exception with the worker's whole traceback in its message; under
    torchrun every rank would print it. The last line of that traceback names the error.
    """
    try:
        yield from batches
        return
    except Exception as e:
        text = str(e)
        if not text.startswith("Caught ") or "DataLoader worker" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        e.__traceback__ = None  # it and the frame that raised it hold each other: freed now, not at a collection
    # raised out here, with no context, and ``batches`` let go: the worker's error, whose traceback runs through the
    # DataLoader's iterator, and this frame, held that iterator (its pipes, its batches' shared memory) for as long
    # as the caller kept the error
    batches = None  # noqa: F841
    raise SequencerError(f"a data-loader worker failed: {last}", hint="run with -j 0 to see the full traceback")


def augmentation_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed for the data workers of process ``rank`` in ``epoch``, distinct per (seed, rank, epoch)."""
    import numpy as np
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _callers_start_method() -> multiprocessing.context.BaseContext:
    """The context the workers start in: the caller's start method, else the platform's default, taken without
    fixing it for the process. The DataLoader's own default (``multiprocessing``'s module functions) fixed it: after
    a call with workers, the caller's ``multiprocessing.set_start_method("spawn")`` raised 'context has already been
    set'."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return multiprocessing.get_context(method)


class ImageLoader(DataLoader):
    """A DataLoader yielding ``(images (N, C, H, W) float, targets (N,) long)`` already on ``device``.

    Unreadable images are skipped with a warning naming each file (once per file); ``loader.skipped`` lists the
    files skipped in the current/latest pass (for the epoch log) and ``loader.dataset.skipped`` all seen so far.
    More than ``max_unreadable`` (a fraction) of a pass unreadable aborts with a SequencerError listing them. Under
    DDP (``world_size`` ranks, each loading its share) a rank stops once its own share passes the whole pass's
    allowance, and `check_unreadable`, given every rank's files at the end of the pass, applies the exact limit.
    Shuffling depends only on ``seed`` and the epoch, the workers' augmentation of a batch on ``seed``, the epoch,
    the process's ``rank`` and the batch's place in the pass (not on the worker or ``num_workers``), so no two
    batches of a run draw alike and a resumed run sees the same batches: the epoch is what ``loader.set_epoch(e)``
    or ``loader.sampler.set_epoch(e)`` set before the pass, otherwise one more than the previous pass's.
    """

    def __init__(self, dataset, *, device, max_unreadable: float, seed: int, rank: int = 0, world_size: int = 1,
                 on_device=None, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("multiprocessing_context") is None:
            kwargs["multiprocessing_context"] = _callers_start_method()
        super().__init__(dataset, **kwargs)
        self.on_device = on_device  # uint8 batch -> normalised (and erased) float batch, on the device
        self.device = torch.device(device)
        self.max_unreadable = max_unreadable
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skipped: list[str] = []
        self._skipped_set: set[str] = set()  # the same files, for membership checks
        self._own_unreadable: set[str] = set()  # the unreadable files of this pass's own indices
        self._last_epoch: int | None = None
        self._explicit_epoch: int | None = None
        self._skip_batches = 0
        track(self)  # its workers end with the library call that made it (loader_workers)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Fix the shuffle order (and the distributed sampler's) for ``epoch``; call before iterating. The next
        pass leaves out its first ``skip_batches`` batches (an epoch resumed where it was interrupted) without
        loading them; the rest are the same images in the same batches."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(epoch))
        self._explicit_epoch = int(epoch)
        self._skip_batches = int(skip_batches)

    def _pass_epoch(self) -> int:
        explicit, self._explicit_epoch = self._explicit_epoch, None
        current = getattr(self.sampler, "epoch", None)
        if explicit is not None:
            return explicit
        if current is not None and current != self._last_epoch:
            return current  # the caller used sampler.set_epoch
        return 0 if self._last_epoch is None else self._last_epoch + 1

    def __iter__(self):
        epoch = self._last_epoch = self._pass_epoch()
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        pass_seed = augmentation_seed(self.seed, self.rank, epoch)
        if self.generator is not None:
            # the DataLoader draws its base seed from this generator and gives worker k ``base + k``; the main
            # process (num_workers=0) draws from it too. Mixing in the rank keeps the ranks' workers apart.
            self.generator.manual_seed(pass_seed)
        self.sampler.pass_seed = pass_seed  # the workers seed each batch from it (_seed_worker_for_batch)
        self.sampler.skip, self._skip_batches = self._skip_batches * self.batch_size, 0
        self.skipped, self._skipped_set, self._own_unreadable = [], set(), set()
        non_blocking = self.device.type == "cuda"
        try:
            for images, targets, failed, own in _worker_errors_as_one_line(super().__iter__()):
                if failed:
                    self._note_unreadable(failed, own)
                if images is None:
                    continue
                images = images.to(self.device, non_blocking=non_blocking)
                if self.on_device is not None:
                    images = self.on_device(images)
                yield images, targets.to(self.device, non_blocking=non_blocking)
        except BaseException:
            images = targets = None  # the batch in hand (shared memory under workers): an error's traceback holds us
            raise

    def pass_images(self) -> int:
        """The images of a whole pass, every rank's (a rank loads about 1/``world_size`` of them)."""
        return len(self.dataset) if self.world_size > 1 else len(self.sampler)

    def _note_unreadable(self, failed: list[str], own: list[str]) -> None:
        """Record and warn about the unreadable ``failed`` files; raise once the pass's own ones (``own``: of this
        rank's indices, not the replacements tried, which may be another rank's) pass ``max_unreadable`` of the
        whole pass: one rank's count never exceeds the pass's, so no rank refuses what one process accepts."""
        seen = getattr(self.dataset.dataset, "skipped", None)
        self.skipped += [path for path in dict.fromkeys(failed) if path not in self._skipped_set]
        self._skipped_set.update(failed)  # a set beside the list: a pass may skip 1% of 1.28M files
        self._own_unreadable.update(own)
        if len(self._own_unreadable) <= self.max_unreadable * self.pass_images():
            for path in failed:
                if seen is not None and path not in seen:
                    seen.add(path)
                    _logger.warning("skipped unreadable image %s", path)
        else:
            broken, exact = self._all_unreadable()
            raise self._too_many_unreadable(broken, exact and self.world_size == 1)

    def check_unreadable(self, files: list[str]) -> None:
        """Raise the pass's SequencerError when ``files``, the unreadable files of the whole pass (every rank's,
        gathered), pass ``max_unreadable``; every rank calls it with the same files, so all of them stop alike."""
        broken = list(dict.fromkeys(files))
        if len(broken) > self.max_unreadable * self.pass_images():
            raise self._too_many_unreadable(broken, exact=True)

    def _too_many_unreadable(self, broken: list[str], exact: bool) -> SequencerError:
        """The one-line error listing ``broken`` (its first 20); ``exact``: the list is complete, not "at least"."""
        shown = ", ".join(broken[:20]) + (f", ... ({len(broken) - 20} more)" if len(broken) > 20 else "")
        count = f"{len(broken)}" if exact else f"at least {len(broken)}"
        return SequencerError(
            f"{count} of {self.pass_images()} images are unreadable (more than {self.max_unreadable:.0%}): {shown}",
            hint="remove or replace the broken files")

    SCAN_LIMIT = 20000  # images; a larger pass reports the broken files found before it stopped ("at least")

    def _all_unreadable(self) -> tuple[list[str], bool]:
        """Every unreadable file of this pass's indices (checked now, so the count and list are complete) and
        True; or, for a pass too large to check quickly, the ones found so far and False."""
        # a _BatchSeededSampler (with workers) yields (index, batch seed)
        indices = [key[0] if isinstance(key, tuple) else key for key in self.sampler]
        base = self.dataset.dataset
        if len(indices) > self.SCAN_LIMIT or not hasattr(base, "load"):
            return list(self.skipped), False
        broken = []
        for index in indices:
            try:
                base.load(index)
            except READ_ERRORS:
                broken.append(base.describe(index))
        return broken, True


def create_loader(dataset, input_size, batch_size: int, is_training: bool = False, *,
                  mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct: float | None = None,
                  interpolation: str = "bicubic", num_workers: int = 0, distributed: bool = False,
                  device: torch.device | str = "cpu", auto_augment: str | None = None, re_prob: float = 0.0,
                  re_mode: str = "pixel", re_count: int = 1, hflip: float | None = None, vflip: float = 0.0,
                  scale=None, ratio=None, color_jitter: float | None = None, drop_last: bool | None = None,
                  seed: int = 0, max_unreadable: float = 0.01, pin_memory: bool | None = None,
                  normalize_on_device: bool | None = None, transform=None) -> ImageLoader:
    """An `ImageLoader` over ``dataset`` read with timm's train or eval transform (or ``transform``): a shallow copy
    of ``dataset`` carries it, so the caller's dataset keeps its own (``loader.dataset.transform`` is the one used).

    ``hflip``/``scale``/``ratio``/``color_jitter`` left as None take the dataset's ``augment_defaults`` (digits: no
    flip, mild crops) and then timm's defaults. ``drop_last`` defaults to ``is_training``. With ``distributed``
    (an initialised process group) training shuffles with a DistributedSampler and evaluation gives each rank a
    disjoint, unpadded share. Raises SequencerError when the batch size leaves no batch at all.
    ``normalize_on_device`` (default: on CUDA) sends uint8 batches and normalises and erases them on ``device``
    (`DeviceNormalize`), leaving the CPU workers only decoding and augmenting. Workers persist across passes and end with the
    library call that made the loader (`loader_workers.workers_stopped_on_exit`).
    ``transform``: a ready transform to use instead of timm's (segmentation's image+mask pairs); ``input_size`` and the
    augmentation arguments are then unused.
    """
    device = torch.device(device)
    on_device = device.type == "cuda" if normalize_on_device is None else normalize_on_device
    if batch_size <= 0:
        raise SequencerError(f"`batch_size={batch_size}` must be positive")
    augment = _augmentation(dataset, dict(hflip=hflip, scale=scale, ratio=ratio, color_jitter=color_jitter))
    dataset = _with_transform(dataset, transform if transform is not None else create_transform(
        input_size, is_training, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
        vflip=vflip, auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        uint8_output=on_device, **augment))
    drop_last = is_training if drop_last is None else drop_last
    sampler, rank, world_size = _sampler(dataset, is_training, distributed, seed)
    if drop_last:
        _check_a_batch_fits(dataset, sampler, batch_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    normalize = None
    if on_device:
        normalize = DeviceNormalize(mean, std, device, re_prob=re_prob if is_training else 0.0, re_mode=re_mode,
                                    re_count=re_count)
    return ImageLoader(
        _SkippingView(dataset, replace=is_training), device=device, max_unreadable=max_unreadable, seed=seed,
        rank=rank, world_size=world_size, on_device=normalize, batch_size=batch_size,
        sampler=_BatchSeededSampler(sampler, batch_size, keyed=num_workers > 0), num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
        drop_last=drop_last, generator=generator, persistent_workers=num_workers > 0)


def _augmentation(dataset, given: dict) -> dict:
    """timm's augmentation defaults, overridden by the dataset's ``augment_defaults``, then by the ``given`` values
    that are not None."""
    augment = dict(TIMM_AUGMENT_DEFAULTS)
    augment.update(getattr(dataset, "augment_defaults", None) or {})
    augment.update({k: v for k, v in given.items() if v is not None})
    return augment


def _sampler(dataset, is_training: bool, distributed: bool, seed: int) -> tuple:
    """(sampler, this process's rank, world size): a seeded shuffle for training, in order for evaluation; across
    an initialised process group a DistributedSampler for training and a disjoint, unpadded share for evaluation."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if is_training:
            return torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed), rank, world
        return _ShardSampler(len(dataset), rank, world), rank, world
    if is_training:
        return _EpochRandomSampler(len(dataset), seed), 0, 1
    return torch.utils.data.SequentialSampler(dataset), 0, 1


def _check_a_batch_fits(dataset, sampler, batch_size: int) -> None:
    """SequencerError when dropping the last partial batch would leave no batch at all."""
    if len(sampler) < batch_size:
        name = getattr(dataset, "description", type(dataset).__name__)
        per = " per process" if len(sampler) != len(dataset) else ""
        raise SequencerError(f"`batch_size={batch_size}` is larger than the {len(sampler)} images{per} of {name}",
                             hint=f"use `batch_size={max(1, len(sampler))}` or less")
