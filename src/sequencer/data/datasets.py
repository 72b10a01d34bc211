"""Image-classification datasets: image folders, timm tar files, torchvision datasets and the embedded digits.

Every dataset made by `create_dataset` has ``.class_names`` (index -> name), ``len()``, items ``(image, target)``
(a PIL RGB image before ``.transform`` is set) and ``.skipped`` (the unreadable files found so far; the loader fills
it in the main process). Reading an unreadable file raises `UnreadableImageError` naming it; `create_loader` turns
that into a skip with a warning.
"""
from __future__ import annotations

import logging
import os
import shutil
import io
from typing import Callable

import numpy as np
import torch.utils.data
from PIL import Image

from ..errors import SequencerError
from .class_folders import (IMAGE_EXTENSIONS, SPLIT_NAMES, SPLIT_SYNONYMS, class_name, class_of,  # noqa: F401  (re-exported)
                            archive_stem, check_class_entries, find_split_folder, has_split, held_out_split,
                            is_hidden, split_prefix_in_tar, tar_members, walk_images)
from .class_map import load_class_map, positions_by_name  # noqa: F401  (load_class_map re-exported)
from .images import READ_ERRORS, UnreadableImageError, load_image, to_rgb  # noqa: F401  (re-exported)
from .packed import PackedSamples

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# datasets

class ClassificationDataset(torch.utils.data.Dataset):
    """Base class: subclasses implement ``__len__``, ``load(index) -> (PIL image, int)`` and ``describe(index)``.

    ``augment_defaults`` holds this dataset's preferred training augmentation where it differs from timm's
    (e.g. no horizontal flip for digits); `create_loader` uses it for the options it is not given.
    """

    def __init__(self, class_names, description: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, augment_defaults: dict | None = None):
        self.class_names: list[str] = [class_name(c) for c in class_names]
        self.description = description
        self.transform = transform
        self.target_transform = target_transform
        self.augment_defaults = dict(augment_defaults or {})
        self.skipped: set[str] = set()
        self.ignored_classes: list[str] = []  # class folders left out because the class map does not name them
        self.whole_root = False  # True when DATA has no split folders: every split is all of it (create_dataset)
        # the real folders an image folder's files came from, or what a torchvision dataset or the digits read:
        # two splits sharing one hold the same images (train_data's shared-file check)
        self.real_dirs: set[str] = set()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """The file (or dataset item) behind ``index``, as named in warnings."""
        return f"{self.description}[{index}]"

    def __getitem__(self, index: int):
        try:
            img, target = self.load(index)
        except READ_ERRORS as e:
            raise UnreadableImageError(self.describe(index), e) from e
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} images, {self.num_classes} classes)"


class ImageFileDataset(ClassificationDataset):
    """Image files in class sub-folders: the split's top-level folders are the classes (as torchvision's
    ImageFolder); images anywhere below one belong to it (`class_folders`)."""

    def __init__(self, root: str, samples: list[tuple[str, int]], class_names, **kwargs):
        super().__init__(class_names, description=root, **kwargs)
        self.root = root
        self.samples = samples

    @property
    def samples(self) -> PackedSamples:
        """``[(path, target)]``, packed: no Python object per file for forked workers to copy (`packed`)."""
        return self._samples

    @samples.setter
    def samples(self, samples) -> None:
        self._samples = samples if isinstance(samples, PackedSamples) else PackedSamples(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index):
        path, target = self.samples[index]
        return load_image(path), target

    def describe(self, index):
        return self.samples[index][0]

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        return os.path.abspath(path) if absolute else os.path.relpath(path, self.root)


class TarDataset(ClassificationDataset):
    """Images inside a tar file (``CLASS/...`` or ``SPLIT/CLASS/...`` inside), or a folder of per-class tars.

    Labels follow `class_folders` (top-level class folder, hidden entries skipped); members are read by offset, so
    no tar object crosses into DataLoader workers. Each read opens and closes the tar (as a folder's image is): an
    open kept per process outlived the library call that made the dataset, closed only when the garbage collector
    reached it, perhaps inside the caller's next call.
    """

    def __init__(self, root: str, class_to_idx: dict | None = None, split: str = "train", **kwargs):
        if os.path.isdir(root):
            entries, where = _tar_folder_entries(root), root
        else:
            entries, where = _tar_file_entries(root, split)
        samples, class_to_idx, ignored = _label_samples(entries, class_to_idx, where)
        super().__init__(sorted(class_to_idx, key=class_to_idx.get), description=where, **kwargs)
        self.ignored_classes = ignored
        self.root = root
        self.samples = samples  # [((tar path, member name, data offset, size), target)]

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        (tar, _, offset, size), target = self.samples[index]
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return load_image(io.BytesIO(data)), target

    def describe(self, index):
        tar, name = self.samples[index][0][:2]
        return f"{tar}:{name}"

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        tar, name = self.samples[index][0][:2]
        if basename:
            return os.path.basename(name)
        return f"{os.path.abspath(tar)}:{name}" if absolute else name


def _tar_file_entries(path: str, split: str) -> tuple[list, str]:
    """[(sample ref, class)] of one tar, restricted to its ``split`` folder when it has split folders."""
    members = tar_members(path)
    prefix = split_prefix_in_tar([m.name for m in members], split, path)
    entries = [((path, m.name, m.offset_data, m.size), class_of(m.name[len(prefix):]))
               for m in members if m.name.startswith(prefix)]
    return entries, f"{path}:{prefix}" if prefix else path


def _tar_folder_entries(folder: str) -> list:
    """[(sample ref, class)] of a folder of per-class tars: the tar's name is the class."""
    names = sorted(f for f in os.listdir(folder) if not is_hidden(f))
    tars = [f for f in names if f.lower().endswith(".tar")]
    if not tars:
        raise SequencerError(f"no .tar files in {folder!r}", hint="one CLASS.tar per class, or pass a single .tar")
    other = next((f for f in names if archive_stem(f) is not None and f not in tars), None)
    if other is not None:  # CLASS.zip beside CLASS.tar files
        raise SequencerError(f"{os.path.join(folder, other)!r} is not a .tar: class {archive_stem(other)!r} would be "
                             f"lost", hint="repack it as a .tar (tar cf CLASS.tar ...)")
    entries, empty = [], []
    for name in tars:
        path = os.path.join(folder, name)
        found = [((path, m.name, m.offset_data, m.size), class_name(name[:-4]))
                 for m in tar_members(path) if class_of("x/" + m.name) is not None]  # any image, hidden skipped
        empty += [] if found else [path]
        entries += found
    for path in empty if entries else ():  # none at all: the caller's one-line "no images found" says it
        _logger.warning("ignoring %s: it holds no image files", path)
    return entries


class TorchvisionDataset(ClassificationDataset):
    """A torchvision dataset whose items are ``(PIL image or array, int)``."""

    def __init__(self, dataset, class_names, description: str, **kwargs):
        super().__init__(class_names, description=description, **kwargs)
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        img, target = self.dataset[index]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img), int(target)

    def describe(self, index):
        files = None
        for attr in ("_image_files", "samples", "_samples"):  # where torchvision datasets keep their file list
            files = files or getattr(self.dataset, attr, None)
        if files is not None and index < len(files):
            item = files[index]
            return str(item[0] if isinstance(item, (tuple, list)) else item)
        return super().describe(index)


class DigitsDataset(ClassificationDataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped inside scikit-learn: nothing downloaded).

    Images are upsampled (bilinear) to ``IMG_SIZE`` px RGB, white strokes on black, classes "0".."9". The split is a
    fixed stratified 80/20 train/val split (1437/360 images), identical on every machine.
    """

    IMG_SIZE = 32
    SPLITS = ("train", "val")

    def __init__(self, split: str = "train", **kwargs):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        canonical = next((s for s in self.SPLITS if split.lower() in SPLIT_SYNONYMS[s]), None)
        if canonical is None:
            raise SequencerError(f"the digits dataset has no split {split!r}", hint="splits: train, val")
        digits = load_digits()
        train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                              stratify=digits.target, random_state=0)
        idx = np.sort(train_idx if canonical == "train" else val_idx)
        self.indices = idx  # positions in sklearn's load_digits()
        pixels = np.rint(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        size = (self.IMG_SIZE, self.IMG_SIZE)
        self.images = np.stack([np.asarray(Image.fromarray(p, "L").resize(size, Image.BILINEAR)) for p in pixels])
        self.targets = digits.target[idx].astype(np.int64)
        # digits are not mirror-symmetric and already centred: no flips, only mild crops, no colour jitter
        defaults = dict(hflip=0.0, scale=(0.75, 1.0), ratio=(0.9, 1.1), color_jitter=0.0)
        defaults.update(kwargs.pop("augment_defaults", None) or {})
        super().__init__([str(i) for i in range(10)], description=f"digits/{canonical}",
                         augment_defaults=defaults, **kwargs)
        self.split = canonical
        self.real_dirs = {f"digits/{canonical}"}

    def __len__(self):
        return len(self.targets)

    def load(self, index):
        return Image.fromarray(self.images[index], "L").convert("RGB"), int(self.targets[index])


# ---------------------------------------------------------------------------------------------------------------------
# class maps

# ---------------------------------------------------------------------------------------------------------------------
# factory

# torchvision datasets: name -> (class name, splits it has; None = a train=True/False flag, number of classes when the
# class has no `.classes`)
_TORCHVISION = {
    "cifar10": ("CIFAR10", None, None),
    "cifar100": ("CIFAR100", None, None),
    "mnist": ("MNIST", None, None),
    "fashion_mnist": ("FashionMNIST", None, None),
    "kmnist": ("KMNIST", None, None),
    "qmnist": ("QMNIST", None, None),
    "flowers102": ("Flowers102", ("train", "val", "test"), None),
    "stanford_cars": ("StanfordCars", ("train", "test"), None),
    "food101": ("Food101", ("train", "test"), None),
    "oxford_iiit_pet": ("OxfordIIITPet", ("trainval", "test"), None),
    "dtd": ("DTD", ("train", "val", "test"), None),
    "fgvc_aircraft": ("FGVCAircraft", ("train", "val", "trainval", "test"), None),
    "country211": ("Country211", ("train", "valid", "test"), None),
    "gtsrb": ("GTSRB", ("train", "test"), 43),
    "svhn": ("SVHN", ("train", "test", "extra"), 10),
    "stl10": ("STL10", ("train", "test"), None),
}


def _torchvision_split(name: str, split: str, splits: tuple[str, ...] | None):
    """Map a user split onto what the torchvision class takes: a ``train`` flag or one of its ``splits``."""
    key = split.lower()
    if splits is None:
        if key in SPLIT_SYNONYMS["train"]:
            return {"train": True}
        if key in SPLIT_SYNONYMS["val"] + SPLIT_SYNONYMS["test"]:
            return {"train": False}  # these datasets only have train/test
        raise SequencerError(f"torch/{name} has no split {split!r}", hint="splits: train, test")
    if key in splits:
        return {"split": key}
    for group in ("train", "val", "test"):
        if key in SPLIT_SYNONYMS[group]:
            # nearest split this dataset has: val falls back to test, train to trainval
            order = {"train": ("train", "trainval"), "val": ("val", "valid", "test"), "test": ("test",)}[group]
            for candidate in order:
                if candidate in splits:
                    return {"split": candidate}
    raise SequencerError(f"torch/{name} has no split {split!r}", hint=f"splits: {', '.join(splits)}")


def _create_torchvision(name: str, root: str | None, split: str, download: bool, **kwargs):
    import torchvision.datasets

    key = name.lower()
    if key not in _TORCHVISION:
        raise SequencerError(f"unknown torchvision dataset 'torch/{name}'",
                             hint=f"known: {', '.join('torch/' + k for k in _TORCHVISION)}")
    cls_name, splits, num_classes = _TORCHVISION[key]
    cls = getattr(torchvision.datasets, cls_name)
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "torchvision", key)
    before = set(os.listdir(root)) if os.path.isdir(root) else None
    chosen = _torchvision_split(key, split, splits)
    try:
        ds = cls(root=root, download=download, **chosen)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted", or a download failing its md5
        if download:
            _remove_what_the_download_left(root, before)
            raise SequencerError(f"the download of torch/{name} into {root!r} is cut short or corrupted ({e})",
                                 hint="run again to download it afresh, or place torchvision's files for it in that "
                                      "folder") from None
        raise SequencerError(f"torch/{name} not found in {root!r}: {e}",
                             hint="pass `download` to fetch it, or point DATA at torchvision's files for "
                                  "it (not an image folder)") from None
    except OSError as e:  # the download failed (offline, refused, cut short): leave no half-made folder behind
        _remove_what_the_download_left(root, before)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise SequencerError(f"could not download torch/{name} into {root!r} ({reason})",
                             hint="without network, place torchvision's files for it in that folder") from None
    except ValueError as e:  # torchvision refusing to download at all (StanfordCars: "The original URL is broken")
        if not download:
            raise
        _remove_what_the_download_left(root, before)
        raise SequencerError(f"torch/{name} cannot be downloaded: {e}",
                             hint=f"place torchvision's files for it in {root!r} and drop `download`") from None
    classes = getattr(ds, "classes", None)
    if not classes:
        classes = [str(i) for i in range(num_classes)] if num_classes else None
    if not classes:
        targets = getattr(ds, "targets", None) or getattr(ds, "_labels", None) or getattr(ds, "labels", None)
        classes = [str(i) for i in range(int(max(targets)) + 1)]
    dataset = TorchvisionDataset(ds, list(classes), description=f"torch/{key}[{split}]", **kwargs)
    # what it reads: --train-split test and the default validation split are both CIFAR-10's train=False images
    dataset.real_dirs = {f"{os.path.realpath(root)} ({cls_name} {', '.join(f'{k}={v}' for k, v in chosen.items())})"}
    return dataset


def _remove_what_the_download_left(root: str, before: set[str] | None) -> None:
    """Remove what a failed download made in ``root``: the folder, where it did not exist (``before`` None), else
    the entries it added (a partial archive); what was there before is left alone."""
    if before is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in set(os.listdir(root)) - before:
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _label_samples(entries: list, class_to_idx: dict | None, where: str):
    """[(ref, target)] sorted by name, class_to_idx and the classes the map leaves out, from [(ref, class)]
    (class "" = loose, None = not data)."""
    from timm.utils.misc import natural_key

    labelled = [(ref, c) for ref, c in entries if c]
    loose = [ref for ref, c in entries if c == ""]
    if not labelled and loose:
        raise SequencerError(f"the images in {where!r} are not in class sub-folders",
                             hint="put them in one sub-folder per class (DATA/CLASS/IMAGE.jpg)")
    if not labelled:
        raise SequencerError(f"no images found in {where!r}",
                             hint=f"expected DATA[/SPLIT]/CLASS/IMAGE with an extension among "
                                  f"{', '.join(IMAGE_EXTENSIONS)}")
    if loose:
        _logger.warning("ignoring %d image(s) directly in %s (not in a class folder), e.g. %s",
                        len(loose), where, _ref_name(loose[0]))
    classes = {c for _, c in labelled}
    unmapped = []
    if class_to_idx is None:
        # natural order (timm's), ties (class01/class1, Dog/dog) by the name: a set's order varies per process
        class_to_idx = {c: i for i, c in enumerate(sorted(classes, key=lambda c: (natural_key(c), c)))}
    else:
        unmapped = sorted(classes - set(class_to_idx))
        if unmapped and len(unmapped) == len(classes):
            raise SequencerError(f"none of the class folders in {where!r} is in the class map",
                                 hint=f"folders: {', '.join(unmapped[:5])}{', ...' if len(unmapped) > 5 else ''}")
        if unmapped:
            _logger.warning("ignoring %d class folder(s) of %s not in the class map: %s", len(unmapped), where,
                            ", ".join(unmapped[:10]))
    samples = sorted(((ref, class_to_idx[c]) for ref, c in labelled if c in class_to_idx),
                     key=lambda s: natural_key(_ref_name(s[0])))
    return samples, class_to_idx, unmapped


def _ref_name(ref) -> str:
    return ref if isinstance(ref, str) else ref[1]


def reads_files(name: str | None) -> bool:
    """Whether ``create_dataset``'s ``name`` reads DATA's own files (image folders or tars), not a torchvision
    dataset's or the digits."""
    return (name or "").lower() in ("", "folder", "image_folder", "tar")


def create_dataset(name: str = "", root: str | None = None, split: str = "train", is_training: bool = False,
                   class_map: str | None = None, download: bool = False, **kwargs) -> ClassificationDataset:
    """Create a dataset by name.

    - ``name`` "" (or "folder"): an ImageNet-style folder ``root/SPLIT/CLASS/IMAGE``; the split folder is found by
      name and synonym (train/training, val/valid/validation/eval, test), or ``root`` holds class folders directly.
      A ``root/SPLIT.tar`` is read as a tar.
    - "tar" or a ``root`` ending in ``.tar``: a tar holding class folders, or split folders holding class folders
      (the split is picked as for a folder); with "tar", ``root`` may be a folder of per-class tars.
    - "torch/NAME": a torchvision dataset (cifar10, cifar100, flowers102, stanford_cars, ...); ``download`` passes
      through, otherwise the files must already be in ``root``.
    - "digits": the embedded scikit-learn digits (splits train, val; ``root`` is ignored).

    ``is_training`` is accepted for timm compatibility; augmentation is chosen by `create_loader`.
    ``kwargs`` may carry ``transform``/``target_transform``.
    """
    del is_training  # map-style datasets behave the same either way
    kwargs = {k: v for k, v in kwargs.items() if k in ("transform", "target_transform", "augment_defaults")}
    name = name or ""
    if name.lower() == "digits":
        if class_map:
            raise SequencerError("`class_map` is not supported with the digits dataset")
        return DigitsDataset(split, **kwargs)
    if name.lower().startswith("torch/"):
        if class_map:
            raise SequencerError(f"`class_map` is not supported with {name}")
        return _create_torchvision(name.split("/", 1)[1], root, split, download, **kwargs)
    if not reads_files(name):
        raise SequencerError(f"unknown dataset {name!r}",
                             hint="use '' (image folders), 'tar', 'digits' or 'torch/NAME' (e.g. torch/cifar10)")
    if not root:
        raise SequencerError("no data folder given", hint="pass `root`, or `name=digits` for the embedded set")
    root = os.path.expanduser(str(root))
    if not os.path.exists(root):
        raise SequencerError(f"data folder {root!r} does not exist")
    class_to_idx = load_class_map(class_map, root) if class_map else None
    path = find_split_folder(root, split) if os.path.isdir(root) else root
    if os.path.isfile(path):
        if not path.lower().endswith(".tar"):
            raise SequencerError(f"{path!r} is a file, not a data folder or .tar")
        dataset = TarDataset(path, class_to_idx, split=split, **kwargs)
    elif name.lower() == "tar":
        dataset = TarDataset(path, class_to_idx, split=split, **kwargs)
    else:
        real_dirs: set[str] = set()
        entries = [(os.path.join(path, *rel.split("/")), class_of(rel)) for rel in walk_images(path, real_dirs)]
        check_class_entries(path, {c for _, c in entries if c})
        samples, class_to_idx, ignored = _label_samples(entries, class_to_idx, path)
        dataset = ImageFileDataset(path, samples, sorted(class_to_idx, key=class_to_idx.get), **kwargs)
        dataset.ignored_classes, dataset.real_dirs = ignored, real_dirs
    dataset.whole_root = path == root and (os.path.isdir(root) or dataset.description == root)
    return dataset


def map_classes_by_name(dataset: ClassificationDataset, class_names: list[str], what: str) -> list[str]:
    """Label ``dataset`` with indices into ``class_names`` (e.g. the training split's), matching classes by name.

    A split is never labelled on its own: a split lacking one class would otherwise shift every later label.
    Sets ``dataset.target_transform`` (kept in front of an existing one) and ``dataset.class_names``. Raises
    SequencerError naming classes of ``dataset`` that ``class_names`` does not have; returns the names of
    ``class_names`` that ``dataset`` lacks (fine: reported by the caller).
    """
    own = [class_name(n) for n in dataset.class_names]
    class_names = [class_name(n) for n in class_names]
    if own == class_names:
        dataset.class_names = own
        return []
    mapping = positions_by_name(own, list(class_names))
    unknown = [name for name, i in zip(own, mapping) if i is None]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise SequencerError(f"{what} ({dataset.description}) has {len(unknown)} class(es) the model was not trained "
                             f"on: {shown}", hint="remove those class folders, or pass a `class_map` of the classes")
    after = dataset.target_transform
    dataset.target_transform = (_RemapTargets(mapping) if after is None
                                else _Chain(_RemapTargets(mapping), after))
    dataset.class_names = list(class_names)
    present = set(own)
    return [name for name in class_names if name not in present]


class _RemapTargets:
    """Picklable ``target -> mapping[target]`` (DataLoader workers receive the dataset by pickling)."""

    def __init__(self, mapping: list[int]):
        self.mapping = mapping

    def __call__(self, target: int) -> int:
        return self.mapping[target]


class _Chain:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, target):
        return self.second(self.first(target))


def drop_classes(dataset: ClassificationDataset, names: set[str]) -> int:
    """Remove the images of the classes ``names`` from a folder or tar dataset (as a ``--class-map`` training left
    them out), renumbering the rest; returns how many images were removed."""
    names = {class_name(n) for n in names}
    keep = [n for n in dataset.class_names if n not in names]
    if len(keep) == len(dataset.class_names) or not hasattr(dataset, "samples"):
        return 0
    new_index = {old: keep.index(n) for old, n in enumerate(dataset.class_names) if n in keep}
    dropped = [n for n in dataset.class_names if n in names]
    before = len(dataset.samples)
    dataset.samples = [(ref, new_index[t]) for ref, t in dataset.samples if t in new_index]
    dataset.class_names = keep
    dataset.ignored_classes = sorted(set(dataset.ignored_classes) | set(dropped))
    return before - len(dataset.samples)
