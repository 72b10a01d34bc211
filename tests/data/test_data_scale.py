"""What the data code costs as a dataset grows toward ImageNet's 1.28M files, checked by structure and call counts
(never by timing): benchmarks/data_scale.py measures the growth itself."""
import gc
import os
import pickle

import numpy as np
import pytest

from sequencer.data import create_dataset, create_loader
from sequencer.data import splits
from sequencer.data.packed import PackedSamples


def _empty_tree(root, n_files, n_classes=3):
    """root/CLASS/CLASS_I.JPEG, empty (nothing here opens them); returns [(path, target)] in the dataset's order."""
    expected = []
    for c in range(n_classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, n_files, n_classes):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
            expected.append((str(folder / f"n{c:08d}_{i}.JPEG"), c))
    return sorted(expected, key=lambda s: (s[1], int(s[0].rsplit("_", 1)[1][:-5])))


def _reachable(obj) -> int:
    """How many objects ``obj`` holds, itself included (types and modules left out)."""
    seen, pending = set(), [obj]
    while pending:
        o = pending.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        pending += gc.get_referents(o)
    return len(seen)


def test_a_folders_file_list_holds_no_python_object_per_file(tmp_path):
    """A list of (path, target) tuples, copied page by page into every forked worker as they read it, becomes three
    arrays: as many objects for 300 files as for 30, and still read as the list of tuples it was."""
    _empty_tree(tmp_path / "small", 30)
    small = create_dataset("", root=str(tmp_path / "small"), split="train")
    expected = _empty_tree(tmp_path / "large", 300)
    large = create_dataset("", root=str(tmp_path / "large"), split="train")
    assert isinstance(large.samples, PackedSamples) and _reachable(large.samples) == _reachable(small.samples)
    assert list(large.samples) == expected and large.samples == expected and len(large) == 300
    assert large.samples[-1] == expected[-1] and large.samples[5:7] == expected[5:7]
    assert large.samples.targets.dtype == np.int64 and large.filename(0) == os.path.join("n00000000",
                                                                                        "n00000000_0.JPEG")
    with pytest.raises(IndexError):
        large.samples[300]
    again = pickle.loads(pickle.dumps(large))  # what a spawned worker receives
    assert again.samples == expected and isinstance(again.samples, PackedSamples)
    large.samples = large.samples[:4]  # a plain list assigned (split_by_keys, drop_classes) is packed too
    assert isinstance(large.samples, PackedSamples) and len(large) == 4


def test_a_file_name_that_is_not_utf8_reads_back_as_it_was(tmp_path):
    name = os.fsdecode(b"caf\xe9.JPEG")  # Latin-1 bytes on disk: a surrogate-escaped str
    packed = PackedSamples([(str(tmp_path / name), 1), ("b.png", 0)])
    assert list(packed) == [(str(tmp_path / name), 1), ("b.png", 0)]


def test_carving_a_folder_cuts_its_root_off_each_path_without_relpath(tmp_path, monkeypatch):
    """--val-fraction keys every file twice (carve, split); os.path.relpath per file made both paths absolute."""
    _empty_tree(tmp_path, 60)
    dataset = create_dataset("", root=str(tmp_path), split="train")
    expected = [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p, _ in dataset.samples]
    calls = []
    real_relpath = os.path.relpath
    monkeypatch.setattr(splits.os.path, "relpath", lambda *a: calls.append(a) or real_relpath(*a))
    assert splits.sample_keys(dataset) == expected
    held_out = splits.carve_held_out(dataset, 0.1, seed=0)
    rest, carved = splits.split_by_keys(dataset, held_out)
    assert calls == [] and len(held_out) == 6 and set(held_out) <= set(expected)
    assert sorted(splits.sample_keys(carved)) == held_out and len(rest) == 54


class _ListThatMustNotBeSearched(list):
    def __contains__(self, item):
        raise AssertionError("a membership check scanned loader.skipped (quadratic in the pass's unreadable files)")


def test_the_passs_unreadable_files_are_deduplicated_without_scanning_the_list(tmp_path):
    _empty_tree(tmp_path, 6, n_classes=2)
    loader = create_loader(create_dataset("", root=str(tmp_path), split="train"), 8, batch_size=2,
                           max_unreadable=1.0)
    loader.skipped, loader._skipped_set = _ListThatMustNotBeSearched(), set()
    loader._note_unreadable(["x.jpg", "y.jpg", "x.jpg"], ["x.jpg"])
    loader._note_unreadable(["y.jpg", "z.jpg"], ["y.jpg"])
    assert loader.skipped == ["x.jpg", "y.jpg", "z.jpg"]
