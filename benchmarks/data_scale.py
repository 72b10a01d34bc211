"""What our image-folder code costs as the dataset grows toward ImageNet-1K (1,281,167 training images, 1,000 class
folders): the class-folder scan, the --val-fraction carve, the dataset's Python memory and what forked workers get.

Builds a synthetic ImageNet-shaped tree of empty files (``train/nXXXXXXXX/nXXXXXXXX_N.JPEG``; nothing opens them) in a
temporary folder for each size, measures, and deletes it. Run it on an idle machine; the growth between sizes (time
and bytes per file) is what to read, a loaded machine's absolute seconds are not a figure to quote:

    PYTHONPATH=src python benchmarks/data_scale.py --sizes 10000 100000 300000 [--results data_scale.json]

Keep a size's file count within the disk's free inodes (``df -i``); 1.28M is extrapolated from the growth.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import tracemalloc

CLASSES = 1000


def make_tree(root: str, n_files: int, n_classes: int = CLASSES) -> None:
    """``root/train/CLASS/CLASS_I.JPEG``: ``n_files`` empty files spread over ``n_classes`` folders."""
    for c in range(n_classes):
        name = f"n{1440764 + 37 * c:08d}"
        folder = os.path.join(root, "train", name)
        os.makedirs(folder)
        for i in range(c, n_files, n_classes):
            os.close(os.open(os.path.join(folder, f"{name}_{i}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))


def timed(fn):
    """(fn(), seconds); no tracing (tracemalloc slows Python several times over)."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def traced_bytes(make):
    """(make(), the Python bytes it keeps alive once made, the peak while making it)."""
    tracemalloc.start()
    value = make()
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, kept, peak


def private_dirty_bytes() -> int:
    """This process's private dirty memory (Linux: pages it wrote, copied-on-write ones included)."""
    with open("/proc/self/smaps_rollup") as f:
        return 1024 * sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def forked_worker_copies(samples) -> int:
    """Bytes a forked child copies by reading every item of ``samples`` once (as a data-loader worker does over an
    epoch): the child touches each item's reference count, and each touched page becomes its own. Linux only."""
    gc.freeze()  # the child's garbage collector would touch every tracked object; workers' collections do too
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without cleanup
        os.close(read)
        before = private_dirty_bytes()
        for i in range(len(samples)):
            path, target = samples[i]
        os.write(write, str(private_dirty_bytes() - before).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        copied = int(f.read() or 0)
    os.waitpid(pid, 0)
    gc.unfreeze()
    return copied


def measure(n_files: int, workdir: str | None, n_classes: int = CLASSES) -> dict:
    from sequencer.data import create_dataset
    from sequencer.data.splits import carve_held_out, split_by_keys

    root = tempfile.mkdtemp(prefix="data_scale_", dir=workdir)
    try:
        make_tree(root, n_files, n_classes)
        gc.collect()  # once: a collection with torch imported is slow, and nothing below leaves cycles behind
        _, scan_s = timed(lambda: create_dataset("", root=root, split="train"))
        dataset, kept, scan_peak = traced_bytes(lambda: create_dataset("", root=root, split="train"))
        held_out, carve_s = timed(lambda: carve_held_out(dataset, 0.1, 0))
        (rest, carved), split_s = timed(lambda: split_by_keys(dataset, held_out))
        pickled = len(pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL))
        as_tuples = list(dataset.samples)  # the list of (path, target) tuples the dataset held before it packed them
        worker_tuples = forked_worker_copies(as_tuples) if sys.platform == "linux" else None
        del as_tuples
        worker_packed = forked_worker_copies(dataset.samples) if sys.platform == "linux" else None
        return dict(files=n_files, scan_s=scan_s, scan_peak_bytes=scan_peak, dataset_bytes=kept,
                    dataset_bytes_per_file=kept / n_files, pickled_bytes=pickled,
                    worker_copied_tuples_bytes=worker_tuples, worker_copied_packed_bytes=worker_packed,
                    carve_s=carve_s, split_s=split_s, held_out=len(held_out),
                    train_after=len(rest), held_out_after=len(carved))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 300000])
    parser.add_argument("--classes", type=int, default=CLASSES, help="class folders (ImageNet-1K: 1000)")
    parser.add_argument("--workdir", default=None, help="where to build the trees (default: the temp folder)")
    parser.add_argument("--results", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(n, args.workdir, args.classes) for n in args.sizes]
    print("| files | scan s | scan us/file | scan peak B/file | dataset B/file | pickled B/file | "
          "worker copies B/file: tuples, packed | carve+split us/file |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["files"]
        copies = (f"{r['worker_copied_tuples_bytes'] / n:.0f}, {r['worker_copied_packed_bytes'] / n:.1f}"
                  if r["worker_copied_packed_bytes"] is not None else "n/a")
        print(f"| {n} | {r['scan_s']:.2f} | {1e6 * r['scan_s'] / n:.1f} | {r['scan_peak_bytes'] / n:.0f} | "
              f"{r['dataset_bytes_per_file']:.0f} | {r['pickled_bytes'] / n:.0f} | {copies} | "
              f"{1e6 * (r['carve_s'] + r['split_s']) / n:.1f} |")
    if args.results:
        with open(args.results, "w") as f:
            json.dump(dict(python=sys.version.split()[0], rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
