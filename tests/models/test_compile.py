"""torch.compile sees every registered model as one graph: no graph breaks, in eval and in train, on the CPU.

Before the recurrent layers became custom ops, dynamo broke the graph at every nn.LSTM/GRU/RNN and at the oneDNN
check (sequencer2d_nano: 20 breaks). Inputs are the smallest the patch sizes allow.

dynamo's tracing is Python-bound, about a second per block on this machine (sequencer2d_l: over a minute per
mode), which all registered models in both modes would take far past the CI budget. Blocks of a stage run the same
code, and widths change shapes, not code paths. So nano and Sequencer2D-S are traced whole, and every other
registered configuration (token mixer, union, directions, fc, RNN type, position embedding, patch sizes) is traced
in a model with one block per stage; the registered models differ from those only in depths and widths.
"""
import pytest
import torch

from sequencer.models import create_model, get_model_entry, list_models
from sequencer.models.kernels import recurrence


def smallest_input(name: str) -> int:
    reduction = 1
    for p in get_model_entry(name).kwargs.get("patch_sizes", (7, 2, 1, 1)):
        reduction *= p
    return reduction


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()  # every model traced afresh, never cut short by the recompile limit
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_break_count, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


def assert_no_graph_breaks(model: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    for train in (False, True):
        model.train(train)
        count, reasons = graph_breaks(model, x)
        assert count == 0, ("train" if train else "eval", reasons[:3])


WHOLE = ("sequencer2d_nano", "sequencer2d_s")  # traced whole below
SHAPE_ONLY = ("layers", "img_size", "embed_dims", "hidden_sizes", "mlp_ratios")  # change no code path


def one_block_per_stage_configs() -> dict[tuple, str]:
    """Each registered configuration, up to depths and widths -> the first model having it."""
    configs = {}
    for name in (*WHOLE, *list_models()):
        entry = get_model_entry(name)
        kwargs = {k: v for k, v in entry.kwargs.items() if k not in SHAPE_ONLY}
        configs.setdefault((entry.cls.__name__, repr(sorted(kwargs.items()))), name)
    return configs


def test_nano_has_no_graph_breaks(monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    assert_no_graph_breaks(create_model("sequencer2d_nano", img_size=16, drop_path_rate=0.1), 16)


@pytest.mark.slow
def test_sequencer2d_s_has_no_graph_breaks(monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    assert_no_graph_breaks(create_model("sequencer2d_s", img_size=28, drop_path_rate=0.1), 28)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(one_block_per_stage_configs().values()) - set(WHOLE)))
def test_every_registered_configuration_has_no_graph_breaks(name, monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch.manual_seed(0)
    stages = len(get_model_entry(name).kwargs.get("layers", (4, 3, 8, 3)))
    size = smallest_input(name)
    model = create_model(name, img_size=size, layers=(1,) * stages, drop_path_rate=0.1)
    assert_no_graph_breaks(model, size)


def test_compiled_native_layer_matches_eager():
    """The custom op dynamo meets under compile gives the module's output and gradients (backward recomputes)."""
    torch.manual_seed(0)
    layer = recurrence.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    compiled = torch.compile(lambda t: recurrence.run_rnn(layer, t, "native"), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    got = [out, x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    ref = layer(x)[0]
    ref.sum().backward()
    want = [ref, x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_native_rnn_op_passes_opcheck(mode):
    """Schema, autograd, fake implementation (strides included) and AOT dispatch of the op dynamo meets."""
    torch.manual_seed(0)
    layer = recurrence.RNN_TYPES[mode](6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.sequencer.rnn_native.default,
                          (x, list(layer._flat_weights), mode, 1, True, True, True))
