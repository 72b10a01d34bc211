"""ADE20K SceneParsing's 150 class names: from the dataset's ``objectInfo150.txt`` when it has one, else the same
names embedded here.

``objectInfo150.txt`` (at the root of ``ADEChallengeData2016``) has a header line, then one line per class:
``Idx Ratio Train Val Name``, tab-separated, ``Name`` a list of synonyms (``floor, flooring``; the challenge devkit's
copy, CSAILVision/sceneparsing, has stray spaces after a few Idx and names); a class's name is its first synonym, as
``chest of drawers`` (spaces kept)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SequencerError

OBJECT_INFO = "objectInfo150.txt"
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
_SYNONYMS = re.compile(r"[;,]")  # the challenge's lists use ', ' (hand-made copies of the file ';')


def ade20k_class_names(root: str | Path) -> list[str]:
    """The 150 class names, in label order (label k+1 of the masks, k after ``reduce_zero_label``): read from
    ``root/objectInfo150.txt`` when it exists, else :data:`ADE20K_CLASSES`. A malformed file is a SequencerError
    naming it and the line."""
    path = Path(root) / OBJECT_INFO
    if not path.is_file():
        return list(ADE20K_CLASSES)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SequencerError(f"{path} is unreadable ({e})") from None
    names: list[str] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip()
        fields = line.split("\t") if "\t" in line else line.split(None, 4)
        if not line or (number == 1 and fields[0].strip().lower() == "idx"):  # blank, or the header
            continue
        names.append(_class_name(path, number, fields, len(names) + 1, names))
    if len(names) != len(ADE20K_CLASSES):
        raise SequencerError(f"{path} line {len(lines)}: the file ends after {len(names)} classes, "
                             f"{len(ADE20K_CLASSES)} expected")
    return names


def _class_name(path: Path, number: int, fields: list[str], index: int, earlier: list[str]) -> str:
    """The first synonym of one class line (``Idx Ratio Train Val Name``), checked."""
    where = f"{path} line {number}"
    if len(fields) != 5:
        raise SequencerError(f"{where}: {len(fields)} columns, expected 5 (Idx, Ratio, Train, Val, Name)")
    if index > len(ADE20K_CLASSES):
        raise SequencerError(f"{where}: a class beyond the {len(ADE20K_CLASSES)} of ADE20K SceneParsing")
    if fields[0].strip() != str(index):
        raise SequencerError(f"{where}: Idx {fields[0].strip()!r}, expected {index} (classes in order from 1)")
    name = _SYNONYMS.split(fields[4])[0].strip()
    if not name:
        raise SequencerError(f"{where}: no class name")
    if name in earlier:
        raise SequencerError(f"{where}: class name {name!r} is also class {earlier.index(name) + 1}'s")
    return name
