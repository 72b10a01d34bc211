"""`sequencer train --torchcompile` and `validate --torchcompile` as a user runs them: inductor on the CPU, checked
against eager (the bf16 autocast run: aot_eager, see its docstring).

Inductor builds C++ kernels for the training graph (forward and backward) and for the evaluation graph: tens of
seconds of compiler time on 2 cores even for the shrunk nano, hence ``slow``. The recurrent layers reach inductor
as the custom ops of sequencer.models.kernels.recurrence; inductor asserts at run time that their outputs have the
strides their fake kernels promised, which is how the first backward step once crashed.
"""
from __future__ import annotations

import json

import pytest
import torch

from run_helpers import TINY_RUN, start_train, summary_rows, train_cli
from sequencer.cli import main
from sequencer.models.loading import read_checkpoint

# SGD, not AdamW: Adam divides by the gradients' running magnitude, which turns fp32 noise in near-zero gradients
# into weight changes of the size of the learning rate; SGD keeps compiled and eager weights within lr * noise.
# No stochastic depth: compiled graphs draw their random numbers differently. Everything else random (crops, flips,
# the data order) comes from --seed in the data pipeline, outside the model, and is the same in both runs.
SAME_RUN = [*TINY_RUN, "--opt", "sgd", "--lr", "0.2", "--drop-path", "0", "--seed", "0", "--epochs", "1"]


@pytest.mark.slow
def test_train_torchcompile_cli_trains_like_eager(image_folder, tmp_path, monkeypatch):
    """One epoch compiled (inductor, in a child process) and eager from one seed: both finish and write their
    checkpoints, with the same losses and weights to fp32 reordering (inductor fuses and reassociates). Then
    ``validate --torchcompile`` on the compiled run's checkpoint reproduces the loss and top-1 training logged."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no kernels of another version
    log = tmp_path / "compiled.log"
    child = start_train([image_folder, *SAME_RUN, "--output", tmp_path, "--experiment", "compiled",
                         "--torchcompile"], log)
    assert train_cli([image_folder, *SAME_RUN, "--output", tmp_path, "--experiment", "eager"]) == 0
    assert child.wait(timeout=600) == 0, log.read_text()[-3000:]

    compiled = read_checkpoint(tmp_path / "compiled" / "last.pth.tar")["state_dict"]
    eager = read_checkpoint(tmp_path / "eager" / "last.pth.tar")["state_dict"]
    assert compiled.keys() == eager.keys()  # the plain module's, not the compiled wrapper's (_orig_mod.)
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    (got,), (want,) = summary_rows(tmp_path / "compiled"), summary_rows(tmp_path / "eager")
    for key in ("train_loss", "eval_loss", "eval_top1"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-5), key

    results = tmp_path / "validate.json"
    assert main(["validate", str(image_folder), "--checkpoint", str(tmp_path / "compiled" / "last.pth.tar"),
                 "-b", "8", "-j", "0", "--device", "cpu", "--torchcompile", "--results-file", str(results)]) == 0
    validated = json.loads(results.read_text())
    assert validated["loss"] == pytest.approx(float(got["eval_loss"]), rel=1e-4, abs=1e-5)
    assert validated["top1"] == pytest.approx(float(got["eval_top1"]), abs=1e-3)


@pytest.mark.slow
def test_train_torchcompile_with_bf16_amp_trains_like_eager_bf16(image_folder, tmp_path):
    """`sequencer train --amp --amp-dtype bfloat16 --torchcompile` (once: "could not create a primitive descriptor
    for the LSTM forward propagation primitive", autocast not reaching the recurrent op) trains: one epoch compiled
    (in a child process) and eager from one seed log finite losses that agree to bf16 rounding (1e-2 relative).

    aot_eager: the graphs dynamo and AOT autograd make under the CLI's autocast, on eager's kernels (the recurrent
    op's among them); inductor's own code under bf16 autocast, for this very model (training steps, then an
    evaluation), is tests/models/test_compile.py's inductor bf16 test, and the CLI's inductor run the fp32 test above
    (on a CPU without bf16 kernels, where `--amp-dtype bfloat16` runs float32, this test was that one again). The
    recurrent op's dtype and gradients are checked exactly at the layer and model level in test_compile.py.
    """
    amp = ["--amp", "--amp-dtype", "bfloat16"]
    log = tmp_path / "compiled.log"
    child = start_train([image_folder, *SAME_RUN, *amp, "--output", tmp_path, "--experiment", "compiled",
                         "--torchcompile", "aot_eager"], log)
    assert train_cli([image_folder, *SAME_RUN, *amp, "--output", tmp_path, "--experiment", "eager"]) == 0
    assert child.wait(timeout=600) == 0, log.read_text()[-3000:]
    (got,), (want,) = summary_rows(tmp_path / "compiled"), summary_rows(tmp_path / "eager")
    for key in ("train_loss", "eval_loss"):
        assert torch.isfinite(torch.tensor(float(got[key]))), key
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-2), key
