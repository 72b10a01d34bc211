import json
import os
import pickle
import tarfile
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image

from sequencer.data import DigitsDataset, create_dataset, load_class_map, load_image, to_rgb
from sequencer.data.images import UnreadableImageError
from sequencer.data.imagenet_classes import IMAGENET_CLASSES
from sequencer.errors import SequencerError

from .conftest import write_images


# --- image folders ---------------------------------------------------------------------------------------------------

def test_split_folders_found_by_name_and_synonym(image_folder):
    train = create_dataset("", root=str(image_folder), split="train")
    val = create_dataset("", root=str(image_folder), split="val")  # finds validation/
    assert (len(train), len(val)) == (6, 4)
    assert train.class_names == val.class_names == ["a", "b"]
    assert os.path.basename(val.root) == "validation"
    img, target = val[3]
    assert img.mode == "RGB" and img.size == (8, 8) and target == 1
    assert val.filename(0) == os.path.join("a", "a_0.png")


def test_test_split_and_missing_split_lists_found_splits(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", per_class=1)
    assert len(create_dataset("", root=str(tmp_path), split="test")) == 2
    with pytest.raises(SequencerError, match=r"split 'val' not found .*splits found: test, train"):
        create_dataset("", root=str(tmp_path), split="val")


def test_class_folders_directly_serve_any_split(tmp_path):
    write_images(tmp_path, classes=("cat", "dog", "emu"), per_class=1)
    ds = create_dataset("", root=str(tmp_path), split="validation")
    assert ds.class_names == ["cat", "dog", "emu"] and [t for _, t in ds.samples] == [0, 1, 2]


def test_missing_empty_and_unsorted_folders_are_clear_errors(tmp_path):
    with pytest.raises(SequencerError, match="does not exist"):
        create_dataset("", root=str(tmp_path / "nope"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(SequencerError, match="no images found"):
        create_dataset("", root=str(tmp_path / "empty"))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (4, 4)).save(loose / "x.png")
    with pytest.raises(SequencerError, match="not in class sub-folders"):
        create_dataset("", root=str(loose))
    with pytest.raises(SequencerError, match="no data folder"):
        create_dataset("", root=None)
    with pytest.raises(SequencerError, match="unknown dataset"):
        create_dataset("hfds/imagenet", root=str(tmp_path))


# --- class maps ------------------------------------------------------------------------------------------------------

def test_class_map_orders_classes_and_filters_folders(image_folder, tmp_path):
    names = tmp_path / "map.txt"
    names.write_text("b\n\na\n")  # reversed order, blank line ignored
    ds = create_dataset("", root=str(image_folder), split="train", class_map=str(names))
    assert ds.class_names == ["b", "a"]
    assert [t for p, t in ds.samples if "/a/" in p] == [1, 1, 1]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a 1\nb 0\n")
    assert load_class_map(str(pairs)) == {"a": 1, "b": 0}
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps(["b", "a"]))
    assert load_class_map(str(as_json)) == {"b": 0, "a": 1}
    only_b = tmp_path / "only_b.txt"
    only_b.write_text("b\n")
    assert len(create_dataset("", root=str(image_folder), split="train", class_map=str(only_b))) == 3
    none = tmp_path / "none.txt"
    none.write_text("zebra\n")
    with pytest.raises(SequencerError, match="none of the class folders"):
        create_dataset("", root=str(image_folder), split="train", class_map=str(none))


@pytest.mark.parametrize("ext, content", [(".txt", "\ufeffcat\r\ndog\r\n\r\n"), (".json", '\ufeff["cat", "dog"]')])
def test_class_map_with_a_byte_order_mark(tmp_path, ext, content):
    """Notepad's "UTF-8 with BOM": the text map's first class became "\ufeffcat", so the cat folder was left out
    (2 of 4 images, with a warning); the JSON map was refused as invalid JSON."""
    path = tmp_path / f"map{ext}"
    path.write_bytes(content.encode("utf-8"))
    assert load_class_map(str(path)) == {"cat": 0, "dog": 1}
    write_images(tmp_path / "data", classes=("cat", "dog"), per_class=2)
    assert len(create_dataset("", root=str(tmp_path / "data"), class_map=str(path))) == 4


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("a\nb\na\n", "more than once"),
    ("a 0\nb 2\n", "indices must be"),
])
def test_bad_class_maps_are_refused(tmp_path, content, message):
    path = tmp_path / "map.txt"
    path.write_text(content)
    with pytest.raises(SequencerError, match=message):
        load_class_map(str(path))


def test_pickled_class_map_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "map.pkl"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(SequencerError, match="pickle files are refused"):
        load_class_map(str(path))
    assert not marker.exists()
    with pytest.raises(SequencerError, match="does not exist"):
        load_class_map(str(tmp_path / "missing.txt"))
    binary = tmp_path / "map.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SequencerError, match="not a UTF-8 text file"):
        load_class_map(str(binary))


# --- tar -------------------------------------------------------------------------------------------------------------

def test_tar_dataset_file_and_split_tar(image_folder, tmp_path):
    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "val.tar", "w") as tf:
        tf.add(image_folder / "validation", arcname=".")
    ds = create_dataset("", root=str(root / "val.tar"))
    assert len(ds) == 4 and ds.class_names == ["a", "b"]
    img, target = ds[2]
    expected = np.asarray(Image.open(image_folder / "validation" / "b" / "b_0.png").convert("RGB"))
    assert target == 1 and np.array_equal(np.asarray(img), expected)
    # the tar is not held open once read: the dataset kept it until the garbage collector reached it, so a library
    # call on a tar left the caller's process a file to close inside its next call (tests/engine/test_guest_state.py)
    assert str(root / "val.tar") not in open_paths()
    assert len(create_dataset("", root=str(root), split="validation")) == 4  # root/val.tar found as the split
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 30)
    with pytest.raises(SequencerError, match="cannot read tar dataset") as error:
        create_dataset("", root=str(bad))
    assert str(error.value).endswith(": not a tar archive")  # one line (tarfile lists each compression it tried)


def open_paths() -> set[str]:
    """What this process's open file descriptors refer to (Linux's /proc; elsewhere none are seen)."""
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ()
    found = set()
    for fd in fds:
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


def test_tar_of_a_folder_with_hard_links_has_the_folder_s_images(image_folder, tmp_path):
    """``tar cf`` stores a hard-linked file's second name as a link member, which was dropped: the folder's 7 images
    (b/also_a0.png a hard link of a/a_0.png) were 6 in its tar, a_0.png gone without a word."""
    os.link(image_folder / "train" / "a" / "a_0.png", image_folder / "train" / "b" / "also_a0.png")
    with tarfile.open(tmp_path / "data.tar", "w") as tf:
        tf.add(image_folder, arcname="data")
        assert sum(m.islnk() for m in tf.getmembers()) == 1  # the tar holds what this test is about
    folder = create_dataset("", root=str(image_folder), split="train")
    tar = create_dataset("", root=str(tmp_path / "data.tar"), split="train")
    assert len(tar) == len(folder) == 7
    for i in range(7):
        assert tar.filename(i).endswith(folder.filename(i)) and tar.samples[i][1] == folder.samples[i][1]
        assert np.array_equal(np.asarray(tar[i][0]), np.asarray(folder[i][0]))


def test_tar_of_a_folder_of_symbolic_links_keeps_their_images_or_names_the_lost_one(tmp_path):
    """``tar cf`` of a folder whose images are symbolic links (a subset made with ``ln -s``) stores the links, which
    were dropped without a word: train/cat/ of two links beside train/dog/ of two files read as one class 'dog' (2
    images) where the folder has cat and dog (4). A link to a file in the tar reads that file; one leading out of
    the tar (a linked class folder) is refused, naming it."""
    write_images(tmp_path / "store", classes=("kept",), per_class=2)
    data = tmp_path / "data"
    write_images(data / "train", classes=("dog",), per_class=2, seed=1)
    (data / "train" / "cat").mkdir()
    for i in range(2):
        os.symlink(f"../../store/kept/kept_{i}.png", data / "train" / "cat" / f"cat_{i}.png")
    with tarfile.open(tmp_path / "data.tar", "w") as tf:
        tf.add(data / "train", arcname="train")
        tf.add(tmp_path / "store", arcname="store")
        assert sum(m.issym() for m in tf.getmembers()) == 2  # the tar holds what this test is about
    tar = create_dataset("", root=str(tmp_path / "data.tar"), split="train")
    assert tar.class_names == ["cat", "dog"] and [t for _, t in tar.samples] == [0, 0, 1, 1]
    expected = np.asarray(Image.open(tmp_path / "store" / "kept" / "kept_1.png").convert("RGB"))
    assert tar.filename(1) == "train/cat/cat_1.png" and np.array_equal(np.asarray(tar[1][0]), expected)

    os.symlink(tmp_path / "store" / "kept", data / "train" / "bird")  # a class folder linked from outside
    with tarfile.open(tmp_path / "out.tar", "w") as tf:
        tf.add(data / "train", arcname="train")
    with pytest.raises(SequencerError, match=r"member 'train/bird' is a symbolic link to .*which is not a file or "
                                             r"folder in the tar: its images would be lost") as error:
        create_dataset("", root=str(tmp_path / "out.tar"), split="train")
    assert "tar -h" in error.value.hint and "\n" not in str(error.value)


def test_tar_link_to_a_folder_it_holds_reads_that_folder(tmp_path):
    """A link to a folder inside the tar (a split alias val -> validation, a class folder linked from another split)
    reads that folder's images under its own name, as the folder does: the whole tar was refused ('which is not a
    file in the tar'), where before the link it was read."""
    data = tmp_path / "data"
    write_images(data / "validation", classes=("cat", "dog"), per_class=2)
    write_images(data / "train", classes=("dog",), per_class=2, seed=1)
    os.symlink("validation", data / "val")
    os.symlink("../validation/cat", data / "train" / "cat")
    with tarfile.open(tmp_path / "data.tar", "w") as tf:
        tf.add(data, arcname="data")
        assert sum(m.issym() for m in tf.getmembers()) == 2  # the tar holds what this test is about
    for split, classes, count in (("val", ["cat", "dog"], 4), ("validation", ["cat", "dog"], 4),
                                  ("train", ["cat", "dog"], 4)):
        tar = create_dataset("", root=str(tmp_path / "data.tar"), split=split)
        folder = create_dataset("", root=str(data), split=split)
        assert tar.class_names == folder.class_names == classes and len(tar) == len(folder) == count, split
    tar = create_dataset("", root=str(tmp_path / "data.tar"), split="train")
    expected = np.asarray(Image.open(data / "validation" / "cat" / "cat_1.png").convert("RGB"))
    assert tar.filename(1) == "data/train/cat/cat_1.png" and np.array_equal(np.asarray(tar[1][0]), expected)


# --- torchvision -----------------------------------------------------------------------------------------------------

class _FakeTorchvision:
    calls = []
    classes = [f"class{i}" for i in range(4)]

    def __init__(self, root, download=False, **kwargs):
        type(self).calls.append(dict(root=root, download=download, **kwargs))
        self.data = [np.full((4, 4), 10 * i, dtype=np.uint8) for i in range(4)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i], "L"), i


def test_torchvision_routing_flags_splits_and_download(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeTorchvision)
    monkeypatch.setattr(torchvision.datasets, "Flowers102", _FakeTorchvision)
    monkeypatch.setattr(torchvision.datasets, "StanfordCars", _FakeTorchvision)
    _FakeTorchvision.calls = []
    train = create_dataset("torch/cifar10", root=str(tmp_path), split="train", download=True)
    create_dataset("torch/CIFAR10", root=str(tmp_path), split="validation")
    create_dataset("torch/flowers102", root=str(tmp_path), split="validation")
    create_dataset("torch/stanford_cars", root=str(tmp_path), split="val")
    assert _FakeTorchvision.calls == [
        dict(root=str(tmp_path), download=True, train=True),
        dict(root=str(tmp_path), download=False, train=False),
        dict(root=str(tmp_path), download=False, split="val"),
        dict(root=str(tmp_path), download=False, split="test"),  # cars have no val split
    ]
    assert train.class_names == _FakeTorchvision.classes
    img, target = train[2]
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [20, 20, 20] and target == 2
    with pytest.raises(SequencerError, match="has no split 'extra'"):
        create_dataset("torch/flowers102", root=str(tmp_path), split="extra")
    with pytest.raises(SequencerError, match="unknown torchvision dataset"):
        create_dataset("torch/nonexistent", root=str(tmp_path))


def test_torchvision_missing_files_suggest_download(tmp_path):
    with pytest.raises(SequencerError, match="torch/country211 not found.*`download`"):
        create_dataset("torch/country211", root=str(tmp_path), split="val")


def test_torchvision_download_cut_short_says_so_and_leaves_nothing_of_its_own(monkeypatch, tmp_path):
    """CIFAR-10 from a 127.0.0.1 server that announces 100 kB and sends 5: the run said 'torch/cifar10 not found
    ...: File not found or corrupted.' with the hint to pass `download`, which it had, and left the 5 kB partial
    archive in the folder it made; now it says the download is cut short, and only what was there before is left."""
    class CutShort(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 5000)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url",
                        f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz")
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    try:
        for root in (tmp_path / "new", kept):
            with pytest.raises(SequencerError, match=r"the download of torch/cifar10 into .* is cut short or "
                                                     r"corrupted") as error:
                create_dataset("torch/cifar10", root=str(root), download=True)
            assert "`download`" not in error.value.hint
        assert not (tmp_path / "new").exists() and os.listdir(kept) == ["notes.txt"]
    finally:
        server.shutdown()
        server.server_close()


def test_torchvision_dataset_that_torchvision_cannot_download_is_one_line(tmp_path):
    """torch/stanford_cars with `download`: torchvision raises ValueError ('The original URL is broken ...'), which
    ended validate in a traceback; now one line saying it cannot be downloaded, and no folder is made."""
    with pytest.raises(SequencerError, match=r"torch/stanford_cars cannot be downloaded: The original URL is broken"):
        create_dataset("torch/stanford_cars", root=str(tmp_path / "cars"), split="test", download=True)
    assert not (tmp_path / "cars").exists()


def test_torchvision_dataset_reading_real_files(tmp_path):
    """Country211 reads plain image folders, so a tiny fake copy exercises the real torchvision class offline."""
    write_images(tmp_path / "country211" / "valid", classes=("AD", "AE"), per_class=2)
    ds = create_dataset("torch/country211", root=str(tmp_path), split="validation")
    assert len(ds) == 4 and ds.class_names == ["AD", "AE"]
    assert ds[3][1] == 1 and ds[3][0].mode == "RGB"
    assert ds.describe(0).endswith(os.path.join("AD", "AD_0.png"))


# --- digits ----------------------------------------------------------------------------------------------------------

def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset("train"), create_dataset("digits", split="validation")
    assert (len(train), len(val)) == (1437, 360)
    assert not set(train.indices) & set(val.indices)
    assert np.array_equal(DigitsDataset("val").indices, val.indices)  # same split every time
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of each class's ~180 images
    assert val.class_names == [str(i) for i in range(10)]
    img, target = val[0]
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= target <= 9
    assert val.augment_defaults["hflip"] == 0.0
    with pytest.raises(SequencerError, match="splits: train, val"):
        create_dataset("digits", split="test")


def test_digits_pixels_match_sklearn():
    from sklearn.datasets import load_digits
    val = DigitsDataset("val")
    raw = load_digits().images[val.indices[5]]  # 8x8, 0..16
    img = np.asarray(val[5][0])[:, :, 0].astype(float)
    pooled = img.reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255  # undo the 4x upsampling roughly
    assert np.abs(pooled - raw).mean() < 1.5
    assert int(val[5][1]) == int(load_digits().target[val.indices[5]])


# --- pixels ----------------------------------------------------------------------------------------------------------

def test_mode_conversions_to_rgb(tmp_path):
    gray = Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8), "L")
    assert np.asarray(to_rgb(gray))[0, 1].tolist() == [128, 128, 128]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]
    wide = Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    assert np.asarray(to_rgb(wide))[:, :, 0].tolist() == [[255, 128], [0, 1]]  # rescaled, not clipped
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]  # transparent -> white

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    wide.save(tmp_path / "w.png")
    cmyk.save(tmp_path / "c.jpg")
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert np.asarray(load_image(tmp_path / "w.png"))[0, :, 0].tolist() == [255, 128]
    c = np.asarray(load_image(str(tmp_path / "c.jpg")))
    assert c.shape == (2, 2, 3) and c.min() > 240


def test_imagenet_class_names_are_readable_and_unique():
    assert len(IMAGENET_CLASSES) == 1000 == len(set(IMAGENET_CLASSES))
    assert IMAGENET_CLASSES[:2] == ("tench", "goldfish") and IMAGENET_CLASSES[999] == "toilet tissue"


def test_transparent_colour_of_grey_and_rgb_pngs_is_composited_onto_white(tmp_path):
    """A PNG tRNS chunk in a grey or RGB (not palette) PNG marks one colour transparent: its pixels came out as that
    colour (black here) where every other transparent pixel comes out white."""
    grey = Image.fromarray(np.array([[0, 100]], dtype=np.uint8), "L")
    grey.save(tmp_path / "grey.png", transparency=0)
    rgb = Image.fromarray(np.array([[[0, 0, 0], [10, 20, 30]]], dtype=np.uint8), "RGB")
    rgb.save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    assert np.asarray(load_image(tmp_path / "grey.png")).tolist() == [[[255] * 3, [100] * 3]]
    assert np.asarray(load_image(tmp_path / "rgb.png")).tolist() == [[[255] * 3, [10, 20, 30]]]


def test_jfif_and_avif_files_are_images(tmp_path):
    """Windows browsers save JPEGs as .jfif (and some cameras .jpe), phones and browsers AVIF as .avif: a class of
    them was "holds no image files"."""
    from PIL import features
    root = tmp_path / "data"
    write_images(root, classes=("cat",), per_class=2)
    (root / "dog").mkdir()
    for i, ext in enumerate((".jfif", ".JPE")):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "dog" / f"d{i}{ext}", format="JPEG")
    avif = root / "dog" / "d2.avif"
    if features.check("avif"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(avif)
    else:  # this Pillow reads no AVIF: the file is still an image, one it names as unreadable
        avif.write_bytes(b"\0\0\0\x1cftypavif")
    ds = create_dataset("", root=str(root), split="train")
    assert ds.class_names == ["cat", "dog"] and [t for _, t in ds.samples].count(1) == 3
    if features.check("avif"):
        assert np.asarray(ds[4][0]).mean(axis=(0, 1)).round(-1).tolist() == [200, 30, 30]


def test_float_tiff_with_no_data_pixels_and_wide_32_bit_tiff_keep_their_scale(tmp_path):
    """One not-a-number pixel (a float TIFF's "no data") made a [0, 1] image all black (its peak was NaN, so it was
    not scaled by 255, and NaN cast to uint8 with a RuntimeWarning); 32-bit values past 65535 were clipped white
    (3 of these 4 pixels 255)."""
    floats = np.full((2, 2), 0.5, np.float32)
    floats[0, 0] = np.nan
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    Image.fromarray(np.array([[0, 500000], [1000000, 250000]], np.int32), "I").save(tmp_path / "i.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert np.asarray(load_image(tmp_path / "f.tif"))[:, :, 0].tolist() == [[0, 128], [128, 128]]
    assert np.asarray(load_image(tmp_path / "i.tif"))[:, :, 0].tolist() == [[0, 128], [255, 64]]


def test_an_image_over_pils_pixel_limit_is_named(tmp_path, monkeypatch, caplog):
    """PIL's decompression-bomb warning (an image over MAX_IMAGE_PIXELS, read anyway) named no file, once per process;
    twice the limit is refused, and the dataset names it as unreadable."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    write_images(tmp_path / "data", classes=("cat",), per_class=1, size=12)  # 144 px: over the limit, under twice it
    Image.new("RGB", (15, 15)).save(tmp_path / "data" / "cat" / "huge.png")  # 225 px: over twice the limit
    ds = create_dataset("", root=str(tmp_path / "data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert ds[0][0].size == (12, 12)
        with pytest.raises(UnreadableImageError, match="huge.png: Image size .* could be decompression bomb"):
            ds[1]
    assert f"large image {tmp_path / 'data' / 'cat' / 'cat_0.png'}: 12x12 px, over PIL.Image.MAX_IMAGE_PIXELS (100)" \
        in caplog.text
