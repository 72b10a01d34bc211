"""``--class-map`` files: class names (and indices) as text or JSON, never a pickle."""
from __future__ import annotations

import json
import os
from collections import Counter

from ..errors import SequencerError
from .class_folders import class_name


def load_class_map(path: str, root: str | None = None) -> dict[str, int]:
    """Parse a class map file into ``{class name: index}`` (never unpickles anything).

    Text files hold one class name per line (index = line order, blank lines ignored), or "name index" on every
    line. A UTF-8 byte-order mark (Windows Notepad writes one) is not part of the first name. ``.json`` files hold
    a list of names or a ``{name: index}`` object. Indices must be 0..K-1, each once.
    """
    if not os.path.isfile(path) and root and os.path.isfile(os.path.join(root, path)):
        path = os.path.join(root, path)
    if os.path.isdir(path):
        raise SequencerError(f"class map {path!r} is a folder, not a file",
                             hint="pass a text file of class names, one per line")
    if not os.path.isfile(path):
        raise SequencerError(f"class map {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pkl", ".pickle"):
        raise SequencerError(f"class map {path!r}: pickle files are refused (loading one can run code)",
                             hint="write one class name per line in a .txt file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM would glue itself to the first class
            text = f.read()
    except UnicodeDecodeError:
        raise SequencerError(f"class map {path!r} is not a UTF-8 text file",
                             hint="write one class name per line") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SequencerError(f"class map {path!r} is not valid JSON: {e}") from None
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            pairs = [(n, i) for i, n in enumerate(data)]
        elif isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            pairs = [(str(k), v) for k, v in data.items()]
        else:
            raise SequencerError(f"class map {path!r}: expected a JSON list of names or a {{name: index}} object")
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        split = [line.rsplit(None, 1) for line in lines]
        if lines and all(len(p) == 2 and p[1].lstrip("-").isdigit() for p in split):
            pairs = [(p[0], int(p[1])) for p in split]
        else:
            pairs = [(line, i) for i, line in enumerate(lines)]
    if not pairs:
        raise SequencerError(f"class map {path!r} is empty", hint="write one class name per line")
    pairs = [(class_name(n), i) for n, i in pairs]
    names = [n for n, _ in pairs]
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)  # names.count: K^2 for ImageNet-21K
    if dupes:
        raise SequencerError(f"class map {path!r} lists {', '.join(map(repr, dupes[:5]))} more than once")
    indices = sorted(i for _, i in pairs)
    if indices != list(range(len(pairs))):
        raise SequencerError(f"class map {path!r}: indices must be 0..{len(pairs) - 1}, each used once")
    return dict(pairs)


def positions_by_name(names: list[str], into: list[str]) -> list[int | None]:
    """For each of ``names``, its index in ``into`` (None where ``into`` lacks it): the one rule by which a split's
    classes, or a classifier's rows, follow another list of class names (compared in NFC, `class_name`)."""
    index = {class_name(name): i for i, name in enumerate(into)}
    return [index.get(class_name(name)) for name in names]
