import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sequencer.engine.evaluate import evaluate


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1/top-5/loss by explicit per-sample loops."""
    top1 = top5 = loss = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        ranked = sorted(range(len(row)), key=lambda j: -row[j])
        top1 += ranked[0] == t
        top5 += t in ranked[:5]
        loss += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    n = len(targets)
    return dict(top1=100 * top1 / n, top5=100 * top5 / n, loss=loss / n, count=n)


def _batches(n=23, classes=7, features=6, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, 1, 1, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], x, y


def _model(features=6, classes=7):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))


def test_evaluate_matches_per_sample_reference():
    batches, x, y = _batches()
    model = _model()
    metrics = evaluate(model, batches, "cpu")
    with torch.no_grad():
        ref = _reference(model(x), y)
    assert metrics["count"] == ref["count"] == 23
    assert metrics["top1"] == pytest.approx(ref["top1"]) and metrics["top5"] == pytest.approx(ref["top5"])
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert 0 < ref["top1"] < ref["top5"] < 100  # the reference is not trivially 0 or 100
    assert metrics["images_per_sec"] > 0 and not model.training


def test_top5_with_fewer_than_five_classes_and_empty_loader():
    batches, _, _ = _batches(classes=3)
    assert evaluate(_model(classes=3), batches, "cpu")["top5"] == 100.0
    empty = evaluate(_model(), [], "cpu")
    assert empty["count"] == 0 and math.isnan(empty["loss"])


def test_logits_that_are_not_numbers_give_no_accuracy(caplog):
    """topk ranks NaN first: a model whose outputs are all NaN scored chance level (10% top-1, 50% top-5 of 10
    classes) beside its NaN loss. One image of 23 with an inf is enough to say so."""
    batches, x, y = _batches()
    broken = nn.Sequential(_model(), nn.Threshold(10.0, float("nan")))  # every logit below 10 becomes NaN
    metrics = evaluate(broken, batches, "cpu")
    assert math.isnan(metrics["top1"]) and math.isnan(metrics["top5"]) and math.isnan(metrics["loss"])
    assert metrics["nonfinite"] == metrics["count"] == 23 and "23 of 23 images gave logits that are NaN or +inf" in \
        caplog.text
    one_inf = [(images.clone(), targets) for images, targets in batches]
    one_inf[2][0][1] = float("inf")
    assert evaluate(_model(), one_inf, "cpu")["nonfinite"] == 1
    masked = nn.Sequential(_model(), nn.Threshold(-0.5, float("-inf")))  # -inf: a class ruled out, not a fault
    ruled_out = evaluate(masked, batches, "cpu")
    assert ruled_out["nonfinite"] == 0 and math.isfinite(ruled_out["top1"])


def test_bfloat16_autocast_stays_close():
    batches, _, _ = _batches(n=40)
    model = _model()
    full = evaluate(model, batches, "cpu")
    half = evaluate(model, batches, "cpu", amp_dtype=torch.bfloat16)
    assert half["count"] == 40 and abs(half["loss"] - full["loss"]) < 0.05
    assert evaluate(model, batches, "cpu", amp_dtype="bfloat16")["loss"] == pytest.approx(half["loss"])


def _join(rank, world, out):
    """Join the gloo group of the test's processes through a file in ``out``: no port to pick, so none another
    process can take first (a port found free and bound later by rank 0 could be, on a busy machine)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)


def _rank_main(rank, world, root, out):
    _join(rank, world, out)
    try:
        from sequencer.data import create_dataset, create_loader
        ds = create_dataset("", root=root)
        loader = create_loader(ds, (3, 4, 4), 2, False, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                               distributed=True)
        metrics = evaluate(_image_model(), loader, "cpu", distributed=True)
        result = _validate_broken(os.path.join(out, "broken"))
        torch.save(dict(metrics, validated=(result.images, result.unreadable)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _broken_folder(root, broken=("0.png", "1.png")) -> None:
    """210 images in 3 class folders; ``broken`` of class a unreadable (a/0.png and a/1.png: one in each rank's
    share)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(210):
        folder = root / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / f"{i // 3}.png")
    for name in broken:
        (root / "a" / name).write_bytes(b"not an image")


def _validate_broken(root):
    import sequencer
    return sequencer.validate(model=_image_model(), data=root, img_size=4, batch_size=16, workers=0, device="cpu",
                              progress=False)


def _image_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))


@pytest.mark.slow
def test_distributed_evaluation_is_exact(tmp_path):
    """Two gloo ranks over 7 images (uneven shares, no padding) give the single-process numbers; `validate`'s count
    of unreadable images is every rank's (it was rank 0's share: 1 of the 2)."""
    import numpy as np
    from PIL import Image

    from sequencer.data import create_dataset, create_loader

    rng = np.random.default_rng(0)
    for i in range(7):
        folder = tmp_path / "data" / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    loader = create_loader(create_dataset("", root=str(tmp_path / "data")), (3, 4, 4), 2, False,
                           mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    single = evaluate(_image_model(), loader, "cpu")
    _broken_folder(tmp_path / "broken")
    alone = _validate_broken(tmp_path / "broken")
    assert (alone.images, alone.unreadable) == (208, 2)
    # fork: no re-import of torch per rank (CPU-only processes, so forking is safe)
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "data"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["count"] == single["count"] == 7
        assert (got["top1"], got["top5"]) == (single["top1"], single["top5"])
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-6)  # float32 logits, other batching
        assert got["validated"] == (208, 2)


def _clustered_rank_main(rank, world, root, out):
    from sequencer.errors import SequencerError

    _join(rank, world, out)
    try:
        result = _validate_broken(os.path.join(root, "clustered"))
        try:
            _validate_broken(os.path.join(root, "too_many"))
            refused = ""
        except SequencerError as e:
            refused = str(e)
        torch.save(dict(validated=(result.images, result.unreadable), refused=refused),
                   os.path.join(out, f"clustered{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _break_indices(root, indices) -> list[str]:
    """Overwrite the images at ``indices`` of ``root``'s dataset order with bytes that are no image."""
    from sequencer.data import create_dataset

    dataset = create_dataset("", root=str(root))
    paths = [dataset.describe(i) for i in indices]
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"not an image")
    return paths


@pytest.mark.slow
def test_distributed_unreadable_limit_is_the_whole_passs(tmp_path):
    """The 1% limit of unreadable images applies to the whole pass under DDP, not to each rank's share: 2 broken of
    210, both in rank 0's share, pass as they do in one process (rank 0 refused them alone: 2 > 1% of its 105),
    and 3 broken of 210, two in one share and one in the other (within each share's count of the whole pass's
    allowance), are refused on every rank as in one process."""
    from sequencer.errors import SequencerError

    for name, broken in (("clustered", (2, 4)), ("too_many", (2, 4, 3))):
        _broken_folder(tmp_path / name, broken=())
        _break_indices(tmp_path / name, broken)
    alone = _validate_broken(tmp_path / "clustered")
    assert (alone.images, alone.unreadable) == (208, 2)
    with pytest.raises(SequencerError, match="3 of 210 images are unreadable"):
        _validate_broken(tmp_path / "too_many")
    mp.start_processes(_clustered_rank_main, args=(2, str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"clustered{rank}.pt", weights_only=True)
        assert got["validated"] == (208, 2)
        assert "3 of 210 images are unreadable" in got["refused"]
