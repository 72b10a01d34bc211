"""The model objects in a user's own timm and PyTorch code: timm's optimizer factory, data-config resolution, feature
pruning, and float16 CPU autocast; the pieces of timm the models own (so that building one imports no timm) against
timm's own."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import sequencer
from sequencer.models.segmentation import Segmenter

PE_TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), hidden_sizes=(8, 8, 8, 8), img_size=28)


def test_layer_decay_groups_ascend_from_stem_to_head_and_keep_the_position_embedding_in_the_stem():
    """timm's ``create_optimizer_v2(..., layer_decay=)`` builds its layers from ``group_matcher``: the lr scale
    must not decrease from the stem through the stages to the head, each parameter in one group; the position
    embedding (unmatched, it went with the head at the full lr) is the stem's, and it is not weight-decayed."""
    from timm.optim import create_optimizer_v2

    model = sequencer.create_model("v_sequencer_s_pe", num_classes=3, **PE_TINY)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter in two groups"
            group_of[id(p)] = group
    named = list(model.named_parameters())
    assert len(group_of) == len(named)
    scales = {name: group_of[id(p)]["lr_scale"] for name, p in named}
    order = [n for n, _ in named if n != "absolute_pos_embed"]  # stem, stages in order, norm, head
    assert all(scales[a] <= scales[b] for a, b in zip(order, order[1:]))
    assert scales["stem.proj.weight"] < scales["stages.0.blocks.0.mlp_channels.fc1.weight"] < 1.0
    assert scales["head.fc.weight"] == 1.0
    assert scales["absolute_pos_embed"] == scales["stem.proj.weight"]
    decay = {name: group_of[id(p)]["weight_decay"] for name, p in named}
    assert decay["absolute_pos_embed"] == decay["norm.weight"] == decay["stem.proj.bias"] == 0.0
    assert decay["stem.proj.weight"] == decay["stages.0.blocks.0.rnn_tokens.rnn.weight_ih_l0"] == 0.05


def test_prune_intermediate_layers_keeps_what_forward_intermediates_takes(tiny_kwargs, randomize):
    """timm's contract: stages after the last index taken go, and with them the final norm and the head (sized for
    the last stage); the kept stages give the same maps."""
    model = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs)).eval()
    x = torch.randn(1, 3, 28, 28)
    expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, -3]) == [0, 1]
    assert len(model.stages) == 2 and isinstance(model.norm, nn.Identity) and model.num_classes == 0
    assert model.num_features == tiny_kwargs["embed_dims"][1] == model(x).shape[-1]
    for got, want in zip(model.forward_intermediates(x, indices=2, intermediates_only=True), expected):
        torch.testing.assert_close(got, want)
    final, maps = model.forward_intermediates(x, norm=True)  # no norm left to apply
    torch.testing.assert_close(maps[-1], expected[-1])


def test_prune_keeping_the_last_stage_keeps_norm_and_head_unless_asked(tiny_kwargs):
    model = sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs)
    assert model.prune_intermediate_layers(2, prune_head=False) == [2, 3]
    assert len(model.stages) == 4 and isinstance(model.norm, nn.LayerNorm) and model.num_classes == 5
    model.prune_intermediate_layers(prune_norm=True)
    assert isinstance(model.norm, nn.Identity) and model.num_classes == 0


def test_features_backbone_and_segmenter_carry_the_models_preprocessing():
    """timm's resolve_model_data_config reads ``pretrained_cfg``; without one it silently gives ImageNet's mean at
    224 px, not sequencer2d_nano's 0.5 at 32 px."""
    from timm.data import resolve_model_data_config

    wrappers = [sequencer.create_model("sequencer2d_nano", features_only=True),
                sequencer.create_backbone("sequencer2d_nano", out_channels=8),
                sequencer.create_segmenter("sequencer2d_nano", 3, head_channels=8, out_channels=8)]
    for module in wrappers:
        config = resolve_model_data_config(module)
        assert config["mean"] == (0.5, 0.5, 0.5) and config["input_size"] == (3, 32, 32), type(module).__name__
        assert module.default_cfg is module.pretrained_cfg


@pytest.mark.parametrize("make", [
    lambda: sequencer.create_model("v_sequencer_s_pe", features_only=True, **PE_TINY),
    lambda: sequencer.create_segmenter("v_sequencer_s_pe", 3, head_channels=8, out_channels=8, backbone_kwargs=PE_TINY),
], ids=["features_only", "segmenter"])
def test_layer_decay_reaches_the_trunk_inside_a_wrapper(make):
    """Without the trunk's ``group_matcher`` timm's factory groups a wrapper's parameters by count, whatever they
    are; with it the trunk's layers decay as the classifier's do, and the pyramid and decode head get the full rate."""
    from timm.optim import create_optimizer_v2

    module = make()
    optimizer = create_optimizer_v2(module, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    settings = {name.split("trunk.")[-1].removeprefix("model."): (group_of[id(p)]["lr_scale"],
                                                                  group_of[id(p)]["weight_decay"])
                for name, p in module.named_parameters()}
    assert len(group_of) == len(settings) == len(list(module.parameters()))
    stem, first_block = settings["stem.proj.weight"], settings["stages.0.blocks.0.mlp_channels.fc1.weight"]
    assert stem[0] < first_block[0] < settings["stages.3.blocks.0.mlp_channels.fc1.weight"][0]
    assert len({scale for name, (scale, _) in settings.items() if name.startswith("stages.1.")}) == 1  # one block
    assert settings["absolute_pos_embed"] == (stem[0], 0.0)
    if isinstance(module, Segmenter):
        assert settings["head.classifier.weight"] == settings["backbone.levels.0.project.0.weight"] == (1.0, 0.05)
    module.set_grad_checkpointing(True)
    trunk = module.model if hasattr(module, "model") else module.backbone.trunk
    assert all(stage.grad_checkpointing for stage in trunk.stages)


def test_float16_cpu_autocast_runs_an_lstm_fed_float32():
    """v_sequencer_s_pe adds its float32 position embedding, so its LSTMs get float32 under float16 autocast, which
    ATen hands to oneDNN's LSTM (no float16 kernel: "could not create a primitive descriptor")."""
    torch.manual_seed(0)
    model = sequencer.create_model("v_sequencer_s_pe", num_classes=3, **PE_TINY)
    nn.init.normal_(model.head.fc.weight)
    x = torch.randn(2, 3, 28, 28)
    with torch.backends.mkldnn.flags(enabled=True):  # the default CPU path (the suite's fixture turns it off)
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        logits.float().sum().backward()
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    assert model.absolute_pos_embed.grad.dtype == torch.float32 and model.absolute_pos_embed.grad.abs().sum() > 0


def test_bfloat16_cpu_autocast_without_bf16_kernels_runs_atens_lstm(monkeypatch):
    """Under bfloat16 CPU autocast ATen hands a float32 input with bf16 weights to oneDNN's LSTM, which on a CPU
    without bf16 instructions (AVX2-only) has no kernel ("could not create a primitive descriptor"): there the
    input is cast as autocast would, so ATen's own LSTM runs it. On this CPU, made to answer as one without bf16
    kernels, the first LSTM receives bfloat16 (float32 where it has them, as before), and autocast's logits come
    out."""
    from sequencer.models.kernels import recurrence
    torch.manual_seed(0)
    model = sequencer.create_model("v_sequencer_s_pe", num_classes=3, **PE_TINY)
    x = torch.randn(2, 3, 28, 28)
    seen = []
    for rnn in (m for m in model.modules() if isinstance(m, nn.RNNBase) and m.mode == "LSTM"):
        rnn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    for has_bf16_kernels in (False, True):
        monkeypatch.setattr(recurrence, "onednn_bf16_supported", lambda: has_bf16_kernels)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
        # the first LSTM is fed float32 (the position embedding's add); later ones get bf16 activations anyway
        assert seen[0] == (torch.float32 if has_bf16_kernels else torch.bfloat16) and torch.bfloat16 in seen


def test_torch_func_grad_gives_autograds_gradients(tiny_kwargs, randomize):
    """torch.func transforms (MAML, per-sample gradients) refuse an autograd.Function without ``setup_context``,
    which the oneDNN paths' are: under a transform the standard ops run."""
    from torch.func import functional_call, grad

    model = randomize(sequencer.create_model("sequencer2d_s", num_classes=3, **tiny_kwargs)).eval()
    x, target = torch.randn(2, 3, 28, 28), torch.tensor([0, 2])
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.backends.mkldnn.flags(enabled=True):  # the default CPU path, where the oneDNN Functions run
        torch.nn.functional.cross_entropy(model(x), target).backward()
        got = grad(lambda p: torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), target))(params)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["v_sequencer_s_pe", "sequencer2d_nano"])
def test_init_weights_initialises_every_parameter_of_a_meta_built_model(name):
    """FSDP-style meta-device construction: ``to_empty`` leaves uninitialised memory, ``init_weights()`` must set all
    of it (it left v_sequencer_s_pe's position embedding as it found it)."""
    kwargs = PE_TINY if name == "v_sequencer_s_pe" else {}
    with torch.device("meta"):
        model = sequencer.create_model(name, num_classes=3, **kwargs)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert not [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert model(torch.randn(1, 3, 28 if kwargs else 32, 28 if kwargs else 32)).isfinite().all()


def test_timm_load_checkpoint_reads_the_release_layout_through_our_filter(tmp_path, tiny_kwargs, randomize):
    """timm calls ``filter_fn(state_dict, model)``; ours took the state dict alone (TypeError)."""
    from timm.models import load_checkpoint

    from sequencer.models.loading import checkpoint_filter_fn, to_release_layout

    source = randomize(sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs)).eval()
    torch.save(to_release_layout(source.state_dict()), tmp_path / "release.pth")
    model = sequencer.create_model("sequencer2d_s", num_classes=5, **tiny_kwargs).eval()
    load_checkpoint(model, str(tmp_path / "release.pth"), filter_fn=checkpoint_filter_fn)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("out_indices", [None, (0, 1)])
def test_every_parameter_of_a_features_only_model_gets_a_gradient(out_indices):
    """DDP's default (find_unused_parameters=False) fails on the second step when a parameter gets no gradient:
    the final norm (never applied to the maps) and any stage after the last map returned did not."""
    model = sequencer.create_model("sequencer2d_nano", features_only=True, out_indices=out_indices)
    sum(m.square().mean() for m in model(torch.randn(2, 3, 16, 16))).backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]
    assert len(model.model.stages) == (3 if out_indices is None else 2)


def test_own_init_drop_path_and_statistics_are_timms():
    """LeCun-normal init, DropPath and ImageNet's mean/std are the package's own, so that building a model imports no
    timm: the same draws from the same seed as timm's, the same arithmetic, the same values."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.layers import DropPath as TimmDropPath
    from timm.layers import lecun_normal_ as timm_lecun_normal_

    from sequencer.models.sequencer2d import IMAGENET_MEAN, IMAGENET_STD, DropPath
    from sequencer.models.weight_init import lecun_normal_
    for shape in [(192, 3, 7, 7), (384, 192, 2, 2), (10, 7)]:
        ours, timms = torch.empty(shape), torch.empty(shape)
        torch.manual_seed(0)
        lecun_normal_(ours)
        torch.manual_seed(0)
        timm_lecun_normal_(timms)
        assert torch.equal(ours, timms), shape
    x = torch.randn(64, 3, 3, 8)
    for rate in (0.3, 1.0):
        torch.manual_seed(1)
        ours = DropPath(rate).train()(x)
        torch.manual_seed(1)
        assert torch.equal(ours, TimmDropPath(rate).train()(x)), rate
    assert repr(DropPath(0.25)) == repr(TimmDropPath(0.25)).replace("TimmDropPath", "DropPath")
    assert (IMAGENET_MEAN, IMAGENET_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def test_kernels_mark_constant_results_as_torchs_decorator_does():
    """The kernels set dynamo's constant-result mark themselves (torch's decorator imports torch._dynamo to set it):
    it must still be exactly what torch.compiler.assume_constant_result sets."""
    from sequencer.models.kernels.capture import assume_constant_result

    def ours():
        return 1

    def torchs():
        return 1
    assert assume_constant_result(ours) is ours and torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) and vars(ours)


# what building, training and running a plain model on the CPU never needs (timm's import brings torchvision and
# torch._dynamo; the Triton backend's brings Triton and torch._inductor): seconds of imports for a caller. What
# `import torch` itself imports is torch's, not ours
_NOT_FOR_A_PLAIN_MODEL = ("timm", "torchvision", "torch._dynamo", "torch._inductor", "triton", "sympy", "onnx",
                          "onnxruntime", "matplotlib", "sklearn")
_BUILD_AND_RUN = f"""
import sys
import torch
torchs = set(sys.modules)
import sequencer
torch.set_num_threads(1)
model = sequencer.create_model("sequencer2d_nano", drop_path_rate=0.1)
model(torch.randn(2, 3, 16, 16)).sum().backward()
with torch.no_grad():
    model.eval()(torch.randn(1, 3, 16, 16))
print(",".join(m for m in {_NOT_FOR_A_PLAIN_MODEL!r} if m in sys.modules and m not in torchs))
"""


def test_building_and_running_a_model_imports_no_timm_compiler_or_export_tooling():
    r = subprocess.run([sys.executable, "-c", _BUILD_AND_RUN], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported: {r.stdout.strip()}"
