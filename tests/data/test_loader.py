import argparse
import gc
import os
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sequencer.data import create_dataset, create_loader, resolve_data_config
from sequencer.data.loader import _ShardSampler
from sequencer.errors import SequencerError
from sequencer.models import create_model

from .conftest import write_images


def _loader(ds, batch_size, is_training=False, **kw):
    kw.setdefault("mean", (0.5, 0.5, 0.5))
    kw.setdefault("std", (0.5, 0.5, 0.5))
    return create_loader(ds, (3, 8, 8), batch_size, is_training, crop_pct=1.0, **kw)


def test_resolve_data_config_layers_args_over_model_defaults():
    model = create_model("sequencer2d_nano", layers=(1, 1, 1), embed_dims=(8, 8, 8), hidden_sizes=(2, 2, 2))
    assert resolve_data_config({}, model) == dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                                  crop_pct=1.0, interpolation="bicubic")
    args = argparse.Namespace(img_size=16, input_size=None, mean=[0.2], std=None, crop_pct=0.9,
                              interpolation="bilinear")
    cfg = resolve_data_config(args, model)
    assert cfg == dict(input_size=(3, 16, 16), mean=(0.2,) * 3, std=(0.5,) * 3, crop_pct=0.9,
                       interpolation="bilinear")
    assert resolve_data_config({"input_size": (3, 24, 24), "img_size": 16}, model)["input_size"] == (3, 24, 24)
    with pytest.raises(SequencerError, match="interpolation"):
        resolve_data_config({"interpolation": "cubic-ish"}, model)
    with pytest.raises(SequencerError, match="`crop_pct=0.0` must be in"):
        resolve_data_config({"crop_pct": 0}, model)
    with pytest.raises(SequencerError, match="2 values for 3"):
        resolve_data_config({"mean": (0.1, 0.2)}, model)


def test_eval_transform_matches_resize_then_center_crop(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c" / "x.png")
    ds = create_dataset("", root=str(tmp_path))
    loader = create_loader(ds, (3, 16, 16), 1, False, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), crop_pct=0.8,
                           interpolation="bilinear")
    images, targets = next(iter(loader))
    ref = TF.resize(Image.fromarray(pixels), 20, interpolation=TF.InterpolationMode.BILINEAR)  # 16 / 0.8
    ref = TF.normalize(TF.to_tensor(TF.center_crop(ref, 16)), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.float32 and targets.dtype == torch.int64
    torch.testing.assert_close(images[0], ref)


def test_batches_drop_last_and_batch_size_errors(image_folder):
    train = create_dataset("", root=str(image_folder), split="train")
    loader = _loader(train, 4, is_training=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 1 and batches[0][0].shape == (4, 3, 8, 8)  # 6 images, last 2 dropped
    val = _loader(create_dataset("", root=str(image_folder), split="val"), 64)  # bigger than data: fine for eval
    assert [len(t) for _, t in val] == [4]
    with pytest.raises(SequencerError, match=r"`batch_size=7` is larger than the 6 images.*`batch_size=6` or less"):
        _loader(train, 7, is_training=True)


def test_digits_augmentation_defaults_have_no_flip():
    ds = create_dataset("digits", split="train")
    names = [type(t).__name__ for t in _loader(ds, 8, is_training=True).dataset.transform.transforms]
    assert "RandomHorizontalFlip" not in names
    crop = _loader(ds, 8, is_training=True).dataset.transform.transforms[0]
    assert crop.scale == (0.75, 1.0)
    flipped = _loader(ds, 8, is_training=True, hflip=0.5).dataset.transform.transforms
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in flipped]


def test_shuffle_is_seeded_per_epoch(image_folder):
    ds = create_dataset("", root=str(image_folder), split="train")

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([t for _, t in loader]).tolist()

    a, b = _loader(ds, 1, is_training=True, seed=3), _loader(ds, 1, is_training=True, seed=3)
    epochs_a = [order(a, e) for e in range(4)]
    assert epochs_a == [order(b, e) for e in (0, 1, 2, 3)]
    assert len({tuple(o) for o in epochs_a}) > 1  # the order changes between epochs
    resumed = _loader(ds, 1, is_training=True, seed=3)
    resumed.sampler.set_epoch(2)  # as a trainer resuming at epoch 2 does
    assert torch.cat([t for _, t in resumed]).tolist() == epochs_a[2]
    assert torch.cat([t for _, t in resumed]).tolist() == epochs_a[3]  # no set_epoch: the next epoch
    fresh = _loader(ds, 1, is_training=True, seed=3)
    assert [torch.cat([t for _, t in fresh]).tolist() for _ in range(2)] == epochs_a[:2]
    assert order(_loader(ds, 1, is_training=True, seed=4), 0) != epochs_a[0]


def test_shard_sampler_covers_every_sample_once():
    shards = [list(_ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def _folder_with_broken_files(root, good_per_class, bad):
    write_images(root, classes=("a", "b"), per_class=good_per_class, size=4)
    broken = []
    for i in range(bad):
        path = root / "a" / f"broken_{i}.png"
        if i % 3 == 0:
            path.write_bytes(b"")  # empty
        elif i % 3 == 1:
            path.write_bytes(b"<html>not an image</html>")  # wrong format
        else:  # truncated
            data = (root / "b" / "b_0.png").read_bytes()
            path.write_bytes(data[: len(data) // 2])
        broken.append(str(path))
    return broken


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog, workers):
    broken = _folder_with_broken_files(tmp_path, good_per_class=100, bad=2)  # 2 of 202: under 1%
    ds = create_dataset("", root=str(tmp_path))
    loader = _loader(ds, 50, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        targets = torch.cat([t for _, t in loader])
    assert len(targets) == 200 and targets.tolist() == [0] * 100 + [1] * 100  # dropped, not replaced
    assert sorted(loader.skipped) == sorted(broken) and ds.skipped == set(broken)
    for path in broken:
        assert path in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        list(loader)
    assert len(loader.skipped) == 2 and "broken" not in caplog.text  # counted every pass, warned once


def test_unreadable_images_in_training_keep_batches_full(tmp_path):
    broken = _folder_with_broken_files(tmp_path, good_per_class=100, bad=2)
    loader = _loader(create_dataset("", root=str(tmp_path)), 40, is_training=True)
    sizes = [len(t) for _, t in loader]
    assert sizes == [40] * 5 and sorted(loader.skipped) == sorted(broken)


def test_a_ranks_share_counts_its_own_unreadable_files_not_the_replacements_it_tried(tmp_path, monkeypatch):
    """Rank 0 of 2 (105 of 210 images): one broken file in its share, replaced by the next file, broken too and in
    rank 1's share. 1 of 105 is within 1%; it was refused as "1 of 105 images are unreadable (more than 1%)" (the
    replacement counted), where one process reading all 210 accepts both."""
    write_images(tmp_path, classes=("a", "b"), per_class=105, size=4)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ds = create_dataset("", root=str(tmp_path))
    loader = _loader(ds, 15, is_training=True, distributed=True)
    loader.set_epoch(0)
    share = set(loader.sampler)
    own = next(i for i in sorted(share) if i + 1 not in share and i + 1 < len(ds))
    broken = [ds.samples[own][0], ds.samples[own + 1][0]]
    for path in broken:
        Path(path).write_bytes(b"")
    loader.set_epoch(0)
    assert sum(len(t) for _, t in loader) == 105  # the batches stay full: the next readable file stands in
    assert sorted(loader.skipped) == sorted(broken)


def test_more_than_one_percent_unreadable_aborts_with_the_list(tmp_path):
    broken = _folder_with_broken_files(tmp_path, good_per_class=20, bad=3)  # 3 of 43
    loader = _loader(create_dataset("", root=str(tmp_path)), 8)
    with pytest.raises(SequencerError, match=r"3 of 43 images are unreadable") as e:
        list(loader)
    for path in broken:
        assert path in str(e.value)


def test_grayscale_one_channel_input(image_folder):
    ds = create_dataset("", root=str(image_folder), split="val")
    images, _ = next(iter(create_loader(ds, (1, 8, 8), 4, False, mean=(0.5,), std=(0.5,), crop_pct=1.0)))
    assert images.shape == (4, 1, 8, 8)


RANK_SCRIPT = '''
import sys, torch, torch.distributed as dist
from sequencer.data import create_dataset, create_loader
dist.init_process_group("gloo")
ds = create_dataset("", root=sys.argv[1], split="train")
loader = create_loader(ds, (3, 8, 8), 2, True, num_workers=2, distributed=True, seed=int(sys.argv[3]),
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, crop_pct=1.0)
loader.set_epoch(1)
torch.save(torch.cat([images for images, _ in loader]), f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
'''


def _rank_batches(tmp_path, root, seed: int, name: str) -> list:
    import subprocess
    import sys
    from pathlib import Path
    script, out = tmp_path / "ranks.py", tmp_path / name
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(root), str(out), str(seed)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_every_rank_and_worker_draws_its_own_augmentation_and_a_rerun_repeats(tmp_path):
    """Every image is the same picture, so any difference between batches is the augmentation's."""
    root = tmp_path / "same"
    paths = write_images(root / "train", classes=("a",), per_class=8)
    for path in paths[1:]:
        path.write_bytes(paths[0].read_bytes())
    rank0, rank1 = _rank_batches(tmp_path, root, 7, "first")
    assert rank0.shape == rank1.shape == (4, 3, 8, 8)
    for i in range(4):  # worker k of rank 0 and worker k of rank 1 (batches alternate between the 2 workers)
        assert not torch.equal(rank0[i], rank1[i])
    assert not torch.equal(rank0[:2], rank0[2:])  # the two workers of one rank differ too
    again = _rank_batches(tmp_path, root, 7, "again")
    assert torch.equal(again[0], rank0) and torch.equal(again[1], rank1)  # exactly repeatable from the seed


def test_persistent_workers_repeat_each_epochs_augmentation_on_resume(image_folder):
    """Workers live across epochs; epoch 2 still draws what a run resumed at epoch 2 draws, with any number of
    workers, and a pass resumed after its first batches (``set_epoch(e, skip_batches)``) is the rest of the pass,
    drawn alike (each batch is seeded from its place in the pass, not from the worker that loads it)."""
    ds = create_dataset("", root=str(image_folder), split="train")

    def batches(loader, epoch, skip=0):
        loader.set_epoch(epoch, skip)
        return torch.cat([images for images, _ in loader])

    kw = dict(seed=5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    run = _loader(ds, 2, is_training=True, num_workers=2, **kw)
    assert run.persistent_workers
    epochs = [batches(run, e) for e in range(3)]
    resumed = _loader(ds, 2, is_training=True, num_workers=1, **kw)
    assert torch.equal(batches(resumed, 2), epochs[2])
    assert torch.equal(batches(resumed, 1, skip=1), epochs[1][2:])  # the first batch (of 2) left out, not loaded
    assert torch.equal(torch.cat([images for images, _ in resumed]), epochs[2])  # the next pass is whole
    assert not torch.equal(epochs[1], epochs[2])
    labels = [t for _, t in _loader(ds, 2, is_training=True, num_workers=0, seed=5)]
    in_process = _loader(ds, 2, is_training=True, num_workers=0, seed=5)
    in_process.set_epoch(0, skip_batches=1)
    assert torch.equal(torch.cat([t for _, t in in_process]), torch.cat(labels[1:]))


def test_uint8_batches_normalised_on_the_device_match_the_cpu_transform(image_folder):
    ds = create_dataset("", root=str(image_folder), split="validation")
    on_cpu = torch.cat([images for images, _ in _loader(ds, 2, normalize_on_device=False)])
    uint8 = _loader(ds, 2, normalize_on_device=True)
    # workers send uint8: a tensor, or with the oldest timm declared (1.0.15, its ToNumpy) an array
    assert str(uint8.dataset.dataset.transform(Image.new("RGB", (8, 8))).dtype) in ("torch.uint8", "uint8")
    on_device = torch.cat([images for images, _ in uint8])
    assert on_device.dtype == torch.float32
    torch.testing.assert_close(on_device, on_cpu, atol=1e-5, rtol=1e-5)


def test_loaders_leave_the_callers_dataset_as_it_was(image_folder):
    """Two loaders over one dataset each read with their own transform, and the dataset keeps its own
    (issue 25 item 5: create_loader used to overwrite ``dataset.transform``)."""
    ds = create_dataset("", root=str(image_folder), split="train")
    own = ds.transform
    train = _loader(ds, 2, is_training=True)
    evaluation = create_loader(ds, (3, 4, 4), 2, False, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    assert ds.transform is own
    assert next(iter(train))[0].shape[-2:] == (8, 8) and next(iter(evaluation))[0].shape[-2:] == (4, 4)
    assert ds.transform is own and ds[0][0].size == (8, 8)  # still the caller's PIL images


def test_a_workers_error_kept_by_the_caller_keeps_none_of_the_loaders_files(image_folder, monkeypatch):
    """A library call's loader whose worker failed: its workers end with the call (``workers_stopped_on_exit``), and
    the one-line error it raises, kept by the caller (a notebook's last error, a sweep's list of failures), held
    the loader's pipes and its batches' shared memory open through its traceback (8 descriptors)."""
    from sequencer.data.loader_workers import workers_stopped_on_exit

    ds = create_dataset("", root=str(image_folder), split="train")
    calls = iter(range(1000))
    monkeypatch.setattr(ds, "load", lambda index, load=ds.load: load(index) if next(calls) < 4 else 1 / 0)
    before = _open_files()
    with pytest.raises(SequencerError, match="worker failed: ZeroDivisionError") as failed:
        with workers_stopped_on_exit():
            list(_loader(ds, 2, num_workers=1))
    gc.collect()  # a pipe of the iterator's that multiprocessing frees only with a collection, as on success
    assert _open_files() - before == set(), failed.value


def _open_files() -> set[str]:
    """What this process's open descriptors refer to, each as ``FD -> TARGET`` (Linux's /proc; elsewhere none)."""
    found = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            found.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found



def test_loader_workers_leave_an_unchosen_start_method_unchosen(image_folder, monkeypatch):
    """A loader's workers start in the platform's default start method where the caller chose none, and leave it
    unchosen: the DataLoader's own default fixed it for the process, so that the caller's later
    ``multiprocessing.set_start_method("forkserver")`` raised 'context has already been set'."""
    import multiprocessing
    # a fresh process's state (earlier tests' loaders chose it here): monkeypatch gives back this one's
    monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context", None)
    loader = _loader(create_dataset("", root=str(image_folder), split="validation"), 2, num_workers=2)
    assert sum(len(images) for images, _ in loader) == 4
    assert loader.multiprocessing_context.get_start_method() == multiprocessing.get_all_start_methods()[0]
    assert multiprocessing.get_start_method(allow_none=True) is None
