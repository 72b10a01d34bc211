"""`sequencer.train` with the caller's objects: a TrainConfig (only the fields set count, never changed), typed
settings, the caller's modules and Datasets (tensors and PIL images), callbacks, silence, Ctrl-C, SIGTERM under
the caller's own disposition, the caller's random state; `sequencer.validate` on a module in memory."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sequencer
from sequencer import SequencerError, TrainConfig
from sequencer.engine.config import RunState, given_settings, resolve_config
from sequencer.models.loading import read_checkpoint


class Blobs(torch.utils.data.Dataset):
    """Two classes told apart by the sign of the mean: (3, 8, 8) tensors, or 12x12 PIL images with ``pil``."""

    def __init__(self, n: int, seed: int, pil: bool = False, classes=("dark", "light")):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.images = 0.5 * torch.randn(n, 3, 8, 8, generator=g) + (self.labels * 2 - 1)[:, None, None, None]
        self.pil = pil
        if classes is not None:
            self.classes = list(classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.pil:
            grey = int(60 + 130 * self.labels[i])
            image = Image.new("RGB", (12, 12), (grey, grey, grey))
        return image, int(self.labels[i])


def tiny_net(in_features: int = 3 * 8 * 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 2))


QUICK = dict(epochs=1, batch_size=16, workers=0, opt="adamw", lr=1e-2, device="cpu")


# ------------------------------------------------------------------------------------------------ settings
def test_a_config_gives_only_the_fields_set():
    cfg = TrainConfig(epochs=3, model=None, lr=1e-3)
    assert given_settings(cfg) == {"epochs": 3, "lr": 1e-3}  # None means the default
    cfg.batch_size = 8
    assert given_settings(cfg) == {"batch_size": 8, "epochs": 3, "lr": 1e-3}
    state = RunState()
    resolved = resolve_config(given_settings(TrainConfig(epochs=3)), state)
    # the digits demo's defaults stand where the config says nothing (all fields given would make them timm's)
    assert (resolved.epochs, resolved.batch_size, resolved.model, resolved.opt) == (3, 32, "sequencer2d_nano", "adamw")
    assert state.given == {"epochs"}


@pytest.mark.parametrize("settings, message", [
    (dict(epochs="3"), "`epochs='3'` is not an int"),
    (dict(epochs=2.5), "`epochs=2.5` is not an int"),
    (dict(epochs=True), "`epochs=True` is not an int"),
    (dict(lr="fast"), "`lr='fast'` is not a number or None"),
    (dict(scale=(0.5, "x")), "`scale=.*` is not a list of a number"),
    (dict(lr=nn.Sequential(nn.Linear(1, 1))), "`lr=<Sequential>` is not a number or None"),  # one line
    (dict(amp=1), "`amp=1` is not a bool"),
    (dict(model=3), "`model=int` is not a registry name or an nn.Module"),
    (dict(data=42), "`data=42` is not a str or None"),
    (dict(callbacks=[1]), "callbacks holds 1, which is not callable"),
])
def test_settings_of_the_wrong_type_are_refused_naming_them(settings, message, tmp_path):
    with pytest.raises(SequencerError, match=message):
        sequencer.train(output=str(tmp_path), progress=False, **settings)
    assert not any(tmp_path.iterdir())


def test_a_config_of_the_wrong_type_is_refused(tmp_path):
    with pytest.raises(SequencerError, match="`epochs='3'` is not an int"):
        sequencer.train(TrainConfig(epochs="3", output=str(tmp_path)), progress=False)
    with pytest.raises(SequencerError, match="data given twice"):
        sequencer.train(str(tmp_path), data=str(tmp_path))


@pytest.mark.parametrize("data", [{}, dict(data="folder")], ids=["alone", "with data="])
def test_a_dict_of_settings_passed_positionally_is_refused_naming_the_keywords_way(data, tmp_path):
    """A caller's dict of settings (a loaded YAML, a sweep's) as the positional: one line saying how to pass it.
    It was taken for the data: 'data given twice' beside ``data=``, else 'data must be a folder ..., not dict'."""
    settings = dict(model="sequencer2d_nano", epochs=1, output=str(tmp_path))
    with pytest.raises(SequencerError, match=r"train: the positional is a TrainConfig or the data, not a dict.*"
                                             r"train\(\*\*settings\)"):
        sequencer.train(settings, progress=False, **data)
    with pytest.raises(SequencerError, match=r"train_segmenter: the positional is a SegmentConfig or the data"):
        sequencer.train_segmenter(settings, progress=False, **data)
    assert settings == dict(model="sequencer2d_nano", epochs=1, output=str(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("data", [{}, dict(data="folder")], ids=["alone", "with data="])
def test_an_argparse_namespace_passed_positionally_is_refused_naming_the_keywords_way(data, tmp_path):
    """A script's parsed flags as the positional: one line naming the Namespace and how to pass it. It was taken
    for the data: 'data given twice (positionally and as data=)' beside ``data=``, else '`data=<Namespace>` is
    not a str or None'."""
    import argparse
    args = argparse.Namespace(model="sequencer2d_nano", epochs=1, output=str(tmp_path))
    with pytest.raises(SequencerError, match=r"train: the positional is a TrainConfig or the data, not an argparse "
                                             r"Namespace.*train\(\*\*vars\(args\)\)"):
        sequencer.train(args, progress=False, **data)
    with pytest.raises(SequencerError, match=r"train_segmenter: the positional is a SegmentConfig or the data, not an"):
        sequencer.train_segmenter(args, progress=False, **data)
    assert vars(args) == dict(model="sequencer2d_nano", epochs=1, output=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_config_passed_as_the_config_keyword_is_used(tmp_path):
    """README's signature, `train(config=None, *, ...)`: `config=TrainConfig(...)` works as the positional does (a
    text `config=` stays the --config YAML); its settings reach the checks (here its unknown model)."""
    for call in (lambda c: sequencer.train(c, progress=False), lambda c: sequencer.train(config=c, progress=False)):
        with pytest.raises(SequencerError, match="sequencer2d_nanoo"):
            call(TrainConfig(model="sequencer2d_nanoo", output=str(tmp_path)))
    with pytest.raises(SequencerError, match="config given twice"):
        sequencer.train(TrainConfig(), config=TrainConfig())
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- one quick run
@pytest.fixture(scope="module")
def config_run(tmp_path_factory):
    """A TrainConfig run of a foreign module on tensor Datasets, the caller's random state set beforehand."""
    out = tmp_path_factory.mktemp("cfg")
    cfg = TrainConfig(**QUICK, output=str(out), experiment="cfg", warmup_epochs=5)
    before = dataclasses.asdict(cfg)
    net = tiny_net()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    result = sequencer.train(cfg, model=net, data=(Blobs(64, 0), Blobs(32, 1)), progress=False)
    after = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    return cfg, before, result, expected, after, out


def test_the_config_is_not_changed_by_the_run(config_run):
    cfg, before, result, *_ = config_run
    assert dataclasses.asdict(cfg) == before  # lr, warmup, model, img_size, val_split: all as given
    args = read_checkpoint(result.checkpoint)["args"]
    assert args["warmup_epochs"] == 0 and args["epochs"] == 1  # the run's own settings are derived


def test_the_summary_holds_numbers(config_run):
    result = config_run[2]
    assert result.summary and all(type(r["epoch"]) is int for r in result.summary)
    assert all(type(v) is float for r in result.summary for k, v in r.items() if k != "epoch")
    assert result.best_top1 == result.summary[0]["eval_top1"] and result.interrupted is False


def test_the_callers_random_state_is_restored(config_run):
    _, _, _, expected, after, _ = config_run
    assert after[0] == expected[0]
    assert np.array_equal(after[1], expected[1])
    assert torch.equal(after[2], expected[2])


def test_a_foreign_checkpoint_is_refused_by_name_and_by_resume_without_its_module(config_run):
    out = config_run[5]
    with pytest.raises(SequencerError, match="architecture is not recorded"):
        sequencer.validate(out / "cfg" / "last.pth.tar", progress=False)
    with pytest.raises(SequencerError, match="architecture is not recorded"):
        sequencer.train(data=(Blobs(64, 0), Blobs(32, 1)), resume=str(out / "cfg" / "last.pth.tar"),
                        **dict(QUICK, epochs=2), progress=False)


# ------------------------------------------------------------------------------------------------ console
def test_progress_false_prints_nothing_at_all(tmp_path, capfd):
    """Not a line on stdout or stderr: no progress, no warning (the warmup note), no bf16 note."""
    sequencer.train(model=tiny_net(), data=(Blobs(64, 0), Blobs(32, 1)), **QUICK, warmup_epochs=5,
                    output=str(tmp_path), experiment="q", progress=False)
    sequencer.validate(model=tiny_net(), data=Blobs(32, 1), progress=False, amp=True)
    assert capfd.readouterr() == ("", "")


def test_progress_true_shows_the_log_and_the_notes(tmp_path, capfd):
    with pytest.warns(UserWarning, match="`warmup_epochs=5` is not below"):
        sequencer.train(model=tiny_net(), data=(Blobs(64, 0), Blobs(32, 1)), **QUICK, warmup_epochs=5,
                        output=str(tmp_path), experiment="p")
    out, _ = capfd.readouterr()
    assert out.startswith("train: Sequential") and "epoch 0: train_loss" in out and "done: eval top-1" in out


# ------------------------------------------------------------------------------------------------ data kinds
def test_pil_datasets_get_the_recipes_transforms_and_a_registry_module_records_its_architecture(tmp_path):
    model = sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16)
    result = sequencer.train(model=model, data=(Blobs(32, 0, pil=True), Blobs(16, 1, pil=True, classes=None)),
                             **dict(QUICK, epochs=2, lr=2e-3), output=str(tmp_path), experiment="pil",
                             progress=False)
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt["arch"] == "sequencer2d_nano" and "architecture" not in ckpt
    assert ckpt["class_names"] == ["dark", "light"] and ckpt["data_config"]["img_size"] == 16
    # a registry module's checkpoint validates by name, on the PIL images resized to its 16 px
    again = sequencer.validate(result.checkpoint, data=Blobs(16, 1, pil=True), progress=False)
    in_memory = sequencer.validate(model=model, data=Blobs(16, 1, pil=True), progress=False)
    assert again.img_size == in_memory.img_size == 16
    assert again.top1 == in_memory.top1 == pytest.approx(result.summary[-1]["eval_top1"], abs=1e-3)


def test_a_foreign_module_trains_and_validates_under_bf16_autocast(tmp_path):
    net = tiny_net()
    result = sequencer.train(model=net, data=(Blobs(64, 0), Blobs(32, 1)), **QUICK, amp=True, amp_dtype="bfloat16",
                             output=str(tmp_path), progress=False)
    assert result.output_dir.name.endswith("-Sequential-8")  # no experiment: named by the module's class
    row = result.summary[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
    assert read_checkpoint(result.checkpoint)["args"]["amp"] is True
    again = sequencer.validate(model=net, data=Blobs(32, 1), amp=True, amp_dtype="bfloat16", progress=False)
    assert again.images == 32 and math.isfinite(again.loss)


def test_a_compiled_module_is_checkpointed_with_its_own_keys(tmp_path):
    """sequencer.train(model=torch.compile(m)) writes m's own keys (the model's and the EMA's), which a plain
    load_state_dict takes (they were prefixed `_orig_mod.`); a file from before, with the prefix, still resumes."""
    net = tiny_net()
    compiled = torch.compile(net, backend="eager")
    result = sequencer.train(model=compiled, data=(Blobs(32, 0), Blobs(16, 1)), **QUICK, model_ema=True,
                             output=str(tmp_path), progress=False)
    assert result.output_dir.name.endswith("-Sequential-8")  # named by the module inside the wrapper
    last = result.output_dir / "last.pth.tar"
    checkpoint = torch.load(last, weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert list(checkpoint[key]) == ["1.weight", "1.bias"]
        tiny_net().load_state_dict(checkpoint[key])
    assert torch.equal(checkpoint["state_dict"]["1.weight"], net[1].weight.detach())  # the trained weights
    for key in ("state_dict", "state_dict_ema"):  # as written before
        checkpoint[key] = {f"_orig_mod.{k}": v for k, v in checkpoint[key].items()}
    torch.save(checkpoint, last)
    resumed = sequencer.train(model=compiled, data=(Blobs(32, 0), Blobs(16, 1)), **dict(QUICK, epochs=2),
                              model_ema=True, resume=str(last), progress=False)
    assert [row["epoch"] for row in resumed.summary] == [0, 1]


def test_validate_counts_the_images_whose_logits_are_not_finite():
    """The result holds the evaluator's count of NaN/+inf-logit images (a `nonfinite` field, as segmentation's),
    which --results-file writes; it had only the warning and the NaN metrics."""
    net = tiny_net()
    with torch.no_grad():
        net[1].bias[0] = float("nan")
    result = sequencer.validate(model=net, data=Blobs(16, 1), progress=False)
    assert result.nonfinite == 16 and result.as_dict()["nonfinite"] == 16 and math.isnan(result.top1)
    assert sequencer.validate(model=tiny_net(), data=Blobs(16, 1), progress=False).nonfinite == 0


def test_validate_leaves_a_module_in_the_mode_it_was_in():
    net = tiny_net().train()
    result = sequencer.validate(model=net, data=Blobs(32, 1), progress=False)
    assert net.training and result.images == 32 and result.img_size == 8


def test_an_input_size_of_other_channels_than_a_modules_stem_is_refused_in_one_line():
    """validate(model=an RGB module, input_size=(1, H, W)) ended in the conv's RuntimeError."""
    model = sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16)
    with pytest.raises(SequencerError, match="`input_size` has 1 channels but `model` sequencer2d_nano takes 3"):
        sequencer.validate(model=model, data=Blobs(4, 1), input_size=(1, 16, 16), progress=False)


def test_a_head_too_small_for_the_classes_is_refused(tmp_path):
    model = sequencer.create_model("sequencer2d_nano", num_classes=1, img_size=16)
    with pytest.raises(SequencerError, match="1-class head but the data has 2 classes"):
        sequencer.train(model=model, data=(Blobs(32, 0), Blobs(16, 1)), **QUICK, output=str(tmp_path),
                        progress=False)


def test_a_module_cast_to_another_dtype_is_refused_in_one_line(tmp_path):
    """A ``.half()`` / ``.bfloat16()`` / ``.double()`` module fed the run's float32 images: one line naming its
    dtype, nothing written (before, ATen's "mat1 and mat2 must have the same dtype" from deep in the first batch);
    the module is as given."""
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        net = tiny_net().to(dtype)
        name = str(dtype).removeprefix("torch.")
        with pytest.raises(SequencerError, match=f"train: `model` Sequential holds {name} weights"):
            sequencer.train(model=net, data=(Blobs(32, 0), Blobs(16, 1)), **QUICK, output=str(tmp_path),
                            progress=False)
        with pytest.raises(SequencerError, match=f"validate: `model` Sequential holds {name} weights"):
            sequencer.validate(model=net, data=Blobs(16, 1), progress=False)
        assert {p.dtype for p in net.parameters()} == {dtype}
    assert list(tmp_path.iterdir()) == []


def test_a_module_on_the_meta_device_is_refused_in_one_line(tmp_path):
    """A module built under ``torch.device("meta")`` and not yet materialised holds no values: train, validate,
    validate_segmenter, the exports and optimize_for_inference refuse it in one line naming the call and its first
    tensor, nothing written (before: torch's NotImplementedError 'Cannot copy out of meta tensor; no data!', and
    optimize_for_inference returned a copy whose first call failed 'Tensor on device meta is not on the expected
    device cpu!'); the module is as given."""
    from sequencer.tools.export import export_torchscript
    with torch.device("meta"):
        net = tiny_net()
        segmenter = sequencer.create_segmenter("sequencer2d_nano", 2, head_channels=16, out_channels=16)
    calls = {
        "train": lambda: sequencer.train(model=net, data=(Blobs(32, 0), Blobs(16, 1)), **QUICK, output=str(tmp_path),
                                         progress=False),
        "validate": lambda: sequencer.validate(model=net, data=Blobs(16, 1), progress=False),
        "validate_segmenter": lambda: sequencer.validate_segmenter(data=str(tmp_path), model=segmenter),
        "export_torchscript": lambda: export_torchscript(net, tmp_path / "m.pt", (3, 8, 8)),
        "optimize_for_inference": lambda: sequencer.optimize_for_inference(net),
    }
    for call, run in calls.items():
        first = "backbone.trunk.stem.proj.weight" if call == "validate_segmenter" else "1.weight"
        with pytest.raises(SequencerError, match=f"{call}: `model` .* meta device \\(no data\\), {first} the first"):
            run()
    assert all(p.is_meta for p in net.parameters())
    assert list(tmp_path.iterdir()) == []


class TensorsOf(Blobs):
    """Blobs whose image tensors are ``dtype`` (numpy's float64, as ``torch.from_numpy`` gives them; uint8 pixels)."""

    def __init__(self, *args, dtype: torch.dtype, **kw):
        super().__init__(*args, **kw)
        self.images = self.images.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.float16])
def test_image_tensors_of_another_dtype_than_float32_are_refused_in_one_line(dtype, tmp_path):
    """Image tensors are used as given: a Dataset's float64 (``torch.from_numpy``), uint8 or float16 tensors are
    refused naming the Dataset and the dtype, before anything is written (it was ATen's "Input type (double) and bias
    type (float) should be the same" from the first batch, after the experiment folder was made)."""
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(SequencerError, match=rf"data\[0\]: image tensors .* must be float32, got {name}"):
        sequencer.train(model=tiny_net(), data=(TensorsOf(32, 0, dtype=dtype), Blobs(16, 1)), **QUICK,
                        output=str(tmp_path), progress=False)
    with pytest.raises(SequencerError, match=rf"data: image tensors .* must be float32, got {name}"):
        sequencer.validate(model=tiny_net(), data=TensorsOf(16, 1, dtype=dtype), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_label_outside_the_datasets_classes_is_refused_in_one_line_naming_the_item(tmp_path):
    """A Dataset whose ``classes`` name 2 classes but whose labels reach 2: one line naming the Dataset, the item and
    the label (it was torch's "IndexError: Target 2 is out of bounds." from the loss in validate, and in train
    "index 3 is out of bounds for dimension 1 with size 2")."""
    blobs = Blobs(16, 1)
    blobs.labels[5] = 2
    with pytest.raises(SequencerError, match=r"Blobs: item 5 has label 2, outside its 2 classes \['dark', 'light'\]"):
        sequencer.validate(model=tiny_net(), data=blobs, progress=False)
    with pytest.raises(SequencerError, match=r"Blobs \(train\): item 5 has label 2, outside its 2 classes"):
        sequencer.train(model=tiny_net(), data=(blobs, Blobs(16, 1)), **QUICK, output=str(tmp_path), progress=False)


def test_a_module_with_fewer_outputs_than_the_datas_classes_is_refused_by_train_at_its_first_step(tmp_path):
    """As validate (below): train's first step failed with torch's 'index 2 is out of bounds for dimension 1 with
    size 2' from the loss."""
    blobs = Blobs(16, 1, classes=("dark", "light", "grey"))
    blobs.labels[:] = torch.arange(16) % 3
    with pytest.raises(SequencerError, match=r"the model gives 2 logits per image, but the data has 3 classes"):
        sequencer.train(model=tiny_net(), data=(blobs, blobs), **QUICK, output=str(tmp_path), progress=False)


def test_a_module_with_fewer_outputs_than_the_datas_classes_is_refused_by_validate_in_one_line():
    """A module without ``num_classes`` (nothing to check before its first batch) giving 2 logits for Blobs of 3
    classes: one line naming both counts (it was torch's "IndexError: Target 2 is out of bounds." from the loss; a
    module with ``num_classes`` is refused so before its first batch)."""
    blobs = Blobs(16, 1, classes=("dark", "light", "grey"))
    blobs.labels[5] = 2
    with pytest.raises(SequencerError, match=r"the model gives 2 logits per image, but the data has 3 classes"):
        sequencer.validate(model=tiny_net(), data=blobs, progress=False)


# ------------------------------------------------------------------------------------------------ Ctrl-C
class InterruptedAt(Blobs):
    """Sends ``signum`` to this process when item ``at`` is read the ``times``-th time (inside an epoch)."""

    def __init__(self, *args, at: int, times: int, signum: int = signal.SIGINT, **kw):
        super().__init__(*args, **kw)
        self.at, self.times, self.seen, self.signum = at, times, 0, signum

    def __getitem__(self, i):
        if i == self.at:
            self.seen += 1
            if self.seen == self.times:
                os.kill(os.getpid(), self.signum)
        return super().__getitem__(i)


def test_ctrl_c_raises_keyboard_interrupt_after_the_recovery_checkpoint(tmp_path):
    train_set = InterruptedAt(64, 0, at=5, times=2)  # read once per epoch: the signal comes inside epoch 1
    with pytest.raises(KeyboardInterrupt) as stopped:
        sequencer.train(model=tiny_net(), data=(train_set, Blobs(32, 1)), **dict(QUICK, epochs=3),
                        output=str(tmp_path), experiment="c", progress=False)
    result = stopped.value.result
    assert result.interrupted and result.exit_code == 130
    recovery = read_checkpoint(tmp_path / "c" / "recovery.pth.tar")
    assert recovery["epoch"] == 1 and recovery["epoch_complete"] is False
    assert [r["epoch"] for r in result.summary] == [0]


# ------------------------------------------------------------------------------------------------ SIGTERM
def train_terminated_in_epoch_1(output, experiment: str):
    """Three epochs of which SIGTERM comes inside epoch 1 (item 5 is read once per epoch)."""
    train_set = InterruptedAt(64, 0, at=5, times=2, signum=signal.SIGTERM)
    return sequencer.train(model=tiny_net(), data=(train_set, Blobs(32, 1)), **dict(QUICK, epochs=3),
                           output=str(output), experiment=experiment, progress=False)


def assert_recovery_in_epoch_1(folder: Path) -> None:
    recovery = read_checkpoint(folder / "recovery.pth.tar")
    assert recovery["epoch"] == 1 and recovery["epoch_complete"] is False
    assert not (folder / ".run.lock").exists()  # the run had ended (its claim released) before the signal went on


def test_sigterm_with_the_default_disposition_ends_the_process_after_the_recovery_checkpoint(tmp_path):
    """A preempted job's script ends by SIGTERM as it would without the library, only after the checkpoint: the
    code after train() never runs (a loop of runs does not start its next one)."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              f"from test_api_objects import train_terminated_in_epoch_1\n"
              f"train_terminated_in_epoch_1({str(tmp_path)!r}, 'term')\n"
              f"print('train returned')\n")
    from run_helpers import subprocess_env
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert "train returned" not in proc.stdout
    assert_recovery_in_epoch_1(tmp_path / "term")


@pytest.fixture
def caller_sigterm():
    """Lets a test set this process's SIGTERM disposition; the previous one is restored afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_runs_the_callers_handler_once_then_returns_the_interrupted_result(tmp_path, caller_sigterm):
    received = []

    def handler(signum, frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, handler)
    result = train_terminated_in_epoch_1(tmp_path, "handled")
    assert received == [signal.SIGTERM]
    assert result.interrupted and result.exit_code == 128 + signal.SIGTERM
    assert [r["epoch"] for r in result.summary] == [0]
    assert_recovery_in_epoch_1(tmp_path / "handled")
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's own, back in place


def test_a_sigterm_the_caller_ignores_is_not_caught(tmp_path, caller_sigterm):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    result = train_terminated_in_epoch_1(tmp_path, "ignored")
    assert not result.interrupted and result.exit_code == 0
    assert [r["epoch"] for r in result.summary] == [0, 1, 2]
    assert not (tmp_path / "ignored" / "recovery.pth.tar").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
