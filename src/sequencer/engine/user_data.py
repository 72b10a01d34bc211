"""The caller's own data and model in a run: a map-style torch ``Dataset`` of ``(PIL image or CHW tensor, int)``
seen as our datasets are (:class:`UserDataset`), and the name a module goes by in logs and folders.

PIL images get the recipe's transforms (resize, crop, augmentation, normalisation); float32 tensors are used as
given. The caller's dataset object is never changed: transforms and label maps are set on the wrapper.
"""
from __future__ import annotations

import itertools

import torch
from PIL import Image

from ..data.datasets import ClassificationDataset
from ..errors import SequencerError


class UserDataset(ClassificationDataset):
    """``dataset`` (the caller's) with the attributes the loaders use; ``tensors``: its images are tensors."""

    def __init__(self, dataset, class_names: list[str], description: str, tensors: bool):
        super().__init__(class_names, description)
        self.dataset = dataset
        self.tensors = tensors
        self.labels = list(self.class_names)  # what its own labels index (class_names may be remapped to a model's)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        return self.dataset[index]

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if not isinstance(image, torch.Tensor) and self.transform is not None:
            image = self.transform(image)
        target = int(target)
        if not 0 <= target < len(self.labels):  # torch's 'Target 2 is out of bounds.' from the loss, else
            raise SequencerError(f"{self.description}: item {index} has label {target}, outside its "
                                 f"{len(self.labels)} classes {self.labels[:4]}",
                                 hint="labels are indices into the Dataset's `classes`")
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def wrap_datasets(pair, what: str = "data") -> tuple[UserDataset, UserDataset]:
    """The caller's ``(train, val)`` datasets as :class:`UserDataset` s labelled alike; SequencerError naming
    ``what`` for anything else. Class names come from ``train.classes`` (else ``train.targets``, else the labels
    read once), and the two must hold the same kind of image (PIL or tensor)."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise SequencerError(f"{what} must be a folder, a .tar, None (the digits) or a (train, val) pair of Datasets, "
                             f"not {type(pair).__name__}")
    train, val = pair
    kinds = [_image_kind(ds, f"{what}[{i}]") for i, ds in enumerate(pair)]
    if kinds[0] != kinds[1]:
        raise SequencerError(f"{what}: the training Dataset yields {kinds[0]} images but the validation one {kinds[1]}",
                             hint="give both the same kind")
    names = class_names_of(train, f"{what}[0]")
    own = getattr(val, "classes", None)
    if own is not None and [str(c) for c in own] != names:
        raise SequencerError(f"{what}: the validation Dataset's classes differ from the training Dataset's",
                             hint="label both with the same class list")
    tensors = kinds[0] == "tensor"
    return (UserDataset(train, names, f"{type(train).__name__} (train)", tensors),
            UserDataset(val, names, f"{type(val).__name__} (val)", tensors))


def wrap_dataset(dataset, what: str = "data") -> UserDataset:
    """One caller's Dataset (e.g. to validate on) as a :class:`UserDataset`."""
    kind = _image_kind(dataset, what)
    return UserDataset(dataset, class_names_of(dataset, what), type(dataset).__name__, kind == "tensor")


def _image_kind(dataset, what: str) -> str:
    """"PIL" or "tensor" (float32): the kind of image ``dataset[0]`` holds; SequencerError for anything else."""
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise SequencerError(f"{what}: {type(dataset).__name__} is not a map-style Dataset (needs __getitem__ and "
                             f"__len__)")
    if len(dataset) == 0:
        raise SequencerError(f"{what}: the Dataset is empty")
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise SequencerError(f"{what}: items must be (image, label) pairs, got {type(item).__name__}")
    image, label = item
    if isinstance(image, Image.Image):
        return "PIL"
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        if image.dtype != torch.float32:  # ATen's dtype error in the model's first layer, once the run had begun
            raise SequencerError(f"{what}: image tensors are fed to the model as given and must be float32, got "
                                 f"{str(image.dtype).removeprefix('torch.')}",
                                 hint="convert them in the Dataset: image.float() (uint8 pixels: image.float() / 255, "
                                      "normalised as the model expects)")
        return "tensor"
    shape = f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""
    raise SequencerError(f"{what}: images must be PIL images or CHW tensors, got {type(image).__name__}{shape}")


def class_names_of(dataset, what: str) -> list[str]:
    """``dataset.classes`` as text; without it "0", "1", ... up to the largest label (``dataset.targets`` or every
    item's label)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    labels = [int(t) for t in targets]
    if min(labels) < 0:
        raise SequencerError(f"{what}: labels must be class indices from 0, got {min(labels)}")
    return [str(i) for i in range(max(labels) + 1)]


def check_float32_weights(model: torch.nn.Module, call: str,
                          hint: str = "pass model.float(); for mixed precision add `amp=True`") -> None:
    """A caller's module cast to one other dtype (``.half()``, ``.bfloat16()``, ``.double()``) is refused in one line
    naming ``call``: the call feeds it float32 images (reduced precision is ``amp``'s, over float32 weights), on
    which its first layer would fail with ATen's dtype error. A module mixing dtypes is its own business and passes.
    Its weights must hold data first (:func:`check_weights_hold_data`)."""
    check_weights_hold_data(model, call)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and torch.float32 not in dtypes:
        name = str(dtypes.pop()).removeprefix("torch.")
        raise SequencerError(f"{call}: `model` {module_name(model)} holds {name} weights, and {call} feeds it "
                             f"float32 images", hint=hint)


def check_weights_hold_data(model: torch.nn.Module, call: str) -> None:
    """A caller's module with weights on the meta device (built under ``torch.device("meta")`` for deferred
    initialisation, not yet materialised) is refused in one line naming ``call``: its tensors hold no values to
    run, train or copy, and each call failed deep in torch ('Cannot copy out of meta tensor; no data!', or from
    optimize_for_inference's copy at its first batch: 'Tensor on device meta is not on the expected device cpu!')."""
    on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise SequencerError(f"{call}: `model` {module_name(model)} has {len(on_meta)} tensors on the meta device "
                             f"(no data), {on_meta[0]} the first",
                             hint="materialise it first: model.to_empty(device='cpu'), then load its weights "
                                  "(or load_state_dict(weights, assign=True))")


def compiled_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper runs (its ``_orig_mod``), else ``model`` itself: its state dict has the
    module's own keys, where the wrapper's are prefixed ``_orig_mod.`` (which a plain ``load_state_dict`` refuses)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def module_name(model: torch.nn.Module) -> str:
    """A registry model's name, else the module's class name (a module we did not build; a ``torch.compile``
    wrapper's: the module's inside it)."""
    return getattr(model, "model_name", None) or type(compiled_module(model)).__name__


def architecture_recorded(model: torch.nn.Module) -> bool:
    """Whether a checkpoint of ``model`` can rebuild it by name (a registry model records its constructor)."""
    return bool(getattr(model, "model_name", None)) and isinstance(getattr(model, "model_kwargs", None), dict)
