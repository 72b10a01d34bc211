"""CIFAR-10 in torchvision's own pickled layout, written by hand (nothing downloads in the tests)."""
import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, n_train=24, n_test=8) -> Path:
    """root/cifar-10-batches-py in torchvision's own pickled layout (data_batch_1..5, test_batch, batches.meta)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = [i % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        return {"data": data, "labels": labels}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5 + (i == 1) * (n_train % 5))))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root
