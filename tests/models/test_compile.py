"""torch.compile sees every registered model as one graph: no graph breaks, in eval and in train, on the CPU.

Before the recurrent layers became custom ops, dynamo broke the graph at every nn.LSTM/GRU/RNN and at the oneDNN
check (sequencer2d_nano: 20 breaks). Inputs are the smallest the model's patch sizes allow; dynamo's work is
tracing, which does not depend on the input size.
"""
import pytest
import torch

from sequencer.models import create_model, get_model_entry, list_models
from sequencer.models.kernels import recurrence


def smallest_input(name: str) -> int:
    entry = get_model_entry(name)
    reduction = 1
    for p in entry.kwargs.get("patch_sizes", (7, 2, 1, 1)):
        reduction *= p
    return reduction


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()  # every model traced afresh, never cut short by the recompile limit
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_break_count, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_no_graph_breaks(name, monkeypatch):
    monkeypatch.delenv(recurrence.BACKEND_ENV, raising=False)
    torch.manual_seed(0)
    size = smallest_input(name)
    model = create_model(name, img_size=size)
    x = torch.randn(2, 3, size, size)
    for train in (False, True):
        model.train(train)
        count, reasons = graph_breaks(model, x)
        assert count == 0, (train, reasons[:3])


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
