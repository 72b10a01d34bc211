"""``torch.export`` of every configuration gives a program of ATen ops alone: it loads with ``torch.export.load``
in a process that never imports this package, and AOTInductor can compile it for C++. The package's custom ops
(``sequencer::rnn_native``, ``sequencer::onednn_lstm``, Triton's) are for ``torch.compile`` only."""
import subprocess
import sys

import pytest
import torch

from sequencer.models import create_model, get_model_entry

from test_compile import one_block_per_stage_configs, smallest_input

# nn.RNNBase refreshes its _flat_weights list in forward; torch.export warns about it, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .* were assigned during export")


@torch.no_grad()
def small(name: str, **kwargs) -> torch.nn.Module:
    """``name``'s configuration at one block per stage, with weights that reach the logits (the head is zero)."""
    stages = len(get_model_entry(name).kwargs.get("layers", (4, 3, 8, 3)))
    model = create_model(name, num_classes=5, img_size=smallest_input(name), layers=(1,) * stages, **kwargs)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.05)
    return model.eval()


def foreign_ops(program) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace != "aten"}


@pytest.mark.parametrize("name", sorted(set(one_block_per_stage_configs().values())))
def test_every_configuration_exports_to_aten_ops_with_eager_logits(name):
    model = small(name)
    x = torch.randn(2, 3, smallest_input(name), smallest_input(name))
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = model(x)
    assert not foreign_ops(program)
    assert torch.allclose(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0


@pytest.mark.parametrize("backend", ["native", "cpu", "triton"])
def test_every_lstm_backend_exports_the_same_aten_program(backend, monkeypatch):
    """"triton" (on a CPU, where it raises in eager) and "cpu" (BiLSTM2D's own CPU kernel) export as ATen's LSTM."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reference = small("sequencer2d_nano", lstm_backend="native")
    model = small("sequencer2d_nano", lstm_backend=backend)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = reference(x)
    assert not foreign_ops(program)
    assert any(str(n.target) == "aten.lstm.input" for n in program.graph.nodes)
    assert torch.allclose(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_a_saved_program_runs_where_the_package_was_never_imported(tmp_path):
    """(A dynamic batch is checked through `sequencer export --dynamic-batch`, tests/tools/test_export.py.)"""
    model = small("sequencer2d_nano")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (x,)), tmp_path / "nano.pt2")
        expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; p = sys.argv[1]; out = torch.export.load(p + '/nano.pt2').module()("
              "torch.load(p + '/x.pt', weights_only=True)); assert 'sequencer' not in sys.modules; "
              "torch.save(out, p + '/y.pt')")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), expected, rtol=1e-5, atol=1e-5)
