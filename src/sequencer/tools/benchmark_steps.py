"""What one row of `sequencer benchmark` runs, and the memory probe that builds it again in a fresh process
(:mod:`.peak_memory`): the inference and training steps, ours on another LSTM backend, timm's twin of ours, a
compiled twin; the same for a row of `sequencer benchmark --backbone` (:mod:`.backbone_benchmark`).

Apart from :mod:`.benchmark` so that the probe's process imports the models and not the rest of the package: timm
only for a row that runs a timm model, and not the engine's inference, whose data pipeline imports timm and through
it torchvision (measured: 2.5 s of the 4.3 s it took to import the probe).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.amp import AMP_DTYPES, autocast
from ..errors import SequencerError
from .peak_memory import step_peak_memory

TIMM_MODELS = ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")


def build_timm_twin(model: nn.Module, name: str) -> nn.Module:
    """timm's ``Sequencer2d`` with ``model``'s architecture and weights (our layout is timm's)."""
    import timm

    if name not in TIMM_MODELS:
        raise SequencerError(f"`compare_timm`: timm has no {name!r}", hint=f"use one of {', '.join(TIMM_MODELS)}")
    kwargs = {k: v for k, v in getattr(model, "model_kwargs", {}).items()
              if k in ("num_classes", "in_chans", "img_size") or k in ("layers", "embed_dims", "hidden_sizes",
                                                                     "patch_sizes", "mlp_ratios")}
    try:
        twin = timm.create_model(name, pretrained=False, **kwargs)
        twin.load_state_dict(model.state_dict())
    except (RuntimeError, TypeError) as e:
        raise SequencerError(f"`compare_timm`: timm's {name} does not take these weights: {str(e)[:200]}") from None
    return twin


def with_lstm_backend(model: nn.Module, backend: str) -> nn.Module:
    """A copy of ``model`` whose token mixers run their LSTMs on ``backend`` (same weights)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "lstm_backend"):
            module.lstm_backend = backend
    return model


def compiled_if_named(model: nn.Module, impl: str) -> nn.Module:
    return torch.compile(model) if impl.endswith("-compiled") else model


def make_infer_step(model: nn.Module, x: torch.Tensor, amp: torch.dtype, device: torch.device) -> Callable:
    def step():
        with torch.inference_mode(), autocast(device.type, amp):
            return model(x)
    return step


def make_train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype,
                    device: torch.device) -> Callable:
    """One AdamW training step (forward, cross-entropy, backward, update, gradients freed) under autocast in
    ``amp``. The gradients are freed after the update, as the training loop frees them (`engine.loop`), so they
    are part of a step's peak memory and not of the state it starts from (zeroed at the start, they stayed from
    one step to the next and the peak left them out)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def step():
        with autocast(device.type, amp):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def _probe_model(spec: dict) -> nn.Module:
    from ..models import create_model

    impl = spec["impl"].removesuffix("-compiled")
    if impl.startswith("ref-"):
        import timm
        return compiled_if_named(timm.create_model(impl[4:], pretrained=False), spec["impl"])
    model = create_model(spec["name"], **spec["model_kwargs"])
    if impl == "timm":
        model = build_timm_twin(model, spec["name"])
    elif impl.startswith("ours-") and impl != "ours-optimized":
        model = with_lstm_backend(model, impl[len("ours-"):])
    return compiled_if_named(model, spec["impl"])


def memory_probe(spec: dict) -> float:
    """Peak memory in MiB that ``spec``'s work allocates on top of weights and inputs (see module docstring)."""
    device = torch.device(spec["device"])
    amp = AMP_DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    x = torch.randn(spec["batch_size"], *spec["input_size"], device=device)
    if spec.get("onnx"):
        from .onnx_runtime import OnnxModel
        # no memory arena: the resident set then follows onnxruntime's live memory, as glibc's for PyTorch
        session = OnnxModel(spec["onnx"], threads=torch.get_num_threads(), memory_arena=False)
        images = x.numpy()
        step = lambda: session.run_numpy(images)  # noqa: E731
    elif spec["mode"] == "train":
        model = _probe_model(spec).to(device)
        target = torch.randint(0, max(getattr(model, "num_classes", 1), 1), (spec["batch_size"],), device=device)
        step = make_train_step(model, x, target, amp, device)
    else:
        model = _probe_model(spec).to(device).eval()
        if spec["impl"] == "ours-optimized":
            from .optimize import optimize_for_inference
            model = optimize_for_inference(model, amp, streams=spec.get("streams"))
            step = make_infer_step(model, x, torch.float32, device)
        else:
            step = make_infer_step(model, x, amp, device)
    return step_peak_memory(step, device, spec["iters"])


# --- `sequencer benchmark --backbone` (tools/backbone_benchmark.py): its rows and its memory probe
class TimmWithFPN(nn.Module):
    """A timm ``features_only`` model under torchvision's FPN (256 channels, "pool" level), as ``BackboneWithFPN``.

    (B, 3, H, W) -> OrderedDict "0".."n-1", "pool" of (B, 256, H/s, W/s).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


def build_row_model(impl: str, name: str, reference: str) -> nn.Module:
    """The model measured in row ``impl`` (see the module docstring), freshly initialised."""
    base = impl.removesuffix("-compiled")
    if base == "backbone":
        from ..models.backbone import create_backbone
        model = create_backbone(name)
    elif base == "trunk":
        from ..models import create_model
        model = create_model(name, features_only=True)
    else:
        import timm
        model = timm.create_model(reference, pretrained=False, features_only=True)
        if base.endswith("-fpn"):
            model = TimmWithFPN(model)
    return compiled_if_named(model, impl)


def _maps(out) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out)


def make_step(model: nn.Module, x: torch.Tensor, mode: str, amp: torch.dtype, device: torch.device):
    """One inference forward, or one training step (stand-in loss: the sum of the maps' mean squares, AdamW)."""
    if mode == "infer":
        return make_infer_step(model.eval(), x, amp, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train():  # the gradients are freed after the update, as in training: part of the step's peak memory
        with autocast(device.type, amp):
            loss = sum(m.float().square().mean() for m in _maps(model(x)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return train


def backbone_memory_probe(spec: dict) -> float:
    """Peak MiB of one row's step (see :func:`sequencer.tools.peak_memory.step_peak_memory`); run in a fresh process."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    x = torch.randn(spec["batch_size"], 3, spec["img_size"], spec["img_size"], device=device)
    model = build_row_model(spec["impl"], spec["name"], spec["reference"]).to(device)
    step = make_step(model, x, spec["mode"], AMP_DTYPES[spec["dtype"]], device)
    return step_peak_memory(step, device, spec["iters"])
