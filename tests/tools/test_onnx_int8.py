"""int8 ONNX deployment on a model trained in the test on real images (scikit-learn's handwritten digits):
export --quantize int8 --verify, validate --onnx, predict --onnx, and their one-line refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.cli import main
from sequencer.data import create_transform
from sequencer.data.datasets import DigitsDataset

from .conftest import TINY_ARCH, TINY_DATA_CONFIG, TINY_KWARGS, reference_inputs, reference_model

DIGITS = [str(i) for i in range(10)]
pytestmark = pytest.mark.slow  # the module trains a model (~15-40 s on 2 cores)


# 16 px digits, a 4x4 token grid; wider than the tools' tiny model: with 4-channel LSTMs int8 flips 1-2% of answers
DIGITS_KWARGS = dict(TINY_KWARGS, patch_sizes=(4, 1, 1), embed_dims=(32, 48, 48), hidden_sizes=(8, 16, 16),
                     num_classes=10)
DIGITS_DATA_CONFIG = dict(TINY_DATA_CONFIG, img_size=16)


def _digit_tensors(dataset: DigitsDataset) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = DIGITS_DATA_CONFIG
    transform = create_transform((3, 16, 16), False, mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                 interpolation=cfg["interpolation"])
    images, labels = zip(*(dataset.load(i) for i in range(len(dataset))))
    return torch.stack([transform(im) for im in images]), torch.tensor(labels)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """(checkpoint, root with root/val/<digit>/*.png): a small model trained 6 epochs on the digits (~89% top-1)."""
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    from sequencer.models import create_model
    model = create_model(TINY_ARCH, **DIGITS_KWARGS)
    x, y = _digit_tensors(DigitsDataset("train"))
    epochs, steps_per_epoch = 6, -(-len(y) // 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=epochs * steps_per_epoch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with each other
    try:
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(y)).split(64):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    checkpoint = root / "digits.pth"
    torch.save({"version": 1, "arch": TINY_ARCH, "model_kwargs": dict(model.model_kwargs), "class_names": DIGITS,
                "data_config": DIGITS_DATA_CONFIG, "state_dict": model.state_dict()}, checkpoint)
    val = DigitsDataset("val")
    for i in range(len(val)):
        image, label = val.load(i)
        (root / "val" / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(root / "val" / str(label) / f"{i}.png")
    return checkpoint, root


@pytest.fixture(scope="module")
def digits_onnx(digits_model, tmp_path_factory):
    """The fp32 and the int8 (verified on the val images) exports of the digits model, and the export's stdout."""
    checkpoint, root = digits_model
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out / "fp32.onnx"), "--dynamic-batch"]) == 0
    import contextlib
    import io
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out / "int8.onnx"), "--dynamic-batch",
                     "--quantize", "int8", "--verify", str(root / "val")]) == 0
    return out / "fp32.onnx", out / "int8.onnx", stdout.getvalue()


def _onnx_logits(path, x):
    import onnxruntime as ort
    return torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0])


def test_int8_export_agrees_with_fp32_and_keeps_accuracy(digits_model, digits_onnx):
    import onnx

    checkpoint, root = digits_model
    fp32_path, int8_path, stdout = digits_onnx
    files = sorted((root / "val").rglob("*.png"))
    x = reference_inputs(files, size=16)
    labels = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        pytorch = reference_model(checkpoint)(x).argmax(-1)
    # dynamic int8 scales activations per batch, so its answers depend on the batch: the command's batches of 32
    int8 = torch.cat([_onnx_logits(int8_path, chunk) for chunk in x.split(32)]).argmax(-1)
    fp32_top1 = (pytorch == labels).double().mean().item()
    int8_top1 = (int8 == labels).double().mean().item()
    agreement = (int8 == pytorch).double().mean().item()
    assert fp32_top1 > 0.8  # the model really learnt the digits: a meaningful accuracy to keep
    assert agreement >= 0.99 and int8_top1 >= fp32_top1 - 0.01
    # the command reports the same figures
    assert f"agrees with fp32 on {100 * agreement:.2f}% of {len(files)} images" in stdout
    assert f"top-1 fp32 {100 * fp32_top1:.2f}%, int8 {100 * int8_top1:.2f}%" in stdout
    # the int8 file really is quantised, and carries the model's metadata
    proto = onnx.load(str(int8_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} & ops, ops
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["arch"] == TINY_ARCH and json.loads(props["class_names"]) == DIGITS
    assert json.loads(props["data_config"])["mean"] == list(TINY_DATA_CONFIG["mean"])
    assert json.loads(props["input_size"]) == [3, 16, 16] and "int8" in props["quantization"]


def test_int8_export_refused_below_min_agreement(digits_model, tmp_path, monkeypatch, capsys):
    """A deliberately broken int8 model (its logits reversed) is refused; nothing written, old file kept."""
    from sequencer.tools.onnx_runtime import OnnxModel

    checkpoint, root = digits_model
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    real_run = OnnxModel.run_numpy
    monkeypatch.setattr(OnnxModel, "run_numpy",
                        lambda self, images: -real_run(self, images) if self.quantized else real_run(self, images))
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out), "--quantize", "int8",
                 "--verify", str(root / "val")]) == 2
    err = capsys.readouterr().err
    assert "below --min-agreement 99%; nothing written" in err and err.count("\n") == 1
    assert out.read_bytes() == b"previous export" and sorted(tmp_path.iterdir()) == [out]


def test_int8_export_threshold_is_applied(digits_model, tmp_path, capsys):
    """The unbroken int8 model refused under an agreement it cannot reach, accepted under one it reaches."""
    checkpoint, root = digits_model
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out), "--quantize", "int8",
                 "--verify", str(root / "val" / "3"), "--min-agreement", "1.5"]) == 2
    assert "not a fraction" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out), "--quantize", "int8",
                 "--verify", str(root / "val" / "3"), "--min-agreement", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert "int8 agrees with fp32 on" in stdout and "top-1" not in stdout  # one class folder: no labels
    assert out.is_file() and not list(tmp_path.glob(".*"))


def test_validate_onnx_equals_validate_checkpoint(digits_model, digits_onnx, tmp_path):
    checkpoint, root = digits_model
    fp32_path, int8_path, _ = digits_onnx
    results = {}
    for name, flags in (("ckpt", ["--checkpoint", str(checkpoint)]), ("fp32", ["--onnx", str(fp32_path)]),
                        ("int8", ["--onnx", str(int8_path)])):
        assert main(["validate", str(root), "--split", "val", "-b", "64", "-j", "0", "--device", "cpu",
                     "--results-file", str(tmp_path / f"{name}.json"), *flags]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ckpt, fp32, int8 = results["ckpt"], results["fp32"], results["int8"]
    assert fp32["count"] == ckpt["count"] == 360 and fp32["model"] == TINY_ARCH
    assert fp32["top1"] == ckpt["top1"] and fp32["top5"] == ckpt["top5"] and ckpt["top1"] > 60
    assert fp32["loss"] == pytest.approx(ckpt["loss"], abs=1e-4)
    assert abs(int8["top1"] - ckpt["top1"]) <= 1.0 and fp32["onnx"] == str(fp32_path)
    assert fp32["param_count"] is None and ckpt["param_count"] > 0  # not "0.00M params" (issue 19)


def test_predict_onnx_matches_checkpoint(digits_model, digits_onnx, capsys):
    checkpoint, root = digits_model
    fp32_path, _, _ = digits_onnx
    images = [str(root / "val" / d) for d in ("1", "7")]
    runs = {}
    for name, flags in (("ckpt", ["--checkpoint", str(checkpoint)]), ("onnx", ["--onnx", str(fp32_path)])):
        assert main(["predict", *images, "--json", "--topk", "3", *flags]) == 0
        runs[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(runs["onnx"]) == len(runs["ckpt"]) > 50
    for got, want in zip(runs["onnx"], runs["ckpt"]):
        assert got["image"] == want["image"]
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        assert got["predictions"][0]["label"] in DIGITS
        for p, q in zip(got["predictions"], want["predictions"]):
            assert p["prob"] == pytest.approx(q["prob"], abs=1e-4)


def test_onnx_bad_inputs_one_line_each(digits_model, digits_onnx, tmp_path, capsys):
    checkpoint, root = digits_model
    fp32_path, _, _ = digits_onnx
    image = str(next((root / "val" / "0").iterdir()))
    not_onnx = tmp_path / "weights.onnx"
    not_onnx.write_bytes(b"\x00\x01 this is not a protobuf")
    cases = [
        (["predict", image, "--onnx", str(not_onnx)], "is not an ONNX model"),
        (["validate", str(root), "--split", "val", "--onnx", str(not_onnx)], "is not an ONNX model"),
        (["predict", image, "--onnx", str(tmp_path / "missing.onnx")], "does not exist"),
        (["predict", image, "--onnx", str(fp32_path), "--img-size", "48"], "exported for 16x16 inputs, not 48x48"),
        (["validate", str(root), "--split", "val", "--onnx", str(fp32_path), "--img-size", "48"], "not 48x48"),
        (["predict", image, "--onnx", str(fp32_path), "--checkpoint", str(checkpoint)], "drop --checkpoint"),
        (["validate", str(root), "--split", "val", "--onnx", str(fp32_path), "--amp"], "--amp does not apply"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.pt"), "--quantize", "int8"],
         "--quantize int8 is for ONNX exports, not torchscript"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--verify", str(root)],
         "add --quantize int8"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8",
          "--verify", str(tmp_path / "nowhere")], "is not a folder of images"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.onnx"]


def test_random_weights_warned_by_predict_and_export(tmp_path, capsys):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    kwargs = ["--img-size", "32", "--num-classes", "3"]
    assert main(["predict", str(tmp_path / "grey.png"), "--model", "sequencer2d_nano", *kwargs]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: sequencer2d_nano runs with randomly initialised weights") and err.count("\n") == 1
    assert main(["export", "--model", "sequencer2d_nano", *kwargs, "-o", str(tmp_path / "m.safetensors")]) == 0
    assert "randomly initialised weights" in capsys.readouterr().err
