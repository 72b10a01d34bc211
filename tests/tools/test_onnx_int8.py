"""int8 ONNX deployment on a model trained in the test on real images (scikit-learn's handwritten digits):
export --quantize int8 --verify, validate --onnx, predict --onnx, and their one-line refusals."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sequencer.cli import main
from sequencer.data import create_transform
from sequencer.data.datasets import DigitsDataset

from test_benchmark_scripts import load_script

from .conftest import TINY_ARCH, TINY_DATA_CONFIG, TINY_KWARGS, reference_inputs, reference_model

# Four digits that scikit-learn's scans keep apart; the fixture's model gets every val image right but one and its
# smallest top-2 logit margin is 2.3 (measured on AMD Zen 5), far above what int8 rounding moves a logit on any CPU
DIGITS = ["0", "1", "4", "7"]
MARGIN = 1.0  # logits: the fp32 top-2 margin above which int8 must not change the answer (see the first test)
pytestmark = pytest.mark.slow  # the module trains a model (~30-90 s on 2 cores)


# 16 px digits, a 4x4 token grid; wider than the tools' tiny model: with 4-channel LSTMs int8 flips 1-2% of answers
DIGITS_KWARGS = dict(TINY_KWARGS, patch_sizes=(4, 1, 1), embed_dims=(32, 48, 48), hidden_sizes=(8, 16, 16),
                     num_classes=len(DIGITS))
DIGITS_DATA_CONFIG = dict(TINY_DATA_CONFIG, img_size=16)


def _digit_images(split: str) -> list[tuple]:
    """(PIL image, class index) for the images of ``split`` whose digit is one of DIGITS."""
    dataset = DigitsDataset(split)
    pairs = (dataset.load(i) for i in range(len(dataset)))
    return [(image, DIGITS.index(str(label))) for image, label in pairs if str(label) in DIGITS]


def _digit_tensors(pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = DIGITS_DATA_CONFIG
    transform = create_transform((3, 16, 16), False, mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                 interpolation=cfg["interpolation"])
    images, labels = zip(*pairs)
    return torch.stack([transform(im) for im in images]), torch.tensor(labels)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """(checkpoint, root with root/val/<digit>/*.png): a small model trained 20 epochs on four digits (~99% top-1,
    confident: see test_int8_export_agrees_with_fp32_and_keeps_accuracy)."""
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    from sequencer.models import create_model
    model = create_model(TINY_ARCH, **DIGITS_KWARGS)
    # benchmarks/int8_settings.py's training, the one its measurements of the int8 settings used
    load_script("int8_settings").fit(model, *_digit_tensors(_digit_images("train")), epochs=20, lr=5e-3,
                                     weight_decay=0.01)
    checkpoint = root / "digits.pth"
    torch.save({"version": 1, "arch": TINY_ARCH, "model_kwargs": dict(model.model_kwargs), "class_names": DIGITS,
                "data_config": DIGITS_DATA_CONFIG, "probabilities": "softmax", "state_dict": model.state_dict()},
               checkpoint)
    for i, (image, label) in enumerate(_digit_images("val")):
        (root / "val" / DIGITS[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / "val" / DIGITS[label] / f"{i}.png")
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


def _top2_margins(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _val_batch(root):
    files = sorted((root / "val").rglob("*.png"))
    return files, reference_inputs(files, size=16), torch.tensor([DIGITS.index(f.parent.name) for f in files])


def test_int8_export_agrees_with_fp32_and_keeps_accuracy(digits_model, digits_onnx):
    """Agreement is asserted through margins, so no CPU's int8 rounding decides the outcome: the fp32 model is
    confident (top-2 logit margin >= MARGIN on >= 99% of the images; 2.3 at the least on Zen 5), int8 moves no logit
    by MARGIN/2 (measured on Zen 5: at most 0.08 with its 8-bit settings, 0.15 with the avx2 class's 7-bit ones, 0.10
    static; the old per-tensor 7-bit setting 0.42), so no confident
    answer can change."""
    import onnx

    checkpoint, root = digits_model
    fp32_path, int8_path, stdout = digits_onnx
    files, x, labels = _val_batch(root)
    with torch.no_grad():
        reference = reference_model(checkpoint)(x)
    # dynamic int8 scales activations per batch, so its answers depend on the batch: the command's batches of 32
    int8_logits = torch.cat([_onnx_logits(int8_path, chunk) for chunk in x.split(32)])
    pytorch, int8 = reference.argmax(-1), int8_logits.argmax(-1)
    confident = _top2_margins(reference) >= MARGIN
    fp32_top1 = (pytorch == labels).double().mean().item()
    int8_top1 = (int8 == labels).double().mean().item()
    agreement = (int8 == pytorch).double().mean().item()
    assert fp32_top1 >= 0.95 and confident.double().mean() >= 0.99  # the fixture's model is what it claims
    assert (int8_logits - reference).abs().max() < MARGIN / 2
    assert (int8 == pytorch)[confident].all() and agreement >= 0.99
    assert abs(int8_top1 - fp32_top1) <= 1 - agreement + 1e-9  # each changed answer moves top-1 by one image
    # the command reports the same figures, and the settings of this CPU's class
    assert f"agrees with fp32 on {100 * agreement:.2f}% of {len(files)} images" in stdout
    assert f"top-1 on {len(files)} of them: fp32 {100 * fp32_top1:.2f}%, int8 {100 * int8_top1:.2f}%" in stdout
    from sequencer.hardware import cpu_info
    assert f"for {cpu_info().cpu_class} CPUs" in stdout
    # the int8 file really is quantised, and carries the model's metadata and its settings
    proto = onnx.load(str(int8_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops, ops
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["arch"] == TINY_ARCH and json.loads(props["class_names"]) == DIGITS
    assert json.loads(props["data_config"])["mean"] == list(TINY_DATA_CONFIG["mean"])
    assert json.loads(props["input_size"]) == [3, 16, 16] and "int8" in props["quantization"]
    from sequencer.tools.export import int8_settings
    assert json.loads(props["int8_settings"]) == dict(int8_settings(), keep_float=list(int8_settings()["keep_float"]))


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


def test_int8_export_threshold_is_applied(digits_model, tmp_path, monkeypatch, capsys):
    """The refusal compares the measured agreement A with --min-agreement itself: A is accepted, half an image above A
    is refused. The int8 answers are made to differ on every fourth image of each batch (logits reversed), so A is
    about 75% whatever the CPU; a threshold formula off by any factor or offset fails one of the two runs."""
    from sequencer.tools.onnx_runtime import OnnxModel

    checkpoint, root = digits_model
    real_run = OnnxModel.run_numpy

    def every_fourth_reversed(self, images):
        logits = real_run(self, images)
        if self.quantized:
            logits[::4] = -logits[::4]
        return logits

    monkeypatch.setattr(OnnxModel, "run_numpy", every_fourth_reversed)
    args = ["export", "--checkpoint", str(checkpoint), "--quantize", "int8", "--verify", str(root / "val")]
    assert main([*args, "-o", str(tmp_path / "a.onnx"), "--min-agreement", "0"]) == 0
    report = capsys.readouterr().out
    percent, count = re.search(r"agrees with fp32 on ([0-9.]+)% of (\d+) images", report).groups()
    agreeing = round(float(percent) * int(count) / 100)
    assert 0.7 < agreeing / int(count) < 0.8, report
    assert main([*args, "-o", str(tmp_path / "b.onnx"), "--min-agreement", repr(agreeing / int(count))]) == 0
    assert main([*args, "-o", str(tmp_path / "c.onnx"), "--min-agreement", repr((agreeing + 0.5) / int(count))]) == 2
    assert "below --min-agreement" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_int8_for_another_cpu_class_recorded_and_noted(digits_model, tmp_path, monkeypatch, capsys):
    """--target-cpu avx2 writes the 7-bit settings into the file; predict/validate --onnx note a CPU of another class
    in one line (the CPU's flags set through SEQUENCER_CPU_FLAGS), and say nothing on an avx2 CPU."""
    import onnx

    from sequencer import hardware

    checkpoint, root = digits_model
    out = tmp_path / "avx2.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out), "--quantize", "int8", "--target-cpu",
                 "avx2", "--verify", str(root / "val")]) == 0
    assert "7-bit weights" in capsys.readouterr().out
    settings = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["int8_settings"])
    assert settings["cpu_class"] == "avx2" and settings["reduce_range"] and not settings["static"]
    image = str(next((root / "val" / "0").iterdir()))
    for flags, noted in (("avx2 fma avx512f avx512bw avx512vl avx512_vnni", True), ("avx2 fma", False)):
        monkeypatch.setenv("SEQUENCER_CPU_FLAGS", flags)
        hardware.cpu_info.cache_clear()
        try:
            assert main(["predict", image, "--onnx", str(out)]) == 0
            assert main(["validate", str(root), "--split", "val", "-j", "0", "--onnx", str(out)]) == 0
        finally:
            hardware.cpu_info.cache_clear()
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
        assert len(notes) == (2 if noted else 0), notes
        assert not noted or "quantised for avx2 CPUs, this one is avx512-vnni" in notes[0]


def test_int8_static_calibrated_export(digits_model, digits_onnx, tmp_path, capsys):
    """--calibration DIR: QDQ MatMul/Gemm nodes with fixed scales, the LSTMs dynamic; keeps the confident answers."""
    import onnx

    checkpoint, root = digits_model
    out = tmp_path / "static.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out), "--dynamic-batch", "--quantize", "int8",
                 "--calibration", str(root / "val" / "4"), "--verify", str(root / "val")]) == 0
    assert "static QDQ" in capsys.readouterr().out
    proto = onnx.load(str(out))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLSTM"} <= ops, ops
    assert json.loads({p.key: p.value for p in proto.metadata_props}["int8_settings"])["static"] is True
    files, x, _ = _val_batch(root)
    with torch.no_grad():
        reference = reference_model(checkpoint)(x)
    logits = torch.cat([_onnx_logits(out, chunk) for chunk in x.split(32)])  # the LSTMs still scale per batch
    confident = _top2_margins(reference) >= MARGIN
    assert (logits - reference).abs().max() < MARGIN / 2
    assert (logits.argmax(-1) == reference.argmax(-1))[confident].all()


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
    count = len(list((root / "val").rglob("*.png")))
    assert fp32["count"] == ckpt["count"] == int8["count"] == count > 100 and fp32["model"] == TINY_ARCH
    assert fp32["top1"] == ckpt["top1"] and fp32["top5"] == ckpt["top5"] and ckpt["top1"] > 95
    assert fp32["loss"] == pytest.approx(ckpt["loss"], abs=1e-4)
    # int8 keeps every confident answer (first test) and at most 1% of the images are not confident
    assert abs(int8["top1"] - ckpt["top1"]) <= 1.0 + 1e-9 and fp32["onnx"] == str(fp32_path)
    assert fp32["param_count"] is None and ckpt["param_count"] > 0  # not "0.00M params" (issue 19)
    # each names the precision it ran in (the int8 file's said "", a float32 evaluation)
    assert (ckpt["amp"], fp32["amp"], int8["amp"]) == ("", "", "int8")


def test_predict_onnx_matches_checkpoint(digits_model, digits_onnx, capsys):
    checkpoint, root = digits_model
    fp32_path, _, _ = digits_onnx
    images = [str(root / "val" / d) for d in ("1", "7")]  # ~72 images
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
    empty = tmp_path / "empty"
    empty.mkdir()
    import onnx
    proto = onnx.load(str(fp32_path))  # an export that records no training data (of a model by name, say)
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props if p.key != "data"})
    unrecorded = tmp_path / "unrecorded.onnx"
    onnx.save(proto, str(unrecorded))
    cases = [
        # its hint named --checkpoint, which an ONNX file has none of
        (["validate", "--onnx", str(unrecorded)], f"ONNX file {str(unrecorded)!r} does not record the data it was "
                                                  "trained on: DATA is needed (hint: pass DATA, the images to "
                                                  "evaluate it on)"),
        (["predict", image, "--onnx", str(not_onnx)], "is not an ONNX model"),
        (["validate", str(root), "--split", "val", "--onnx", str(not_onnx)], "is not an ONNX model"),
        (["predict", image, "--onnx", str(tmp_path / "missing.onnx")], "does not exist"),
        (["predict", image, "--onnx", str(fp32_path), "--img-size", "48"], "exported for 16x16 inputs, not 48x48"),
        (["validate", str(root), "--split", "val", "--onnx", str(fp32_path), "--img-size", "48"], "not 48x48"),
        (["predict", image, "--onnx", str(fp32_path), "--checkpoint", str(checkpoint)], "drop --checkpoint"),
        # the file's stem and weights are fixed: a grey run and --no-ema ran RGB and the exported weights in silence
        (["validate", str(root), "--split", "val", "--onnx", str(fp32_path), "--input-size", "1", "16", "16"],
         "was exported for 3-channel inputs, not 1"),
        (["predict", image, "--onnx", str(fp32_path), "--input-size", "1", "16", "16"], "3-channel inputs, not 1"),
        (["predict", image, "--onnx", str(fp32_path), "--no-ema"], "carries its own model and weights; drop --no-ema"),
        (["validate", str(root), "--split", "val", "--onnx", str(fp32_path), "--amp"], "--amp does not apply"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.pt"), "--quantize", "int8"],
         "--quantize int8 is for ONNX exports, not torchscript"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--verify", str(root)],
         "add --quantize int8"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8",
          "--verify", str(tmp_path / "nowhere")], "is not a folder of images"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8",
          "--target-cpu", "pentium4"], "--target-cpu 'pentium4' is not a CPU class (hint: one of baseline, avx2"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--target-cpu", "amx"],
         "--target-cpu: for an int8 export only (hint: add --quantize int8)"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8",
          "--calibration", str(tmp_path / "nowhere")], "--calibration '" + str(tmp_path / "nowhere") + "' is not a"),
        (["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8",
          "--calibration", str(empty)], "no image files found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "unrecorded.onnx", "weights.onnx"] and not list(empty.iterdir())


def test_random_weights_warned_by_predict_and_export(tmp_path, capsys):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    kwargs = ["--img-size", "32", "--num-classes", "3"]
    assert main(["predict", str(tmp_path / "grey.png"), "--model", "sequencer2d_nano", *kwargs]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: sequencer2d_nano runs with randomly initialised weights") and err.count("\n") == 1
    assert main(["export", "--model", "sequencer2d_nano", *kwargs, "-o", str(tmp_path / "m.safetensors")]) == 0
    assert "randomly initialised weights" in capsys.readouterr().err
