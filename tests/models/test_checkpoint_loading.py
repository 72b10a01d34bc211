"""checkpoint_path in every supported form, the head rule, clear mismatches, and refusal of code-carrying pickles."""
import argparse
import contextlib
import os
import pickle
import threading
import warnings

import pytest
import torch
from safetensors.torch import save_file
from timm.models.sequencer import checkpoint_filter_fn as timm_release_filter

import sequencer
from sequencer import SequencerError
from sequencer.models.loading import extract_state_dict, read_checkpoint, to_release_layout
from plain_sequencer import VARIANTS, PlainSequencer, randomized, rel_err, tiny_variant_kwargs, variant_input


@pytest.fixture
def source(tiny_kwargs, randomize):
    """A trained-looking tiny model and a fresh input; loading its weights must reproduce its logits."""
    torch.manual_seed(0)
    model = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs), seed=3).eval()
    return model, torch.randn(2, 3, 28, 28)


def _load(path, tiny_kwargs, **kwargs):
    """The file loaded as the model: its head's class count and stem's channels are the file's."""
    return sequencer.create_model("sequencer2d_s", checkpoint_path=str(path), **tiny_kwargs, **kwargs).eval()


def _assert_same_logits(model, source):
    ref, x = source
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def _written(layout, state, path):
    """``state`` saved as ``layout`` has it (each read by create_model and load_model alike)."""
    if layout == "timm":
        torch.save(state, path)
    elif layout == "release":
        torch.save(to_release_layout(state), path)
    elif layout == "release_under_model":
        torch.save({"model": to_release_layout(state)}, path)
    elif layout == "ddp":  # a DDP module's keys
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "compiled":  # torch.compile's wrapper's keys (a compiled model's state_dict)
        torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"arch": "sequencer2d_s"})
    return path


@pytest.mark.parametrize("layout", ["timm", "release", "release_under_model", "ddp", "compiled", "safetensors"])
def test_every_layout_loads_as_the_model(tmp_path, source, tiny_kwargs, layout):
    """No num_classes given: the head is the file's 5-class one (it was a fresh 1000-class head, with a warning)."""
    path = _written(layout, source[0].state_dict(), tmp_path / f"w.{layout}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _load(path, tiny_kwargs)
    _assert_same_logits(model, source)
    assert model.model_kwargs["num_classes"] == model.pretrained_cfg["num_classes"] == 5


def test_training_checkpoint_prefers_ema(tmp_path, source, tiny_kwargs, randomize):
    ema_model, x = source
    raw = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs), seed=9).eval()
    torch.save({"version": 1, "arch": "sequencer2d_s", "model_kwargs": dict(tiny_kwargs, num_classes=5),
                "class_names": list("abcde"), "state_dict": raw.state_dict(), "state_dict_ema": ema_model.state_dict(),
                "optimizer": {}, "epoch": 3, "metric": 0.5, "args": {"lr": 0.1}}, tmp_path / "train.pth")
    _assert_same_logits(_load(tmp_path / "train.pth", tiny_kwargs), source)
    _assert_same_logits(_load(tmp_path / "train.pth", tiny_kwargs, use_ema=False), (raw, x))


def test_timm_train_checkpoint_with_namespace_args_and_module_prefix(tmp_path, source, tiny_kwargs):
    # timm's train.py saves `args` as an argparse.Namespace; DDP weights carry a `module.` prefix
    state = {f"module.{k}": v for k, v in source[0].state_dict().items()}
    torch.save({"epoch": 1, "arch": "sequencer2d_s", "state_dict": state, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "ddp.pth.tar")
    assert isinstance(read_checkpoint(tmp_path / "ddp.pth.tar")["args"], argparse.Namespace)
    _assert_same_logits(_load(tmp_path / "ddp.pth.tar", tiny_kwargs), source)


def test_a_timm_train_checkpoint_names_its_model_through_its_args(tmp_path, tiny_kwargs, randomize):
    """A checkpoint as timm's train.py saves it (timm's CheckpointSaver: `arch`, `args` an argparse.Namespace,
    `state_dict`, `state_dict_ema`, `optimizer`, `metric`), read safely (weights_only, the Namespace allow-listed),
    rebuilds its model without `model=` as our checkpoints do: --model-kwargs, --num-classes, --in-chans,
    --img-size, --crop-pct and --interpolation come from its args (they were ignored: the default architecture did
    not fit the weights), and the EMA weights are taken. A file that names no model is refused in one line."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    from sequencer.engine.inference import load_model

    model = randomize(sequencer.create_model("sequencer2d_s", num_classes=4, in_chans=1, **tiny_kwargs), seed=1)
    ema = ModelEmaV3(model)
    randomize(ema.module, seed=2)
    args = argparse.Namespace(model="sequencer2d_s", model_kwargs=dict(tiny_kwargs), num_classes=4, in_chans=1,
                              input_size=None, img_size=56, mean=None, std=None, crop_pct=0.9,
                              interpolation="bilinear", model_ema=True, model_ema_force_cpu=False, lr=0.1)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    loaded = load_model(str(tmp_path / "last.pth.tar"))
    assert (loaded.name, loaded.input_size, loaded.weights) == ("sequencer2d_s", (1, 56, 56), "ema")
    assert (loaded.data_config["crop_pct"], loaded.data_config["interpolation"]) == (0.9, "bilinear")
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ema.module.eval()(x), rtol=0, atol=0)
    unnamed = read_checkpoint(tmp_path / "last.pth.tar")
    del unnamed["arch"]
    unnamed["args"].model = None
    torch.save(unnamed, tmp_path / "unnamed.pth.tar")
    with pytest.raises(SequencerError, match=r"unnamed\.pth\.tar' does not name its model .*args\.model"):
        load_model(str(tmp_path / "unnamed.pth.tar"))


def test_a_checkpoint_with_another_head_than_num_classes_is_refused(tmp_path, source, tiny_kwargs):
    """The file is the model: a num_classes of another count is one line naming both (create_model re-initialised
    the head with a warning, load_model refused: now the same line from both), and the hint says how to start a new
    head from its weights instead. timm's create_model(checkpoint_path=, num_classes=) refuses it too."""
    from sequencer.engine.inference import load_model

    torch.save({"arch": "sequencer2d_s", "model_kwargs": dict(tiny_kwargs, num_classes=5),
                "state_dict": source[0].state_dict()}, tmp_path / "five.pth")
    line = r"five\.pth' has a 5-class head but `num_classes` is 3"
    with pytest.raises(SequencerError, match=line) as raised:
        _load(tmp_path / "five.pth", tiny_kwargs, num_classes=3)
    assert "pretrained_cfg_overlay=dict(file=" in raised.value.hint
    with pytest.raises(SequencerError, match=line):
        load_model(str(tmp_path / "five.pth"), model="sequencer2d_s", num_classes=3)


@pytest.mark.parametrize("key,tensor,mismatch", [
    ("head.fc.bias", torch.zeros(7), r"head\.fc\.bias \(7,\) vs \(5,\)"),  # bias rows other than its weight's
    ("head.fc.weight", torch.zeros(5, 7), r"head\.fc\.weight \(5, 7\) vs \(5, 32\)"),  # reads other features
])
def test_a_head_of_the_class_count_but_another_shape_is_named(tmp_path, source, tiny_kwargs, key, tensor, mismatch):
    """A file whose head does not fit although its class count does (a bias whose length is not its weight's rows,
    or a weight reading another number of features): the shape mismatch, named (it said 'has a 5-class head but
    `num_classes` is 5', with the hint to set num_classes to 5)."""
    from sequencer.engine.inference import load_model

    state = dict(source[0].state_dict(), **{key: tensor})
    torch.save({"arch": "sequencer2d_s", "model_kwargs": dict(tiny_kwargs, num_classes=5), "state_dict": state},
               tmp_path / "head.pth")
    with pytest.raises(SequencerError, match=r"does not fit model 'sequencer2d_s': shape mismatch: " + mismatch):
        load_model(str(tmp_path / "head.pth"))


def test_pretrained_weights_with_another_head_start_a_new_head_with_a_warning(tmp_path, source, tiny_kwargs):
    """timm's create_model(pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=...)): the weights
    start a model with a fresh N-class head, said in a warning; the trunk is the file's."""
    torch.save(source[0].state_dict(), tmp_path / "five.pth")
    with pytest.warns(UserWarning, match=r"classifier head has shape \(5, 32\).*re-initialised"):
        model = sequencer.create_model("sequencer2d_s", pretrained=True, num_classes=3, **tiny_kwargs,
                                       pretrained_cfg_overlay=dict(file=str(tmp_path / "five.pth"))).eval()
    assert torch.count_nonzero(model.get_classifier().weight) == 0 and model.num_classes == 3
    torch.testing.assert_close(model.forward_features(source[1]), source[0].forward_features(source[1]))


def test_an_overlays_num_classes_and_input_size_describe_the_weights_as_in_timm(tmp_path, source, tiny_kwargs):
    """timm's pretrained_cfg_overlay describes the weights: its ``num_classes`` is the model's class count when
    the call names none (the file's 5-class head loaded; it was a 1000-class model with a fresh head and a cfg saying
    5), ``-1`` a head that is never loaded, even one of the model's shape; its ``input_size`` gives the input
    channels (a 1-channel stem built, not one adapted to 3). Malformed values are refused in one line."""
    torch.save(source[0].state_dict(), tmp_path / "five.pth")
    overlay = dict(file=str(tmp_path / "five.pth"))
    model = sequencer.create_model("sequencer2d_s", pretrained=True, **tiny_kwargs,
                                   pretrained_cfg_overlay=dict(overlay, num_classes=5)).eval()
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    _assert_same_logits(model, source)
    fresh = sequencer.create_model("sequencer2d_s", pretrained=True, num_classes=5, **tiny_kwargs,
                                   pretrained_cfg_overlay=dict(overlay, num_classes=-1))
    assert fresh.num_classes == 5 and torch.count_nonzero(fresh.get_classifier().weight) == 0
    assert fresh.pretrained_cfg["num_classes"] == 5
    torch.manual_seed(0)
    gray = sequencer.create_model("sequencer2d_s", in_chans=1, num_classes=5, **tiny_kwargs)
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    loaded = sequencer.create_model("sequencer2d_s", pretrained=True, **tiny_kwargs, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "gray.pth"), num_classes=5, input_size=(1, 28, 28)))
    assert loaded.pretrained_cfg["input_size"] == (1, 28, 28)
    torch.testing.assert_close(loaded.stem.proj.weight, gray.stem.proj.weight, rtol=0, atol=0)
    for bad, line in ((dict(num_classes="5"), "`num_classes='5'` is not a whole number"),
                      (dict(input_size=224), r"`input_size=224` is not \(channels, height, width\)")):
        with pytest.raises(SequencerError, match=line):
            sequencer.create_model("sequencer2d_s", pretrained=True, **tiny_kwargs,
                                   pretrained_cfg_overlay=dict(overlay, **bad))


def test_other_mismatch_lists_the_offending_keys(tmp_path, source, tiny_kwargs):
    state = source[0].state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(SequencerError, match=r"does not fit model 'sequencer2d_s'.*missing: norm\.weight"
                                             r".*unexpected: extra\.weight"):
        _load(tmp_path / "broken.pth", tiny_kwargs)
    with pytest.raises(SequencerError, match=r"shape mismatch: stages\.0\.blocks\.0\.mlp_channels\.fc1\.bias "
                                             r"\(48,\) vs \(24,\).*\(\+\d+ more\)"):
        sequencer.create_model("sequencer2d_s", checkpoint_path=str(tmp_path / "broken.pth"), num_classes=5,
                               **dict(tiny_kwargs, embed_dims=(8, 32, 32, 32)))


def test_a_wrapping_modules_weights_are_named_by_their_prefix(tmp_path, source, tiny_kwargs):
    """The state dict of an nn.Sequential holding the model (keys `1.stem...`) passed as the model's: the hint
    names the prefix and how to take the model's weights (it said to check the architecture)."""
    wrapped = torch.nn.Sequential(torch.nn.Identity(), source[0], torch.nn.Linear(5, 2))
    save_file({k: v.contiguous() for k, v in wrapped.state_dict().items()}, str(tmp_path / "seq.safetensors"))
    with pytest.raises(SequencerError, match=r"unexpected: 1\.") as raised:
        _load(tmp_path / "seq.safetensors", tiny_kwargs)
    assert "under '1.' (the state dict of a module that holds the model" in raised.value.hint


def test_mismatch_with_another_head_too_is_one_error_and_no_transfer_warning(tmp_path, source, tiny_kwargs):
    """Another architecture's checkpoint: the error names the mismatch, with no "head re-initialised (transfer
    learning)" warning before it (the CLI showed that line and then the error)."""
    torch.save(source[0].state_dict(), tmp_path / "five.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SequencerError, match=r"shape mismatch: .*norm\.weight \(32,\) vs \(48,\)"):
            sequencer.create_model("sequencer2d_s", checkpoint_path=str(tmp_path / "five.pth"), num_classes=3,
                                   **dict(tiny_kwargs, embed_dims=(16, 32, 32, 48)))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_carries_code_is_refused(tmp_path, tiny_kwargs, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "extra": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(SequencerError, match=r"refusing to load checkpoint .*evil\.pth.*(system|posix)"):
        _load(path, tiny_kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello world\n", bytes(range(256)) * 4])
def test_corrupt_or_foreign_file_is_a_clear_error(tmp_path, tiny_kwargs, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(SequencerError, match=r"bad\.pth"):
        _load(path, tiny_kwargs)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_weights_saved_with_a_pickle_protocol_torch_cannot_read_safely_are_named_so(tmp_path, tiny_kwargs, zipped):
    """``torch.save(..., pickle_protocol=4)`` (torch's safe loader stops at protocol 4's frames): the refusal names
    the protocol, not a corrupt file; protocol 3 loads."""
    path = tmp_path / "p4.pth"
    torch.save({"w": torch.zeros(1)}, path, pickle_protocol=4, _use_new_zipfile_serialization=zipped)
    with pytest.raises(SequencerError, match=r"p4\.pth' was written with pickle protocol 4, .*cannot read") as error:
        _load(path, tiny_kwargs)
    assert "corrupt" not in str(error.value)
    torch.save({"w": torch.ones(1)}, path, pickle_protocol=3, _use_new_zipfile_serialization=zipped)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(1))


def test_truncated_file_is_a_clear_error(tmp_path, source, tiny_kwargs):
    torch.save(source[0].state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SequencerError, match=r"cut\.pth.* corrupt"):
        _load(tmp_path / "cut.pth", tiny_kwargs)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SequencerError, match=r"not a valid safetensors"):
        _load(tmp_path / "cut.safetensors", tiny_kwargs)


@pytest.mark.parametrize("path", [5, ["m.pth"]])
def test_a_checkpoint_path_that_is_no_path_is_refused_in_one_line(path):
    """``create_model(checkpoint_path=5)`` and ``validate_segmenter(5, DATA)`` name the value: they failed with
    pathlib's / os.fspath's TypeError 'expected str, bytes or os.PathLike object, not int'."""
    with pytest.raises(SequencerError, match=r"checkpoint .*: a file path \(str or os.PathLike\), not "):
        read_checkpoint(path)
    with pytest.raises(SequencerError, match=r"checkpoint .*: a file path"):
        sequencer.create_model("sequencer2d_nano", checkpoint_path=path)
    with pytest.raises(SequencerError, match=r"checkpoint .*: a file path"):
        sequencer.validate_segmenter(path, "voc")


def test_missing_file_and_empty_checkpoint(tmp_path, tiny_kwargs):
    with pytest.raises(SequencerError, match="does not exist"):
        _load(tmp_path / "nope.pth", tiny_kwargs)
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(SequencerError, match="holds no weights"):
        _load(tmp_path / "empty.pth", tiny_kwargs)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(SequencerError, match="holds a list"):
        _load(tmp_path / "list.pth", tiny_kwargs)


def test_extract_state_dict_strips_wrapper_prefixes():
    w = torch.zeros(1)
    out = extract_state_dict({"state_dict": {"module.a": w, "_orig_mod.b": w, "module._orig_mod.c": w, "n": 1,
                                             "_orig_mod.module.d": w}})  # torch.compile(DDP(model))'s: was module.d
    assert sorted(out) == ["a", "b", "c", "d"]


def test_the_weights_of_a_compiled_ddp_model_load(tmp_path, source, tiny_kwargs):
    """torch.compile(DDP(model)).state_dict() (keys `_orig_mod.module.<key>`) was refused as the weights of a module
    holding the model under 'module.'; they load as the model."""
    torch.save({f"_orig_mod.module.{k}": v for k, v in source[0].state_dict().items()}, tmp_path / "compiled_ddp.pth")
    _assert_same_logits(_load(tmp_path / "compiled_ddp.pth", tiny_kwargs), source)


def test_checkpoint_without_head_keeps_the_models_head(tmp_path, source, tiny_kwargs):
    state = {k: v for k, v in source[0].state_dict().items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.warns(UserWarning, match="has no classifier head"):
        model = _load(tmp_path / "backbone.pth", tiny_kwargs)
    assert torch.count_nonzero(model.get_classifier().weight) == 0
    headless = _load(tmp_path / "backbone.pth", tiny_kwargs, num_classes=0)  # nothing to warn about
    torch.testing.assert_close(headless(source[1]), source[0].forward_head(source[0].forward_features(source[1]),
                                                                           pre_logits=True))


def test_rgb_stem_adapted_to_grayscale(tmp_path, source, tiny_kwargs):
    torch.save(source[0].state_dict(), tmp_path / "rgb.pth")
    with pytest.warns(UserWarning, match="3 input channels is adapted to 1"):
        gray = _load(tmp_path / "rgb.pth", tiny_kwargs, in_chans=1)
    # a gray image fed as 1 channel gives the logits the RGB model gives for the same image on all 3 channels
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), source[0](x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-6)


def test_grayscale_stem_adapted_to_rgb_or_refused_by_an_old_timm(tmp_path, source, tiny_kwargs):
    """A stem made for 1 channel loaded into an RGB model: timm 1.0.31+ adapts it (an RGB image whose channels are
    all the gray image gives the gray model's logits); an older timm, which pyproject's floor allows, only adapts
    3-channel stems, and the load is refused in one line naming the file and the timm needed."""
    import inspect

    from timm.models import adapt_input_conv

    torch.save(source[0].state_dict(), tmp_path / "rgb.pth")
    with pytest.warns(UserWarning):
        gray = _load(tmp_path / "rgb.pth", tiny_kwargs, in_chans=1)
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    if "base_chans" not in inspect.signature(adapt_input_conv).parameters:
        with pytest.raises(sequencer.SequencerError, match=r"gray\.pth': adapting a stem made for 1 input channels "
                                                            r"to 3 needs timm 1\.0\.31 or newer"):
            _load(tmp_path / "gray.pth", tiny_kwargs, in_chans=3)
        return
    assert _load(tmp_path / "gray.pth", tiny_kwargs).in_chans == 1  # the file's stem, as it is
    with pytest.warns(UserWarning, match="1 input channels is adapted to 3"):
        rgb = _load(tmp_path / "gray.pth", tiny_kwargs, in_chans=3)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), gray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("layout", ["release", "timm"])
def test_every_variant_loads_from_the_authors_and_timms_layouts(name, layout, tmp_path):
    """Each ablation and 1D model written in the authors' release layout (their vanilla models' too: the 1D mixer's
    ``rnn``, the position embedding, the downsample after each stage's blocks) or timm's, and loaded by
    ``checkpoint_path``: timm's own release-layout reader agrees on every key, and the loaded model gives the plain
    torch.nn model's logits. Two blocks in the first stage, so the downsample's release index is not 1."""
    kwargs = dict(tiny_variant_kwargs(name), layers=(2, 1, 1, 1))
    torch.manual_seed(0)
    source = randomized(sequencer.create_model(name, **kwargs))
    state = source.state_dict()
    if layout == "release":
        state = to_release_layout(state)
        assert "blocks.0.2.down.weight" in state and "head.weight" in state
        timm_reading = timm_release_filter(dict(state), source)
        assert timm_reading.keys() == source.state_dict().keys()
        assert all(torch.equal(timm_reading[k], v) for k, v in source.state_dict().items())
    torch.save(state, tmp_path / "weights.pth")
    model = sequencer.create_model(name, checkpoint_path=str(tmp_path / "weights.pth"), **kwargs).eval()
    x = variant_input(name)
    with torch.no_grad():
        assert rel_err(model(x), PlainSequencer(source).eval()(x)) <= 1e-5


def test_checkpoints_read_in_the_callers_threads_leave_its_warning_filters_alone(tmp_path, monkeypatch):
    """Two threads reading a checkpoint at once (a server's threads loading models): the process's warning filters
    are the caller's after both, and torch's note on a pickle protocol other than 2 stays hidden. Each read
    swapped the process-wide list (``warnings.catch_warnings``) and put back the one it found: overlapping, the
    read that ended last put back the list holding the other's filter, left in the process for good."""
    path = tmp_path / "protocol3.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path, pickle_protocol=3)
    loads, overlap, first_read, entered = torch.load, threading.Barrier(2, timeout=0.5), threading.Event(), []

    def load_side_by_side(*args, **kwargs):
        # each load waits (up to 0.5 s) for the other to be inside one too; the second then ends after the first read
        entered.append(None)
        second = len(entered) == 2
        with contextlib.suppress(threading.BrokenBarrierError):
            overlap.wait()
        if second:
            first_read.wait(0.5)
        return loads(*args, **kwargs)

    def reader():
        read.append(read_checkpoint(path))
        first_read.set()

    monkeypatch.setattr(torch, "load", load_side_by_side)
    filters, read = list(warnings.filters), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=reader) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        inside = list(warnings.filters)
    assert [torch.equal(r["state_dict"]["w"], torch.ones(2)) for r in read] == [True, True]
    assert inside == [("always", None, Warning, None, 0)] + filters and list(warnings.filters) == filters
    assert [str(w.message) for w in caught] == []
