"""The library is a guest in the caller's process. Each public entry point of ``sequencer.__all__`` that does work,
and the documented loaders and exports beside them (``create_model(checkpoint_path=)``, ``engine.inference.load_model``,
``tools.export``'s functions), leaves the process as it found it (threads, default dtype, grad / inference / autocast
modes and dtypes, anomaly detection, determinism, cuDNN, TF32, reduced-precision and SDPA flags, matmul and fp32
precisions, torch's mode stacks, random state, every existing logger, warning filters and ``showwarning``,
SIGINT/SIGTERM handlers, exception hooks, multiprocessing start method and sharing strategy, environment, working
directory, sys.path, the open files and standard streams; no thread or child process of its own left running),
leaves the objects the caller passed as they were (a module's weights, devices, dtypes, requires_grad, gradients and
submodule modes, unless training them is the call's purpose; configs, dicts, lists, Datasets), and prints nothing
with ``progress=False`` (a download's progress bar included). ``validate`` and ``validate_segmenter`` give back a
module they moved to their device, also when evaluation raises."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import faulthandler
import gc
import itertools
import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.backends.opt_einsum  # noqa: F401 - read below; torch < 2.9 imports it only at a first einsum
from torch import nn

import sequencer
from segmentation_helpers import make_voc
from sequencer.engine import segmentation_eval, validation
from test_api_objects import Blobs

TINY_BACKBONE = dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4), mlp_ratios=(2, 2))
TINY_SEGMENT = dict(num_classes=3, backbone="sequencer2d_nano", head_channels=16, out_channels=16, img_size=32,
                    batch_size=2, epochs=1, warmup_iters=0, workers=0, device="cpu", log_interval=1000)
RUNS = itertools.count()  # each run its own experiment folder
QUICK = dict(epochs=1, batch_size=4, workers=0, warmup_epochs=0, device="cpu", log_interval=1000)


# ------------------------------------------------------------------------------------------------ snapshots
def process_state() -> dict:
    """What a guest must leave as it found it, as comparable values."""
    seq = logging.getLogger("sequencer")
    return dict(
        threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
        default_dtype=torch.get_default_dtype(), grad=torch.is_grad_enabled(),
        inference_mode=torch.is_inference_mode_enabled(),
        autocast=(torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")),
        deterministic=(torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled()),
        cudnn=(torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
               torch.backends.cudnn.allow_tf32),
        matmul=(torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
        mkldnn=torch.backends.mkldnn.enabled,
        torch_rng=torch.get_rng_state(), numpy_rng=frozen(np.random.get_state()), random_rng=random.getstate(),
        root_logger=(list(logging.root.handlers), logging.root.level, list(logging.root.filters),
                     logging.root.manager.disable),
        sequencer_logger=(list(seq.handlers), seq.level, seq.propagate, list(seq.filters), seq.disabled),
        handler_filters=[list(h.filters) for h in logging.root.handlers],
        warning_filters=list(warnings.filters),
        signals=(signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
        environ=dict(os.environ), cwd=os.getcwd(), sys_path=list(sys.path),
        # beside the flags above: torch's other numerics and mode switches, the dispatcher's mode stacks (a
        # `torch.set_default_device`, a `with torch.device(...)` or any other mode left entered), the precision knobs
        # of torch >= 2.9
        reduced_precision=(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                           torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        sdp=(torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled()),
        fp32_precision=[_attribute(torch.backends, path) for path in _FP32_PRECISIONS],
        autocast_dtypes=(torch.get_autocast_dtype("cpu"), torch.get_autocast_dtype("cuda")),
        anomaly=torch.is_anomaly_enabled(),  # (a default device, set or entered, is a mode on the stack below)
        mode_stacks=(torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack()),
        opt_einsum=torch.backends.opt_einsum.enabled,
        # every logger that exists before the call (timm's, torch's, the caller's own), as the root above; but
        # torch's structured-trace logger, whose lazy handler torch itself drops at a process's first torch.compile
        loggers={name: (list(lg.handlers), lg.level, lg.propagate, list(lg.filters), lg.disabled)
                 for name, lg in logging.root.manager.loggerDict.items()
                 if isinstance(lg, logging.Logger) and name != "torch.__trace"},
        showwarning=warnings.showwarning,
        hooks=(sys.excepthook, threading.excepthook, sys.getrecursionlimit(), sys.getswitchinterval(), gc.isenabled(),
               faulthandler.is_enabled()),
        multiprocessing=(multiprocessing.get_start_method(allow_none=True),
                         torch.multiprocessing.get_sharing_strategy()),
        # the caller's open files: each descriptor open before the call still open, on the same file, and the
        # standard streams the same objects, open
        open_files=_open_files(),
        # threads and child processes: none started by the call still running when it is over
        python_threads=set(threading.enumerate()), children=_children(),
        streams=[(stream, stream.closed) for stream in (sys.stdin, sys.stdout, sys.stderr)],
        # the TorchScript-based ONNX exporter's module-level settings (opset, export type, shape inference), which
        # torch.onnx.export sets for its export and leaves set
        onnx_exporter=_onnx_exporter_settings(),
    )


def _onnx_exporter_settings() -> dict | None:
    """torch.onnx's exporter settings (its ``GLOBALS``), None before torch.onnx's exporter is imported."""
    exporter = sys.modules.get("torch.onnx._internal.torchscript_exporter._globals",  # torch >= 2.9
                               sys.modules.get("torch.onnx._globals"))
    return dict(vars(exporter.GLOBALS)) if exporter is not None else None


_FP32_PRECISIONS = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision",
                    "cudnn.rnn.fp32_precision", "mkldnn.matmul.fp32_precision", "mkldnn.conv.fp32_precision",
                    "mkldnn.rnn.fp32_precision")
EXISTING_ONLY = ("loggers", "open_files")  # compared for what existed before the call (a call may add its own)
NONE_NEW = ("python_threads", "children")  # the call may end the caller's, but leaves none of its own


def _attribute(root, path: str):
    """``root.a.b.c`` for ``path`` "a.b.c"; None where this torch has no such setting."""
    for name in path.split("."):
        root = getattr(root, name, None)
    return root


@dataclasses.dataclass(frozen=True)
class OpenFile:
    """An open descriptor's file, compared by (device, inode); ``target`` (what /proc names it) for the message."""
    dev: int
    ino: int
    target: str = dataclasses.field(compare=False)


def _open_files() -> dict[int, OpenFile]:
    """{descriptor: its file} of the process's open files."""
    found = {}
    listed = "/proc/self/fd"  # Linux; elsewhere none are compared
    for fd in (int(name) for name in (os.listdir(listed) if os.path.isdir(listed) else ())):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            st = os.fstat(fd)
            found[fd] = OpenFile(st.st_dev, st.st_ino, os.readlink(f"{listed}/{fd}"))
    return found


def _children() -> set[int]:
    """The process ids of this process's children (Linux; elsewhere none are compared)."""
    found, me = set(), os.getpid()
    for pid in (name for name in (os.listdir("/proc") if os.path.isdir("/proc/self") else ()) if name.isdigit()):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == me:  # the field after the name: state, then ppid
                found.add(int(pid))
    return found


@pytest.fixture(scope="module")
def others_garbage_collected():
    """The objects of earlier tests collected, the survivors set aside from later collections (``gc.freeze``), so
    that :func:`_without_others_garbage` collects only what was made since (a full collection took 0.18 s of CPU
    per call), and put back in the collector's care after this module's tests."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _without_others_garbage() -> None:
    """Close what earlier tests left for others to close: their unreachable objects' open files (the garbage
    collector would close them inside the call, and the call's own files take their descriptors; the tests that
    use it ask for :func:`others_garbage_collected`), and the font files matplotlib keeps open per thread that drew
    text (64 at most: a full cache closes another thread's fonts when the call draws its summary plot). Neither is
    the caller's."""
    gc.collect()
    fonts = sys.modules.get("matplotlib.font_manager")
    if fonts is not None:
        fonts._get_font.cache_clear()  # matplotlib's own cache (private): it reopens the fonts at the next text


def frozen(obj):
    """``obj`` as plain comparable values (tensors as lists with their device and dtype, objects as their fields)."""
    if isinstance(obj, nn.Module):
        raise TypeError("modules are compared by module_state")
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().cpu().tolist(), str(obj.device), obj.dtype, obj.requires_grad)
    if isinstance(obj, np.ndarray):
        return ("array", obj.tolist(), obj.dtype)
    if isinstance(obj, dict):
        return {k: frozen(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [frozen(v) for v in obj])
    if dataclasses.is_dataclass(obj):
        return frozen(vars(obj))  # its given-fields record too
    if hasattr(obj, "__dict__") and not callable(obj):
        return (type(obj).__name__, frozen(vars(obj)))
    return obj


def module_state(module: nn.Module, trained: bool) -> dict:
    """A caller's module as the guest must give it back: each submodule's mode and ``grad_checkpointing``, each
    parameter's ``requires_grad``; unless ``trained`` (training it in place is the call's purpose), each
    parameter's, gradient's and buffer's values, device and dtype too, and the storage they live in."""
    state = dict(modes=[(name, m.training, getattr(m, "grad_checkpointing", None))
                        for name, m in module.named_modules()],
                 requires_grad=[(name, p.requires_grad) for name, p in module.named_parameters()])
    if not trained:
        tensors = [(name, t) for name, t in module.named_parameters()] + \
                  [(f"{name}.grad", p.grad) for name, p in module.named_parameters() if p.grad is not None] + \
                  [(name, t) for name, t in module.named_buffers()]
        state["tensors"] = [(name, frozen(t), t.data_ptr()) for name, t in tensors]
    return state


class Trained:
    """A module the call trains in place: only its modes and requires_grad must come back."""

    def __init__(self, module: nn.Module):
        self.module = module


def passed_state(passed: dict) -> dict:
    state = {}
    for key, obj in passed.items():
        if isinstance(obj, Trained):
            state[key] = module_state(obj.module, trained=True)
        elif isinstance(obj, nn.Module):
            state[key] = module_state(obj, trained=False)
        else:
            state[key] = frozen(obj)
    return state


def caller_module(seed: int = 0) -> nn.Module:
    """A 16 px sequencer2d_nano as a caller holds it: training, its stem frozen in eval mode with its weights
    fixed, gradients from a step of the caller's own."""
    torch.manual_seed(seed)
    model = sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16).train()
    model.stem.eval().requires_grad_(False)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    return model


def caller_segmenter() -> nn.Module:
    torch.manual_seed(0)
    model = sequencer.create_segmenter("sequencer2d_nano", 3, head_channels=16, out_channels=16,
                                       backbone_kwargs=TINY_BACKBONE).train()
    model.backbone.eval()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    return model


# ------------------------------------------------------------------------------------------------ the calls
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data and the checkpoints of two quick runs, made before any snapshot."""
    root = tmp_path_factory.mktemp("guest")
    voc = make_voc(root / "voc", n_train=4, n_val=2)
    classifier = sequencer.train(model="sequencer2d_nano", img_size=16, data=(Blobs(8, 0, pil=True),
                                 Blobs(4, 1, pil=True)), **QUICK, output=str(root), experiment="c", progress=False)
    segmenter = sequencer.train_segmenter(voc, **TINY_SEGMENT, backbone_kwargs=TINY_BACKBONE, output=str(root),
                                          experiment="s", progress=False)
    return dict(root=root, voc=voc, classifier=classifier.checkpoint, segmenter=segmenter.checkpoint,
                classifier_loss=classifier.summary[0]["train_loss"], segmenter_loss=segmenter.summary[0]["train_loss"])


def call_train(env, progress):
    model = caller_module()
    mean = [0.5, 0.5, 0.5]
    config = sequencer.TrainConfig(**QUICK, mean=mean, std=[0.25, 0.25, 0.25], grad_checkpointing=True,
                                   output=str(env["root"]), experiment=f"train-{next(RUNS)}")
    data = (Blobs(8, 0, pil=True), Blobs(4, 1, pil=True))
    callbacks = [lambda metrics: False]
    return (lambda: sequencer.train(config, model=model, data=data, callbacks=callbacks, progress=progress),
            dict(model=Trained(model), config=config, mean=mean, data=data, callbacks=callbacks))


def call_train_segmenter(env, progress):
    backbone_kwargs = copy.deepcopy(TINY_BACKBONE)
    config = sequencer.SegmentConfig(data=str(env["voc"]), **TINY_SEGMENT, backbone_kwargs=backbone_kwargs,
                                     output=str(env["root"]), experiment=f"segment-{next(RUNS)}")
    return (lambda: sequencer.train_segmenter(config, progress=progress),
            dict(config=config, backbone_kwargs=backbone_kwargs))


def call_validate_module(env, progress):
    model, mean, data = caller_module(), [0.5, 0.5, 0.5], Blobs(4, 1, pil=True)
    return (lambda: sequencer.validate(model=model, data=data, mean=mean, batch_size=4, workers=0, amp=True,
                                       progress=progress),
            dict(model=model, mean=mean, data=data))


def call_validate_compiled(env, progress):
    """As the command's --torchcompile: dynamo traces the caller's module (the eager backend: no code generation)."""
    model, data = caller_module(), Blobs(4, 1, pil=True)
    return (lambda: sequencer.validate(model=model, data=data, batch_size=4, workers=0, amp=True,
                                       torchcompile="eager", progress=progress),
            dict(model=model, data=data))


def call_validate_checkpoint(env, progress):
    return (lambda: sequencer.validate(env["classifier"], data=Blobs(4, 1, pil=True), batch_size=4, workers=0,
                                       progress=progress), {})


def call_validate_segmenter_module(env, progress):
    model = caller_segmenter()
    return (lambda: sequencer.validate_segmenter(data=env["voc"], model=model, eval_size=32, device="cpu"),
            dict(model=model))


def call_validate_segmenter_checkpoint(env, progress):
    return (lambda: sequencer.validate_segmenter(env["segmenter"], env["voc"], eval_size=32, device="cpu"), {})


def call_optimize_for_inference(env, progress):
    """The fast copy made and run on a batch cut into streams, one per intra-op thread (each stream thread sets its
    own thread count)."""
    model, images = caller_module(), torch.randn(4, 3, 16, 16)
    torch.set_num_threads(2)  # the autouse fixture puts back the suite's one thread

    def call():
        fast = sequencer.optimize_for_inference(model, torch.bfloat16)
        fast(images)
        fast(images[:1])

    return call, dict(model=model, images=images)


def call_create_model(env, progress):
    kwargs = dict(num_classes=2, img_size=16)
    return lambda: sequencer.create_model("sequencer2d_nano", **kwargs), dict(kwargs=kwargs)


def call_create_backbone(env, progress):
    strides = [8, 16]
    return lambda: sequencer.create_backbone("sequencer2d_nano", strides=strides), dict(strides=strides)


def call_create_segmenter(env, progress):
    backbone_kwargs = copy.deepcopy(TINY_BACKBONE)
    return (lambda: sequencer.create_segmenter("sequencer2d_nano", 3, head="fpn", backbone_kwargs=backbone_kwargs),
            dict(backbone_kwargs=backbone_kwargs))


def call_create_model_checkpoint(env, progress):
    """A checkpoint's weights loaded by name (the loaders' path: safe reading, weights picked, keys adapted)."""
    kwargs = dict(num_classes=2, img_size=16)
    return (lambda: sequencer.create_model("sequencer2d_nano", checkpoint_path=str(env["classifier"]), **kwargs),
            dict(kwargs=kwargs))


def call_load_model(env, progress):
    """The predict command's loader, documented for a caller's own serving threads (README)."""
    from sequencer.engine.inference import load_model
    return lambda: load_model(str(env["classifier"])), {}


def call_export(env, progress):
    """``sequencer.tools.export``'s functions, documented for Python callers (docs/tools.md): the caller's module
    traced to TorchScript and written as safetensors, each file reloaded and checked (ONNX: `call_export_onnx`)."""
    from sequencer.tools.export import export_safetensors, export_torchscript
    model, folder = caller_module(), env["root"] / f"export-{next(RUNS)}"
    config = dict(arch="sequencer2d_nano", model_kwargs=dict(model.model_kwargs), class_names=["a", "b"],
                  data_config=dict(img_size=16))

    def call():
        folder.mkdir()
        export_torchscript(model, folder / "m.pt", (3, 16, 16), metadata=config)
        export_safetensors(model, folder / "m.safetensors", config)

    return call, dict(model=model, config=config)


def call_export_onnx(env, progress):
    """``export_onnx_int8`` with calibration images and ``verify``: the fp32 ONNX export checked under onnxruntime,
    onnxruntime's static and dynamic quantisers, its sessions on the images (the `export` extra; 2 s of CPU)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime.quantization  # noqa: F401 - before the snapshot: importing it appends to sys.path itself
    from PIL import Image

    from sequencer.tools.export import export_onnx_int8
    model, folder = caller_module(), env["root"] / f"export-onnx-{next(RUNS)}"
    images = folder / "images"
    images.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (20, 20), colour).save(images / f"{i}.png")
    metadata = dict(arch="sequencer2d_nano", class_names=["a", "b"], input_size=[3, 16, 16],
                    data_config=dict(img_size=16, mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation="bicubic"))
    return (lambda: export_onnx_int8(model, folder / "m.onnx", (3, 16, 16), metadata=metadata, dynamic_batch=True,
                                     calibration=str(images), verify=str(images), min_agreement=0.0),
            dict(model=model, metadata=metadata))


def call_validate_segmenter_compiled(env, progress):
    """The caller's module with a part it compiled itself (its head's classifier; dynamo traces it, with the eager
    backend)."""
    model = caller_segmenter()
    model.head.classifier = torch.compile(model.head.classifier, backend="eager")
    return (lambda: sequencer.validate_segmenter(data=env["voc"], model=model, eval_size=32, device="cpu"),
            dict(model=model))


def call_benchmark_compiled(env, progress):
    """``run_benchmark`` with ``torchcompile`` (its twins compiled with the eager backend here: no code generation),
    a module documented for Python callers beside the command (docs/package.md)."""
    from sequencer.tools.benchmark import BenchmarkSettings, run_benchmark
    settings = BenchmarkSettings(model="sequencer2d_nano", img_size=16, batch_size=2, torchcompile=True, device="cpu",
                                 num_warmup=0, num_iter=1, memory_iter=0, gemm_size=32)
    return lambda: run_benchmark(settings), dict(settings=settings)


def call_list_models(env, progress):
    return lambda: sequencer.list_models("sequencer2d*"), {}


CALLS = {  # each public entry point that does work, by how a caller uses it
    "train": call_train, "train_segmenter": call_train_segmenter,
    "validate(model=module)": call_validate_module, "validate(model=module, compiled)": call_validate_compiled,
    "validate(checkpoint)": call_validate_checkpoint,
    "validate_segmenter(model=module)": call_validate_segmenter_module,
    "validate_segmenter(checkpoint)": call_validate_segmenter_checkpoint,
    "optimize_for_inference": call_optimize_for_inference, "create_model": call_create_model,
    "create_backbone": call_create_backbone, "create_segmenter": call_create_segmenter, "list_models": call_list_models,
    # beside sequencer.__all__: the documented loaders and exports
    "create_model(checkpoint)": call_create_model_checkpoint, "load_model": call_load_model, "export": call_export,
    "export(onnx int8)": call_export_onnx,
    "benchmark(compiled)": call_benchmark_compiled,
    "validate_segmenter(model=module, compiled)": call_validate_segmenter_compiled,
}
BEYOND_ALL = {"load_model", "export", "benchmark"}
# calls in which dynamo traces a module (torch.compile, torch.export): torch 2.6's adds a warning filter there
TRACED = {"validate(model=module, compiled)", "validate_segmenter(model=module, compiled)", "benchmark(compiled)"}
WITH_PROGRESS = {"train", "train_segmenter", "validate(model=module)", "validate(checkpoint)"}
# a new module's initial weights come from torch's generator, as torch.nn's own layers' do
DRAWS_WEIGHTS = {"create_model", "create_backbone", "create_segmenter", "create_model(checkpoint)", "load_model"}


def test_every_public_entry_point_that_does_work_is_covered():
    covered = {name.split("(")[0] for name in CALLS}
    data_only = {"TrainResult", "TrainConfig", "TrainingInterrupted", "ValidationResult", "SequencerError",
                 "__version__", "SegmentConfig", "SegmentResult", "SegmentValidationResult"}
    assert set(sequencer.__all__) - data_only == covered - BEYOND_ALL


@pytest.fixture
def dynamo_of_torch_2_6(monkeypatch):
    """Dynamo as torch 2.6's (the declared floor): each frame it looks at adds ``ignore`` for torch.distributed's
    UserWarnings to the process's warning filters (torch 2.7 on adds it only while it looks); torch.compile's
    default backend is the eager one (no code generated). The frames it looked at."""
    from torch._dynamo import convert_frame

    looked_at, looks = [], convert_frame.has_tensor_in_frame

    def has_tensor_in_frame(frame):
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        looked_at.append(frame)
        return looks(frame)

    monkeypatch.setattr(convert_frame, "has_tensor_in_frame", has_tensor_in_frame)
    compiles = torch.compile

    def compile(model, **kwargs):  # the eager backend: dynamo traces, nothing is generated
        return compiles(model, **{"backend": "eager", **kwargs})

    monkeypatch.setattr(torch, "compile", compile)
    torch._dynamo.reset()  # frames compiled by earlier tests are looked at again
    return looked_at


@pytest.mark.parametrize("name, progress", [(name, False) for name in CALLS] +
                         [(name, True) for name in CALLS if name in WITH_PROGRESS])
def test_a_call_leaves_the_process_and_the_callers_objects_as_they_were(name, progress, env, capfd,
                                                                       dynamo_of_torch_2_6, others_garbage_collected):
    printed = checked_call(name, progress, env, capfd)
    if not progress:
        assert printed == ("", ""), f"{name} printed with progress=False"
    assert bool(dynamo_of_torch_2_6) == (name in TRACED)  # where dynamo traced, its filter was added


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("name", ["train", "train_segmenter", "validate(model=module)"])
def test_with_the_callers_console_logging_a_call_prints_only_through_it_and_leaves_it_as_it_was(
        name, progress, env, capfd, others_garbage_collected):
    """A caller whose logging prints to the console (``logging.basicConfig``'s handler on stderr, at INFO):
    ``progress=True`` shows the call's log through that handler alone (no second copy on stdout), ``progress=False``
    shows nothing, and the handler comes back without the call's filter."""
    root, handler = logging.getLogger(), logging.StreamHandler(sys.stderr)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        printed = checked_call(name, progress, env, capfd)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert printed.out == "" and bool(printed.err) is progress


def checked_call(name: str, progress: bool, env, capfd):
    """Run ``CALLS[name]``; assert the process's state and the caller's objects are as before; what it printed."""
    call, passed = CALLS[name](env, progress)
    capfd.readouterr()
    _without_others_garbage()
    before, objects_before = process_state(), passed_state(passed)
    call()
    _ended_soon(before["python_threads"])
    after, objects_after = process_state(), passed_state(passed)
    printed = capfd.readouterr()
    if name in DRAWS_WEIGHTS:
        del before["torch_rng"], after["torch_rng"]
    for key in EXISTING_ONLY:
        after[key] = {name: after[key].get(name) for name in before[key]}
    for key in NONE_NEW:
        after[key] = after[key] - before[key]
        before[key] = set()
    changed = [key for key in before if not _same(before[key], after[key])]
    # a string: pytest cuts a message of any other type to 240 characters (the descriptor that changed was cut out)
    assert not changed, "\n".join(f"{key}: {_difference(before[key], after[key])}" for key in changed)
    assert objects_after == objects_before
    return printed


def _ended_soon(threads: set, timeout: float = 2.0) -> None:
    """Give the threads started since ``threads`` was taken a moment to end: a pool the call dropped ends its idle
    workers as it is collected, not at once."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _difference(before, after):
    """What changed: for mappings (open files, loggers, environment) only the keys whose values differ, as
    {key: (before, after)}; otherwise (before, after)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {key: (before.get(key), after.get(key)) for key in before.keys() | after.keys()
                if not _same(before.get(key), after.get(key))}
    return before, after


# ---------------------------------------------------------------------------- the caller's modes
@contextlib.contextmanager
def callers_modes():
    """A caller's thread-local modes around the call: inference mode (no gradients) and bfloat16 autocast."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


class Spy(nn.Module):
    """A classifier that records, per forward, (training, gradients on, its logits' dtype)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 2)
        self.seen = set()

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        self.seen.add((self.training, torch.is_grad_enabled(), logits.dtype))
        return logits


def test_a_training_runs_as_its_settings_say_inside_the_callers_no_grad_and_autocast(env):
    """``train`` and ``train_segmenter`` called inside the caller's ``torch.inference_mode()`` (or ``no_grad``) and
    ``torch.autocast`` blocks train as their own settings say: with gradients (their backward raised 'element 0 of
    tensors does not require grad'), in float32 without ``amp`` (the caller's autocast trained in bfloat16)."""
    torch.manual_seed(0)
    model = Spy()
    with callers_modes():
        sequencer.train(model=model, data=(Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)), img_size=16, **QUICK,
                        output=str(env["root"]), experiment=f"modes-{next(RUNS)}", progress=False)
        segmented = sequencer.train_segmenter(env["voc"], **TINY_SEGMENT, backbone_kwargs=TINY_BACKBONE,
                                              output=str(env["root"]), experiment=f"modes-{next(RUNS)}",
                                              progress=False)
    assert model.seen == {(True, True, torch.float32), (False, False, torch.float32)}
    assert segmented.summary[0]["train_loss"] == env["segmenter_loss"]  # the same run as outside the blocks
    segmenter, dtypes = caller_segmenter().eval(), []
    segmenter.head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sequencer.validate_segmenter(data=env["voc"], model=segmenter, eval_size=32, device="cpu")
    assert set(dtypes) == {torch.float32}


def test_a_call_runs_in_float32_whatever_the_callers_default_dtype(env, callers_float64_default):
    """Under the caller's float64 default dtype a run is the float32 run the same settings give (its model built by
    name trained in float32 with the same numbers, checkpointed in float32), a float32 module gets float32
    images in ``train`` and ``validate`` and is exported (its checks' inputs and rebuilt model float32); the
    caller's default dtype comes back. Each followed the caller's default: a name trained in float64 (another loss,
    a checkpoint twice the size, ``amp`` inert since autocast casts no float64), and the images and export inputs
    came as float64 (ATen's dtype error in a float32 module's first layer)."""
    run = sequencer.train(model="sequencer2d_nano", img_size=16, data=(Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)),
                          **QUICK, output=str(env["root"]), experiment=f"float64-{next(RUNS)}", progress=False)
    assert torch.get_default_dtype() == torch.float64
    assert run.summary[0]["train_loss"] == env["classifier_loss"]
    weights = torch.load(run.checkpoint, map_location="cpu", weights_only=False)["state_dict"].values()
    assert {t.dtype for t in weights if t.is_floating_point()} == {torch.float32}
    model = Spy().float()  # built in float64 under that default: the caller's float32 module
    sequencer.train(model=model, data=(Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)), img_size=16, **QUICK,
                    output=str(env["root"]), experiment=f"float64-{next(RUNS)}", progress=False)
    sequencer.validate(model=model, data=Blobs(4, 1, pil=True), img_size=16, workers=0, progress=False)
    assert model.seen == {(True, True, torch.float32), (False, False, torch.float32)}
    from sequencer.tools.export import export_safetensors, export_torchscript
    net, folder = caller_module().float(), env["root"] / f"export-{next(RUNS)}"
    folder.mkdir()
    config = dict(arch="sequencer2d_nano", model_kwargs=dict(net.model_kwargs), data_config=dict(img_size=16))
    assert export_torchscript(net, folder / "m.pt", (3, 16, 16), metadata=config) < 1e-5  # its check's error
    assert export_safetensors(net, folder / "m.safetensors", config) < 1e-5
    assert torch.get_default_dtype() == torch.float64


@contextlib.contextmanager
def meta_default_device(how: str):
    """A caller's default device 'meta' (deferred initialisation), set process-wide or entered as a block."""
    if how == "set_default_device":
        torch.set_default_device("meta")
        try:
            yield
        finally:
            torch.set_default_device(None)
    else:
        with torch.device("meta"):
            yield


@pytest.mark.parametrize("how", ["set_default_device", "with torch.device"])
def test_the_callers_meta_default_device_builds_a_model_by_name_there_and_reaches_no_run(how, env):
    """Under the caller's ``torch.set_default_device("meta")`` (or ``with torch.device("meta")``): ``create_model``
    by name builds there, as torch's layers and timm do; one with weights to load is refused in one line (they
    were copied into meta tensors, a no-op, with a UserWarning per tensor); ``load_model``, ``validate``, ``train``
    and the exports work on their own devices, with the numbers they give outside it. Each failed deep in torch
    ('Cannot copy out of meta tensor; no data!')."""
    from sequencer.engine.inference import load_model
    from sequencer.tools.export import export_safetensors

    train_data, val_data = (Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)), Blobs(4, 1, pil=True)
    expected = sequencer.validate(env["classifier"], data=val_data, workers=0, progress=False)
    net, folder = caller_module(), env["root"] / f"export-meta-{next(RUNS)}"
    folder.mkdir()
    config = dict(arch="sequencer2d_nano", model_kwargs=dict(net.model_kwargs), data_config=dict(img_size=16))
    with meta_default_device(how), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per tensor of a load that did nothing
        assert next(sequencer.create_model("sequencer2d_nano", num_classes=2).parameters()).is_meta
        with pytest.raises(sequencer.SequencerError, match="weights cannot be loaded into a model built on the meta"):
            sequencer.create_model("sequencer2d_nano", checkpoint_path=str(env["classifier"]))
        loaded = load_model(str(env["classifier"]))
        validated = sequencer.validate(env["classifier"], data=val_data, workers=0, progress=False)
        run = sequencer.train(model="sequencer2d_nano", img_size=16, data=train_data, **QUICK, output=str(env["root"]),
                              experiment=f"meta-{next(RUNS)}", progress=False)
        exported = export_safetensors(net, folder / "m.safetensors", config)
        assert torch.get_default_device() == torch.device("meta")  # the caller's, still
    weights = torch.load(env["classifier"], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(t, weights[k]) for k, t in loaded.model.state_dict().items())
    assert (validated.top1, validated.loss) == (expected.top1, expected.loss)
    assert run.summary[0]["train_loss"] == env["classifier_loss"]
    assert exported < 1e-5


def test_the_builders_follow_the_callers_default_dtype_as_timm_and_torch_layers_do(env, tmp_path):
    """The documented split: under the caller's float64 default, ``create_model`` (by name or with a checkpoint)
    and ``load_model`` build in float64, as timm's ``create_model`` and torch's layers do, and ``load_model``'s
    preprocessing gives float64 images, so its model predicts what the float32 one does (to float32's rounding);
    the runs (``train``, ``validate``) are float32 (the test above)."""
    import timm
    from PIL import Image

    from sequencer.engine.inference import eval_transform, load_model, read_images

    Image.new("RGB", (20, 20), "red").save(tmp_path / "red.png")

    def predicted():
        loaded = load_model(str(env["classifier"]))
        _, images, _ = read_images([tmp_path / "red.png"], eval_transform(loaded))
        with torch.no_grad():
            return next(loaded.model.parameters()).dtype, images[0].dtype, loaded.model(torch.stack(images))

    in_float32 = predicted()
    torch.set_default_dtype(torch.float64)
    try:
        timms = next(timm.create_model("resnet10t").parameters()).dtype
        by_name = next(sequencer.create_model("sequencer2d_nano", num_classes=2).parameters()).dtype
        from_file = sequencer.create_model("sequencer2d_nano", checkpoint_path=str(env["classifier"]))
        in_float64 = predicted()
    finally:
        torch.set_default_dtype(torch.float32)
    weights = torch.load(env["classifier"], map_location="cpu", weights_only=False)["state_dict"]
    assert timms == by_name == torch.float64
    assert all(t.dtype == torch.float64 and torch.equal(t, weights[k].double())
               for k, t in from_file.state_dict().items() if t.is_floating_point())
    assert in_float32[:2] == (torch.float32, torch.float32) and in_float64[:2] == (torch.float64, torch.float64)
    torch.testing.assert_close(in_float64[2].float(), in_float32[2], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- a module moved for evaluation
ELSEWHERE = torch.device("meta")  # a device other than the module's on every machine: the move is observable


def fake_classifier_metrics(*args, **kwargs) -> dict:
    return dict(top1=50.0, top5=100.0, loss=0.7, images_per_sec=1.0, count=4, unreadable=0, nonfinite=0)


def fake_segmenter_metrics(*args, **kwargs) -> dict:
    return dict(miou=50.0, pixel_acc=50.0, macc=50.0, pixels=1, per_class_iou={}, images=1)


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("entry", ["validate", "validate_segmenter"])
def test_a_module_moved_to_the_evaluation_device_comes_back_as_it_was(entry, fails, env, monkeypatch):
    """The caller's module is evaluated on ``device`` (here 'meta', whose tensors hold no data: a module moved
    there and back by ``.to`` would lose its weights), then given back on its own device, holding the very same
    tensors, each submodule in the mode it was in, also when evaluation raises."""
    model = caller_module() if entry == "validate" else caller_segmenter()
    seen = []

    def evaluation(model, *args, **kwargs):
        seen.append({p.device for p in model.parameters()})
        if fails:
            raise RuntimeError("evaluation failed")
        return fake_classifier_metrics() if entry == "validate" else fake_segmenter_metrics()

    if entry == "validate":
        monkeypatch.setattr(validation, "evaluate", evaluation)
        run = lambda: sequencer.validate(model=model, data=Blobs(4, 1, pil=True), device=str(ELSEWHERE),  # noqa: E731
                                         workers=0, progress=False)
    else:
        monkeypatch.setattr(segmentation_eval, "evaluate_segmentation", evaluation)
        run = lambda: sequencer.validate_segmenter(data=env["voc"], model=model, eval_size=32,  # noqa: E731
                                                   device=str(ELSEWHERE))
    before = module_state(model, trained=False)
    if fails:
        with pytest.raises(RuntimeError, match="evaluation failed"):
            run()
    else:
        run()
    assert seen == [{ELSEWHERE}]  # it did run elsewhere
    assert module_state(model, trained=False) == before


# ------------------------------------------------------------------------------------------------ console
@pytest.mark.parametrize("progress", [False, True])
def test_downloading_released_weights_shows_a_bar_only_with_progress(progress, tmp_path, monkeypatch, capfd):
    """``validate(model=NAME)`` evaluates the released weights, downloaded on first use: their progress bar is
    console output, so a ``progress=False`` call shows none (and a ``progress=True`` one does, on stderr)."""
    from sequencer.models import get_model_entry

    torch.manual_seed(0)
    weights = tmp_path / "released-nano.pth"
    torch.save(sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16).state_dict(), weights)
    monkeypatch.setitem(get_model_entry("sequencer2d_nano").pretrained_cfg, "url", weights.as_uri())
    monkeypatch.setitem(get_model_entry("sequencer2d_nano").pretrained_cfg, "num_classes", 2)  # the file's head
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache: the file is downloaded
    capfd.readouterr()
    result = sequencer.validate(model="sequencer2d_nano", num_classes=2, img_size=16, data=Blobs(4, 1, pil=True),
                                batch_size=4, workers=0, progress=progress)
    out, err = capfd.readouterr()
    assert result.checkpoint == "pretrained"
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / weights.name).is_file()  # downloaded in this call
    assert ("released-nano.pth" in err) is progress
    if not progress:
        assert (out, err) == ("", "")


# ---------------------------------------------------------------------------- settings shared by overlapping calls
def test_overlapping_calls_share_the_default_dtype_and_log_level_and_the_last_to_end_gives_them_back(
        callers_float64_default):
    """torch's default dtype and the "sequencer" logger's level are process-wide: calls overlapping in two threads,
    or nested in one, keep float32 and INFO until the last of them ends, which puts back the caller's float64 and
    unset level; a level the caller set is never changed."""
    from sequencer.engine.guest import console, float32_default

    logger = logging.getLogger("sequencer")
    seen, entered, release = [], threading.Barrier(2), threading.Event()

    def first():
        with float32_default(), console(progress=True):
            entered.wait()
            release.wait()

    thread = threading.Thread(target=first)
    thread.start()
    with float32_default(), console(progress=True):
        entered.wait()
        with float32_default():  # nested in this thread
            pass
        release.set()
        thread.join()  # the other call has ended; this one still runs
        seen.append((torch.get_default_dtype(), logger.level))
    seen.append((torch.get_default_dtype(), logger.level))
    logger.setLevel(logging.WARNING)
    try:
        with console(progress=True):
            seen.append(logger.level)
    finally:
        logger.setLevel(logging.NOTSET)
    assert seen == [(torch.float32, logging.INFO), (torch.float64, logging.NOTSET), logging.WARNING]


def test_calls_overlapping_in_two_threads_give_back_the_callers_random_state():
    """The generators are process-wide: two calls overlapping in two threads (the first ends while the second runs)
    leave ``random``, ``numpy`` and torch's generators as the caller had them, and a call nested in one gives back
    the state it found. Each call gave back the state it found: the second one found the first's draws and left the
    caller that state (torch's generator 16 draws on)."""
    from sequencer.engine.guest import caller_state_kept

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    callers = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first_drew, second_began, first_ended = threading.Event(), threading.Event(), threading.Event()

    def first():
        with caller_state_kept():
            torch.rand(16), np.random.rand(16), random.random()
            first_drew.set()
            second_began.wait()
        first_ended.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_drew.wait()
    with caller_state_kept():
        second_began.set()
        first_ended.wait()
        torch.rand(4)
        inside = torch.get_rng_state()
        with caller_state_kept():  # nested: its own draws are not seen after it
            torch.rand(4)
        assert torch.equal(torch.get_rng_state(), inside)
    thread.join()
    assert torch.equal(torch.get_rng_state(), callers[0])
    assert (np.random.get_state()[1] == callers[1]).all() and random.getstate() == callers[2]


class Waits(nn.Module):
    """A training-mode classifier with dropout and BatchNorm whose first forward in a thread named in ``waits``
    sets that thread's event and waits (at most a second) for the other's."""

    def __init__(self, waits: dict):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.drop, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Linear(8, 2)
        self.waits = waits

    def forward(self, x):
        mine = self.waits.pop(threading.current_thread().name, None)
        if mine is not None:
            mine[0].set()
            mine[1].wait(timeout=1.0)
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def test_two_threads_validating_one_module_get_the_evaluation_and_give_it_back_as_it_was():
    """Two ``validate`` calls given one caller module from two threads, the first to start ending first: each is
    the evaluation of the module alone, and the module comes back in training mode with its BatchNorm statistics.
    Overlapping, the first put training mode back under the second (dropout on, running statistics updated: loss
    0.494 against 0.641) and the second left the module in eval mode, which it had found."""
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    model = Waits({"first": (first_inside, second_inside), "second": (second_inside, first_done)}).train()
    data, results = Blobs(16, 1, pil=True), {}
    expected = sequencer.validate(model=Waits({}).train(), data=data, img_size=16, batch_size=4, workers=0,
                                  progress=False)
    statistics = model.bn.running_mean.clone()

    def validate(name):
        results[name] = sequencer.validate(model=model, data=data, img_size=16, batch_size=4, workers=0,
                                           progress=False)
        if name == "first":
            first_done.set()

    first = threading.Thread(target=validate, args=("first",), name="first")
    first.start()
    first_inside.wait(timeout=10)
    second = threading.Thread(target=validate, args=("second",), name="second")
    second.start()
    first.join(), second.join()
    assert [(r.loss, r.top1) for r in results.values()] == [(expected.loss, expected.top1)] * 2
    assert model.training and model.bn.training and torch.equal(model.bn.running_mean, statistics)


def test_a_quiet_call_inside_a_progress_call_prints_nothing(env, capfd):
    """``validate(progress=False)`` in the callback of a ``train(progress=True)`` (an extra metric per epoch) prints
    nothing: the training's own console handler showed the validation's lines (' * Acc@1 100.000 ...', 'model
    sequencer2d_nano ... images/s'), which printed only the training's."""
    model, data = caller_module(), (Blobs(8, 0, pil=True), Blobs(4, 1, pil=True))
    accuracies = []

    def callback(metrics):
        accuracies.append(sequencer.validate(model=model, data=data[1], img_size=16, workers=0, progress=False).top1)

    capfd.readouterr()
    sequencer.train(model=model, data=data, **QUICK, output=str(env["root"]), experiment=f"quiet-{next(RUNS)}",
                    callbacks=callback)
    out, err = capfd.readouterr()
    assert len(accuracies) == 1 and "epoch 0: train_loss" in out
    assert "Acc@1" not in out + err and "images/s" not in out + err


def test_a_training_callback_may_validate_the_module_in_threads_of_its_own():
    """A callback of ``train(model=module)`` evaluating the module on two datasets in a thread pool and waiting for
    them gets both evaluations (the training's own, 8 images, not among them), and the module trains on."""
    from concurrent.futures import ThreadPoolExecutor

    model, data, seen = caller_module(), (Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)), []

    def callback(metrics):
        pool = ThreadPoolExecutor(2)
        try:
            runs = [pool.submit(sequencer.validate, model=model, data=d, img_size=16, workers=0, progress=False)
                    for d in (Blobs(4, 1, pil=True), Blobs(6, 2, pil=True))]
            seen.extend(run.result(timeout=30).images for run in runs)
        finally:
            pool.shutdown(wait=False)  # a deadlocked pool: the callback's TimeoutError fails the test, no hang

    with tempfile.TemporaryDirectory() as output:
        run = sequencer.train(model=model, data=data, **QUICK, output=output, callbacks=callback, progress=False)
    assert seen == [4, 6] and not run.interrupted and model.training


def test_the_poly_schedules_cosine_note_is_dropped_in_the_block_only_and_timms_other_records_pass(caplog):
    from sequencer.engine.guest import poly_schedule_note_dropped

    timm_poly = logging.getLogger("timm.scheduler.poly_lr")
    note = "Cosine annealing scheduler will have no effect on the learning rate since t_initial = t_mul = eta_mul = 1."
    caplog.set_level(logging.WARNING)
    filters = list(timm_poly.filters)
    with poly_schedule_note_dropped():
        timm_poly.warning(note)
        timm_poly.warning("another of timm's notes")
        thread = threading.Thread(target=timm_poly.warning, args=(note + " (another thread)",))
        thread.start()
        thread.join()
    timm_poly.warning(note + " (after)")
    assert [r.getMessage() for r in caplog.records] == [
        "another of timm's notes", note + " (another thread)", note + " (after)"]
    assert timm_poly.filters == filters
