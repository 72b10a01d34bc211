"""The one autocast rule (engine/amp.py) that training, validation, the eval loop and the benchmark share."""
import logging
from types import SimpleNamespace

import pytest
import torch

from sequencer.engine.amp import autocast_dtype
from sequencer.errors import SequencerError


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


@pytest.mark.parametrize("requested, device, expected", [
    (None, "cpu", None), ("float32", "cpu", None), (torch.float32, "cpu", None),
    ("auto", "cpu", torch.bfloat16), ("bfloat16", "cpu", torch.bfloat16), (torch.bfloat16, "cpu", torch.bfloat16),
    ("float16", "cpu", torch.bfloat16), (torch.float16, "cpu", torch.bfloat16),
    ("auto", "cuda", torch.float16), ("float16", "cuda", torch.float16), ("bfloat16", "cuda", torch.bfloat16),
])
def test_the_rule(native_bf16, requested, device, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="sequencer"):
        assert autocast_dtype(requested, device) == expected
        assert autocast_dtype(expected, device) == expected  # a fixed point, passed back in ...
    notes = [r.getMessage() for r in caplog.records]
    float16_off_cuda = requested in ("float16", torch.float16) and device == "cpu"
    assert notes == (["note: `amp_dtype=float16`: float16 autocast needs CUDA; running bfloat16 on cpu"]
                     if float16_off_cuda else [])  # ... without a second note


def test_bfloat16_without_native_kernels_runs_float32_with_a_note(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sequencer"):
        assert autocast_dtype("bfloat16", "cpu", parameter="dtype") is None
        assert autocast_dtype("float16", "cpu") is None
        assert autocast_dtype("bfloat16", "cuda") == torch.bfloat16  # the CPU's kernels say nothing about a GPU
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "`dtype=bfloat16`: this CPU has no native bf16 kernels" in messages[0]


def test_an_unknown_name_is_refused():
    with pytest.raises(SequencerError, match="`amp_dtype=half`: unknown dtype"):
        autocast_dtype("half", "cpu")


def test_evaluate_takes_the_rule(native_bf16, monkeypatch):
    """The eval loop resolves its amp_dtype by the rule: "float16" on the CPU autocasts to bfloat16."""
    from sequencer.engine import evaluate as evaluate_module
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return x.flatten(1)

    loader = [(torch.randn(2, 3, 1, 1), torch.tensor([0, 1]))]
    evaluate_module.evaluate(Probe(), loader, "cpu", amp_dtype="float16")
    evaluate_module.evaluate(Probe(), loader, "cpu", amp_dtype=None)
    assert seen == [torch.bfloat16, None]


def test_runs_say_the_rules_notes_once_under_ddp(native_bf16, caplog):
    """The notes go where the caller asks: train and segment train hold them with their start warnings (RunState.amp_notes), which rank 0
    alone says; validate logs them on rank 0 only. Every rank of a DDP run logged them (8 copies on 8 ranks)."""
    from sequencer.engine.distributed import DistInfo
    from sequencer.engine.train import amp_setup
    from sequencer.engine.validation import _amp_dtype

    notes = []
    with caplog.at_level(logging.WARNING, logger="sequencer"):
        dtype, _ = amp_setup(SimpleNamespace(amp=True, amp_dtype="float16"), torch.device("cpu"), notes)
        assert [_amp_dtype(True, "float16", DistInfo(True, rank, rank, 2)) for rank in (0, 1)] == [dtype] * 2
    assert dtype == torch.bfloat16
    assert notes == ["`amp_dtype=float16`: float16 autocast needs CUDA; running bfloat16 on cpu"]
    assert [r.getMessage() for r in caplog.records] == [f"note: {notes[0]}"]  # validate's, from rank 0 alone


def test_the_no_native_bf16_note_goes_to_the_callers_notes(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    notes = []
    with caplog.at_level(logging.WARNING, logger="sequencer"):
        assert autocast_dtype("bfloat16", "cpu", notes=notes) is None
    assert not caplog.records and len(notes) == 1 and "no native bf16 kernels" in notes[0]


def test_train_and_validate_say_the_float16_note_alike(tmp_path, capsys, monkeypatch):
    """`--amp --amp-dtype float16` on the CPU: train and validate say the rule's note in the same line. train said it
    as "warning: ..." (a Python warning, with its start warnings), validate as "note: ...". The CPU's own bf16
    kernels run (a CPU without them, as the AVX2-only floor run, adds the float32 note: not faked, since oneDNN
    then refuses bf16 matmuls)."""
    import numpy as np
    from PIL import Image

    from sequencer.cli import main
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    amp = ["--amp", "--amp-dtype", "float16", "-j", "0", "--device", "cpu"]
    assert main(["train", "data", "--model", "sequencer2d_nano", "--model-kwargs", "layers=(1,1)",
                 "patch_sizes=(2,1)", "embed_dims=(16,16)", "hidden_sizes=(4,4)", "mlp_ratios=(2,2)", "--img-size",
                 "16", "-b", "2", "--epochs", "1", "--warmup-epochs", "0", "--output", "out", "--experiment", "e",
                 *amp]) == 0
    said_by_train = [line for line in capsys.readouterr().err.splitlines() if "float16" in line]
    assert main(["validate", "data", "--checkpoint", "out/e/last.pth.tar", *amp]) == 0
    said_by_validate = [line for line in capsys.readouterr().err.splitlines() if "float16" in line]
    assert said_by_train == said_by_validate
    assert said_by_train[0] == "note: --amp-dtype float16: float16 autocast needs CUDA; running bfloat16 on cpu"
    assert len(said_by_train) == (1 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 2)
