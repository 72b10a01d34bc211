import re
import subprocess
import sys

import pytest
import torch

from sequencer.cli import main
from sequencer.errors import SequencerError
from sequencer.models import create_model, read_checkpoint
from sequencer.fileio import write_atomically
from sequencer.tools.checkpoints import average_state_dicts

from .conftest import TINY_ARCH, TINY_KWARGS, save_training_checkpoint, tiny_model


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("three")
    paths = []
    for seed in range(3):
        ema = tiny_model(seed=10 + seed) if seed != 1 else None  # the second one has no EMA weights
        paths.append(save_training_checkpoint(tmp_path / f"ckpt{seed}.pth.tar", tiny_model(seed), ema=ema))
    return paths


def _weights(path, use_ema=True):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["state_dict_ema"] if use_ema and "state_dict_ema" in ckpt else ckpt["state_dict"]


def test_average_equals_mean_of_ema_or_model_weights(three_checkpoints, tmp_path, capsys):
    out = tmp_path / "avg.pth"
    assert main(["checkpoint", "average", *map(str, three_checkpoints), "--output", str(out)]) == 0
    sources = [_weights(p) for p in three_checkpoints]  # EMA, model (no EMA), EMA
    averaged = torch.load(out, weights_only=True)
    assert averaged["arch"] == TINY_ARCH and averaged["class_names"] == ["cat", "dog"]
    assert "optimizer" not in averaged
    for k, v in averaged["state_dict"].items():
        expected = (sources[0][k].double() + sources[1][k].double() + sources[2][k].double()) / 3
        torch.testing.assert_close(v, expected.float(), rtol=0, atol=1e-6)
    printed = capsys.readouterr().out
    assert "model weights" in printed
    assert "note: the average mixes the EMA weights of 2 checkpoint(s) with the raw model weights of 1" in printed
    # the averaged file loads back through the usual model options
    model = create_model(TINY_ARCH, checkpoint_path=str(out), **TINY_KWARGS)
    torch.testing.assert_close(model.state_dict()["head.fc.weight"], averaged["state_dict"]["head.fc.weight"])


def test_a_checkpoint_named_twice_is_averaged_once(three_checkpoints, tmp_path, capsys):
    """A glob of a run's folder names an epoch twice (its last.pth.tar is a copy of checkpoint-<last>.pth.tar):
    the copy is counted once, not weighed double (the average was (2a + b + c) / 4)."""
    copy = tmp_path / "last.pth.tar"
    copy.write_bytes(three_checkpoints[2].read_bytes())
    out = tmp_path / "avg.pth"
    inputs = [*map(str, three_checkpoints), str(copy), str(three_checkpoints[0])]
    assert main(["checkpoint", "average", *inputs, "--output", str(out)]) == 0
    sources = [_weights(p) for p in three_checkpoints]
    averaged = torch.load(out, weights_only=True)
    for k, v in averaged["state_dict"].items():
        expected = (sources[0][k].double() + sources[1][k].double() + sources[2][k].double()) / 3
        torch.testing.assert_close(v, expected.float(), rtol=0, atol=1e-6)
    assert averaged["averaged_from"] == [str(p) for p in three_checkpoints]
    printed = capsys.readouterr().out
    assert f"note: {copy} holds the same weights as {three_checkpoints[2]}" in printed
    assert f"note: {three_checkpoints[0]} holds the same weights as {three_checkpoints[0]}" in printed
    assert "averaged 3 checkpoints" in printed


def test_average_no_ema_uses_model_weights(three_checkpoints, tmp_path):
    out = tmp_path / "avg.pth"
    assert main(["checkpoint", "average", *map(str, three_checkpoints), "--no-ema", "--output", str(out)]) == 0
    sources = [_weights(p, use_ema=False) for p in three_checkpoints]
    k = "head.fc.weight"
    torch.testing.assert_close(torch.load(out, weights_only=True)["state_dict"][k],
                               (sources[0][k] + sources[1][k] + sources[2][k]) / 3)


def test_average_keeps_non_float_tensors_from_first():
    a = {"w": torch.ones(2), "n": torch.tensor(5)}
    b = {"w": torch.zeros(2), "n": torch.tensor(9)}
    out = average_state_dicts([a, b])
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64
    torch.testing.assert_close(out["w"], torch.full((2,), 0.5))


def test_average_refuses_mismatched_shapes_and_keys(tmp_path, three_checkpoints):
    torch.manual_seed(0)
    other = create_model(TINY_ARCH, **dict(TINY_KWARGS, embed_dims=(16, 32, 32)))
    odd = save_training_checkpoint(tmp_path / "odd.pth", other)
    with pytest.raises(SequencerError, match=r"'.*odd.pth' has model arguments"):
        main_run(["checkpoint", "average", str(three_checkpoints[0]), str(odd), "--output", str(tmp_path / "x.pth")])
    with pytest.raises(SequencerError, match=r"shape \(2,\) in 'two'"):
        average_state_dicts([{"a": torch.ones(1)}, {"a": torch.ones(2)}], ["one", "two"])
    with pytest.raises(SequencerError, match="does not have the same weights"):
        average_state_dicts([{"a": torch.ones(1)}, {"b": torch.ones(1)}], ["one", "two"])
    assert not (tmp_path / "x.pth").exists()


def _three_class_checkpoint(path, class_names, img_size=32):
    """A 3-class tiny checkpoint (same architecture and shapes whatever the names) trained at ``img_size``."""
    model = tiny_model()
    model.reset_classifier(3)
    save_training_checkpoint(path, model, class_names=class_names)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["data_config"]["img_size"] = img_size
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("other_names, other_size, message", [
    (["1", "2", "10"], 32, r"'.*other.pth' has class names \(1, 2, 10\) but '.*birds.pth' has \(bird, cat, dog\)"),
    (["bird", "cat", "dog"], 16, r"'.*other.pth' has data config img_size=16 but '.*birds.pth' has img_size=32 "
                                 r"\(hint: average checkpoints written with the same preprocessing \(a resume with "
                                 r"another image size"),
])
def test_average_refuses_checkpoints_of_other_classes_or_data(tmp_path, capsys, other_names, other_size, message):
    """Runs of other classes or image sizes (same architecture and shapes) are not averaged into one file carrying
    the first one's names and data config: a one-line error names the file, and nothing is written."""
    birds = _three_class_checkpoint(tmp_path / "birds.pth", ["bird", "cat", "dog"])
    other = _three_class_checkpoint(tmp_path / "other.pth", other_names, other_size)
    out = tmp_path / "avg.pth"
    assert main(["checkpoint", "average", str(birds), str(other), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _as_a_run_wrote_it(path, bce_loss: bool, eval_amp_dtype: str | None, seed: int = 0):
    """A training checkpoint (model and EMA weights) of a run with ``bce_loss`` that evaluated under
    ``eval_amp_dtype`` autocast, as `sequencer train` records them."""
    save_training_checkpoint(path, tiny_model(seed), ema=tiny_model(seed + 1))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["bce_loss"] = bce_loss
    checkpoint.update(eval_amp_dtype=eval_amp_dtype, probabilities="sigmoid" if bce_loss else "softmax")
    torch.save(checkpoint, path)
    return path


def test_an_averaged_file_validates_and_predicts_as_its_checkpoint(image_folder, tmp_path, capsys):
    """What validate and predict read of a training checkpoint besides its model reaches `checkpoint average`'s
    file: the average of one checkpoint (its own weights) prints every line its checkpoint does, and the same
    results. The file dropped `eval_amp_dtype` (validate's note that the run evaluated under autocast was missing)
    and how its logits become probabilities (a --bce-loss run's sigmoids were printed as a softmax)."""
    import json

    run = _as_a_run_wrote_it(tmp_path / "run.pth.tar", bce_loss=True, eval_amp_dtype="bfloat16")
    image = str(image_folder / "val" / "cat" / "cat_0.png")
    said, results = [], []
    for path in (run, tmp_path / "avg.pth", tmp_path / "avg.safetensors"):
        if path != run:
            assert main(["checkpoint", "average", str(run), "-o", str(path)]) == 0
        capsys.readouterr()
        assert main(["validate", str(image_folder), "--split", "val", "--checkpoint", str(path), "-j", "0",
                     "--device", "cpu", "--results-file", str(tmp_path / "r.json")]) == 0
        assert main(["predict", image, "--checkpoint", str(path), "--json"]) == 0
        captured = capsys.readouterr()
        lines = (captured.out + captured.err).replace(str(path), "FILE").splitlines()
        said.append([re.sub(r"[\d.]+ images/s", "", line) for line in lines if "results written" not in line])
        result = json.loads((tmp_path / "r.json").read_text())
        results.append({k: v for k, v in result.items() if k not in ("checkpoint", "images_per_sec")})
    assert said[1] == said[0] and said[2] == said[0] and results[1] == results[0] and results[2] == results[0]
    printed = "\n".join(said[0])
    assert "the checkpoint's run evaluated under bfloat16 autocast" in printed and "sigmoid" in printed


def test_an_average_of_runs_that_differ_in_loss_or_autocast_records_neither(tmp_path, capsys):
    out = tmp_path / "avg.pth"
    bce = _as_a_run_wrote_it(tmp_path / "bce.pth", bce_loss=True, eval_amp_dtype="bfloat16")
    ce = _as_a_run_wrote_it(tmp_path / "ce.pth", bce_loss=False, eval_amp_dtype=None, seed=5)
    assert main(["checkpoint", "average", str(bce), str(ce), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: the checkpoints record different losses (--bce-loss or not): the average records none" in printed
    assert "note: the checkpoints record different evaluation autocast: the average records none" in printed
    averaged = torch.load(out, weights_only=True)
    assert "probabilities" not in averaged and "eval_amp_dtype" not in averaged


def main_run(argv):
    """Run a command like the CLI does but let SequencerError propagate (to check its message)."""
    from sequencer.cli import build_parser
    import importlib
    args = build_parser(argv[0]).parse_args(argv)
    return importlib.import_module(args._module).run(args)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_clean_strips_training_state(tiny_checkpoint, tmp_path, suffix):
    out = tmp_path / f"clean{suffix}"
    assert main(["checkpoint", "clean", str(tiny_checkpoint), "--output", str(out)]) == 0
    cleaned = read_checkpoint(out)
    ema = _weights(tiny_checkpoint)
    if suffix == ".pth":
        assert set(cleaned) == {"version", "arch", "model_kwargs", "class_names", "data_config", "weights",
                                "probabilities", "state_dict"}
        assert cleaned["probabilities"] == "softmax"  # from its run's settings (bce_loss False)
        assert cleaned["weights"] == "ema"
        weights = cleaned["state_dict"]
    else:
        weights = {k: v for k, v in cleaned.items() if k != "__metadata__"}
        assert cleaned["__metadata__"]["arch"] == TINY_ARCH
    assert weights.keys() == ema.keys()
    for k in ema:
        torch.testing.assert_close(weights[k], ema[k], rtol=0, atol=0)
    assert out.stat().st_size < tiny_checkpoint.stat().st_size / 2  # no optimizer state, one set of weights
    # `--checkpoint clean.*` alone rebuilds the model (arch, kwargs and class names come from the file)
    from sequencer.engine.inference import load_model
    loaded = load_model(str(out))
    assert loaded.class_names == ["cat", "dog"] and loaded.input_size == (3, 32, 32)
    torch.testing.assert_close(loaded.model.state_dict()["head.fc.bias"], ema["head.fc.bias"])


def test_clean_no_ema_and_safetensors_flag(tiny_checkpoint, tmp_path):
    out = tmp_path / "clean.safetensors"  # a --safetensors file must say so (tests/tools/test_export.py)
    assert main(["checkpoint", "clean", str(tiny_checkpoint), "--no-ema", "--safetensors", "-o", str(out)]) == 0
    cleaned = read_checkpoint(out)
    torch.testing.assert_close(cleaned["head.fc.weight"], _weights(tiny_checkpoint, use_ema=False)["head.fc.weight"])


def test_a_cleaned_ema_file_is_averaged_as_ema_weights(three_checkpoints, tmp_path, capsys):
    """`clean` keeps the EMA weights as the file's only weights; averaged beside checkpoints' EMA weights they were
    called "model weights" and the average said it mixed EMA with model weights (the mean itself was right)."""
    cleaned = tmp_path / "ema.safetensors"
    assert main(["checkpoint", "clean", str(three_checkpoints[2]), "-o", str(cleaned)]) == 0
    capsys.readouterr()
    out = tmp_path / "avg.pth"
    assert main(["checkpoint", "average", str(three_checkpoints[0]), str(cleaned), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{cleaned}: 88 tensors (EMA weights)" in printed and "mixes" not in printed
    averaged = torch.load(out, weights_only=True)
    assert averaged["weights"] == "ema"
    expected = (_weights(three_checkpoints[0])["head.fc.weight"] + _weights(three_checkpoints[2])["head.fc.weight"]) / 2
    torch.testing.assert_close(averaged["state_dict"]["head.fc.weight"], expected)
    # --no-ema cannot take raw weights from it: said, where the average took its EMA weights in silence (and the
    # mixing note said --no-ema averages raw model weights only)
    assert main(["checkpoint", "average", str(three_checkpoints[0]), str(cleaned), "--no-ema", "-o",
                 str(tmp_path / "raw.pth")]) == 0
    assert (f"note: checkpoint {str(cleaned)!r} holds only its EMA weights: --no-ema cannot pick raw model weights"
            in capsys.readouterr().err)


def _segmentation_checkpoint(path, seed, head_channels=8, drop_path_rate=0.0, head="fpn", before_keys=False,
                             eval_amp_dtype=None, **parts):
    """A checkpoint with the entries `sequencer segment train` writes (its model's config as plain lists).
    ``parts``: create_segmenter's ``aux_head`` / ``fpn_convs``; ``before_keys``: its config as written before those
    keys were (2026-12-07), without them."""
    from sequencer.engine.outputs import plain
    from sequencer.engine.segmentation_eval import segment_data_config
    from sequencer.models.segmentation import create_segmenter

    torch.manual_seed(seed)
    backbone_kwargs = {k: v for k, v in TINY_KWARGS.items() if k != "num_classes"}
    model = create_segmenter(TINY_ARCH, 3, head=head, head_channels=head_channels, out_channels=8,
                             backbone_kwargs=dict(backbone_kwargs, drop_path_rate=drop_path_rate), **parts)
    with torch.no_grad():  # BatchNorm statistics of a trained model, not their initial 0 and 1
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.add_(torch.rand_like(buffer))
    config = plain(model.config)
    if before_keys:
        config = {k: v for k, v in config.items() if k not in ("aux_head", "fpn_convs")}
    torch.save({"version": 1, "segmenter": config, "class_names": ["background", "cat", "dog"],
                "data_config": dict(segment_data_config(TINY_ARCH, 32, None, "whole", None, "voc", False),
                                    eval_amp_dtype=eval_amp_dtype),
                "state_dict": model.state_dict(), "epoch": 3}, path)
    return path


def test_average_and_clean_of_segmentation_checkpoints_load_in_segment_validate(tmp_path, capsys):
    """The written file kept only a classifier's config: the segmenter's (backbone, head, widths) was dropped, and
    `segment validate` refused the average or cleaned file as "not a segmentation checkpoint"."""
    from sequencer.engine.segmentation_eval import load_segmenter

    # runs may differ in regularisation (drop rates), as a classifier's may
    first, second = (_segmentation_checkpoint(tmp_path / f"seg{seed}.pth", seed, drop_path_rate=0.1 * seed)
                     for seed in (0, 1))
    averaged, cleaned = tmp_path / "avg.pth", tmp_path / "clean.safetensors"
    assert main(["checkpoint", "average", str(first), str(second), "-o", str(averaged)]) == 0
    assert main(["checkpoint", "clean", str(first), "-o", str(cleaned)]) == 0
    states = [torch.load(p, weights_only=True)["state_dict"] for p in (first, second)]
    for path, expected in ((averaged, {k: (states[0][k].double() + states[1][k]).div(2).to(v.dtype)
                                       if v.is_floating_point() else v for k, v in states[0].items()}),
                           (cleaned, states[0])):
        loaded = load_segmenter(str(path))
        assert loaded.class_names == ["background", "cat", "dog"] and loaded.data_config["img_size"] == 32
        got = loaded.model.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value)
    other = _segmentation_checkpoint(tmp_path / "other.pth", 2, head_channels=16)
    capsys.readouterr()
    assert main(["checkpoint", "average", str(first), str(other), "-o", str(tmp_path / "mixed.pth")]) == 2
    assert "segmentation model" in capsys.readouterr().err


def _independent_mean(paths) -> dict:
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    return {k: sum(s[k].double() for s in states).div(len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_a_runs_checkpoints_from_before_and_after_the_aux_head_keys_average_when_they_are_one_model(
        head, tmp_path, capsys):
    """A run resumed from a checkpoint written before ``aux_head`` / ``fpn_convs`` existed goes on as the model it
    was (neither part), but its later checkpoints' configs spell those keys out: the average refused to mix the two
    as "another segmentation model", printing both whole configs (and, resumed with --amp, as "another data config":
    the evaluation's autocast, which a classifier's average records as none, with a note). One model averages to the exact mean (the aux
    head's weights and BatchNorm statistics included); another model, one with the parts, is one line naming the
    files and the settings that differ."""
    from sequencer.engine.segmentation_eval import load_segmenter

    before = _segmentation_checkpoint(tmp_path / "before.pth", 0, head=head, before_keys=True, aux_head=False,
                                      fpn_convs=False)
    # resumed with --amp, which evaluates under autocast from then on
    resumed = _segmentation_checkpoint(tmp_path / "resumed.pth", 1, head=head, aux_head=False, fpn_convs=False,
                                       eval_amp_dtype="bfloat16")
    out = tmp_path / "avg.pth"
    capsys.readouterr()
    assert main(["checkpoint", "average", str(before), str(resumed), "-o", str(out)]) == 0
    assert "note: the checkpoints record different evaluation autocast: the average records none" in \
        capsys.readouterr().out
    loaded = load_segmenter(str(out))
    assert "eval_amp_dtype" not in loaded.data_config and loaded.data_config["img_size"] == 32
    got, expected = loaded.model.state_dict(), _independent_mean([before, resumed])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    with_parts = _segmentation_checkpoint(tmp_path / "with_parts.pth", 2, head=head, aux_head=True)
    capsys.readouterr()
    assert main(["checkpoint", "average", str(before), str(with_parts), "-o", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    differing = "aux_head=True, fpn_convs=True" if head == "fpn" else "aux_head=True"
    assert re.fullmatch(rf"sequencer checkpoint: error: cannot average: '.*with_parts.pth' has segmentation model "
                        rf"{differing} but '.*before.pth' has {differing.replace('True', 'False')} \(hint: .*\)\n",
                        err), err
    assert not (tmp_path / "x.pth").exists()
    # two checkpoints with the auxiliary head (an UperNet run's): the exact mean, its weights included
    aux_pair = [_segmentation_checkpoint(tmp_path / f"aux{seed}.pth", seed, head=head, aux_head=True)
                for seed in (3, 4)]
    assert main(["checkpoint", "average", *map(str, aux_pair), "-o", str(out)]) == 0
    got, expected = load_segmenter(str(out)).model.state_dict(), _independent_mean(aux_pair)
    assert any(k.startswith("aux_head.") for k in expected) and got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_checkpoint, capsys):
    assert main(["checkpoint", "clean", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "o.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(["checkpoint", "clean", str(tiny_checkpoint), "-o", str(tmp_path / "no" / "dir" / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert main(["checkpoint", "clean", str(tiny_checkpoint), "-o", str(tiny_checkpoint)]) == 2
    assert "also an input" in capsys.readouterr().err


def test_weights_foreign_to_the_model_named_are_refused_before_anything_is_written(tmp_path, tiny_checkpoint, capsys):
    """clean (and average) of a file naming its model with weights of other keys or shapes: one line naming them,
    nothing written (clean wrote a file, exit 0, that validate and load_model then refused: 'does not fit model');
    a file naming no model is cleaned as it is (it loads with --model NAME)."""
    from safetensors.torch import save_file
    from sequencer.models.loading import model_config, save_weights
    from sequencer.tools.checkpoints import read_weights

    checkpoint, state, _ = read_weights(str(tiny_checkpoint), None)
    named = model_config(checkpoint)
    foreign = save_weights({**state, "foo.weight": torch.zeros(3)}, tmp_path / "foreign.safetensors", named)
    wrong_shape = save_weights({**state, "norm.weight": torch.zeros(7)}, tmp_path / "shape.pth", named)
    for path, culprit in ((foreign, "unexpected: foo.weight"), (wrong_shape, "norm.weight (7,) vs (24,)")):
        for action in (["clean", str(path)], ["average", str(path), str(tiny_checkpoint)]):
            capsys.readouterr()
            assert main(["checkpoint", *action, "-o", str(tmp_path / "out.safetensors")]) == 2
            err = capsys.readouterr().err
            assert f"does not fit model {TINY_ARCH!r}" in err and culprit in err and err.count("\n") == 1, err
            assert not (tmp_path / "out.safetensors").exists()
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "unnamed.safetensors"))
    assert main(["checkpoint", "clean", str(tmp_path / "unnamed.safetensors"), "-o", str(tmp_path / "o.pth")]) == 0


def test_write_atomically_leaves_previous_file_on_failure(tmp_path):
    target = tmp_path / "weights.pth"
    target.write_bytes(b"old")

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(SequencerError, match="weights.pth.*disk is full"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]  # no temporary file left behind


def test_cli_entry_point_runs(tiny_checkpoint, tmp_path):
    out = tmp_path / "c.pth"
    r = subprocess.run([sys.executable, "-m", "sequencer", "checkpoint", "clean", str(tiny_checkpoint),
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def test_an_average_of_runs_holding_out_other_images_keeps_only_those_all_held_out(image_folder, tmp_path, capsys):
    """Runs that carved their held-out files with other seeds (`--val-fraction`) each trained on images another held
    out: their average records the files all of them held out, and validate scores those. It recorded no data and
    said "validate it with DATA": validate DATA/train then scored all 8 images, 6 of them training images of a run,
    without a word."""
    import json

    train = image_folder / "train"
    record = {"dataset": "", "root": str(image_folder), "split": "train", "files_in": str(train)}
    runs = []
    for seed, held_out in enumerate((["cat/cat_0.png", "dog/dog_1.png"], ["cat/cat_0.png", "dog/dog_2.png"])):
        path = save_training_checkpoint(tmp_path / f"run{seed}.pth.tar", tiny_model(seed))
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["data"] = dict(record, files=held_out)
        torch.save(checkpoint, path)
        runs.append(str(path))
    out = tmp_path / "avg.pth"
    assert main(["checkpoint", "average", *runs, "-o", str(out)]) == 0
    assert f"held out different images of {train} (--val-fraction): the average records the 1 that every run held " \
           f"out" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["data"] == dict(record, files=["cat/cat_0.png"])
    assert main(["validate", str(train), "--checkpoint", str(out), "-j", "0", "--device", "cpu",
                 "--results-file", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 1
    # no image held out by both: nothing recorded, and the note says what to validate on
    checkpoint = torch.load(runs[1], weights_only=True)
    checkpoint["data"]["files"] = ["dog/dog_2.png"]
    torch.save(checkpoint, runs[1])
    assert main(["checkpoint", "average", *runs, "-o", str(out)]) == 0
    assert "no image that every run held out: validate it on images none of them trained on" in \
           capsys.readouterr().out
    assert "data" not in torch.load(out, weights_only=True)


def test_validating_an_average_does_not_point_at_a_summary_of_its_numbers(image_folder, tmp_path, capsys):
    """The runs of the averaged files evaluated under bf16 autocast: validate on the average said "the checkpoint's
    run evaluated under bfloat16 autocast (its summary.csv's eval numbers) ... the numbers may differ a little", as
    if some run had logged the average's accuracy; now it says no run evaluated it, in the .pth and the
    .safetensors file alike (an average of one file is that file's weights: its note stays the run's)."""
    runs = [str(_as_a_run_wrote_it(tmp_path / f"run{seed}.pth", bce_loss=False, eval_amp_dtype="bfloat16",
                                   seed=seed)) for seed in (0, 5)]
    for out, flags in ((tmp_path / "avg.pth", []), (tmp_path / "avg.safetensors", ["--safetensors"])):
        assert main(["checkpoint", "average", *runs, "-o", str(out), *flags]) == 0
        capsys.readouterr()
        assert main(["validate", str(image_folder), "--checkpoint", str(out), "-j", "0", "--device", "cpu"]) == 0
        said = capsys.readouterr()
        said = said.out + said.err
        assert "note: the averaged checkpoints' runs evaluated under bfloat16 autocast; no run evaluated their " \
               "average" in said and "summary.csv's eval numbers" not in said


def test_an_average_across_the_train_split_record_keeps_the_runs_data():
    """A run resumed across the version that added `train_split` to the data record: its earlier checkpoints lack it,
    the later ones have it; the average keeps their record, less `train_split` (it recorded none and said the
    checkpoints record different training data)."""
    from sequencer.tools.checkpoints import averaged_data_record

    before = {"dataset": "", "root": "/d", "split": "test"}
    after = dict(before, train_split="train")
    assert averaged_data_record([{"data": before}, {"data": after}]) == (before, None)
    assert averaged_data_record([{"data": after}, {"data": after}]) == (after, None)
    assert averaged_data_record([{"data": after}, {"data": dict(after, split="val")}])[0] is None
