"""kernels.capture: what each capture or transform mode answers, asked from inside the forward it captures."""
import pytest
import torch

from sequencer.models.kernels import capture

# _Asks scales its input by a factor that encodes the answers (plain_eager, exporting): a captured program holds
# them as constants, so its output tells what was answered while it was captured
_FACTORS = {(True, False): 2.0, (False, True): 3.0, (False, False): 1.0}


class _Asks(torch.nn.Module):
    def forward(self, x):
        return x * (1 + capture.plain_eager()) * (1 + 2 * capture.exporting())


def _answered(output: torch.Tensor) -> tuple[bool, bool]:
    factors = {factor: answers for answers, factor in _FACTORS.items()}
    return factors[output.flatten()[0].item()]


def test_eager_is_plain_and_not_exporting():
    assert _answered(_Asks()(torch.ones(2))) == (True, False)
    assert not capture.functorch_active()


def test_torchscript_trace_and_onnx_count_as_exporting(tmp_path):
    traced = torch.jit.trace(_Asks(), torch.ones(2), check_trace=False)
    assert _answered(traced(torch.ones(2))) == (False, True)
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.onnx.export(_Asks(), (torch.ones(2),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert _answered(torch.from_numpy(session.run(None, {"x": torch.ones(2).numpy()})[0])) == (False, True)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_counts_as_exporting(strict):
    program = torch.export.export(_Asks(), (torch.ones(2),), strict=strict)
    assert _answered(program.module()(torch.ones(2))) == (False, True)


def test_torch_compile_is_neither_plain_nor_exporting():
    compiled = torch.compile(_Asks(), backend="eager", fullgraph=True)
    assert _answered(compiled(torch.ones(2))) == (False, False)


def test_torch_func_transforms_are_not_plain_eager():
    module = _Asks()
    assert _answered(torch.func.grad(lambda x: module(x).sum())(torch.ones(2))) == (False, False)
    assert _answered(torch.func.vmap(module)(torch.ones(3, 2))) == (False, False)
