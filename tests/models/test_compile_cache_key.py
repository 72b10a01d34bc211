"""Compiled graphs are keyed on this package's kernel code (:mod:`sequencer.models.kernels.code_key`): inductor's
on-disk caches (FX graph, AOTAutograd) know nothing of a custom op's fake, autograd or autocast kernels, so every
op call carries a fingerprint of the kernel sources into the graphs, forward and backward."""
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import sequencer
from sequencer.models.kernels import onednn_lstm, recurrence
from sequencer.models.kernels.code_key import KERNEL_CODE, source_fingerprint


def traced_graphs(step, *args) -> dict[str, list[torch.fx.GraphModule]]:
    """The graphs ``torch.compile`` makes of ``step``: dynamo's (the AOTAutograd cache's key) and AOTAutograd's
    forward and backward (the FX graph cache's keys), run without inductor."""
    graphs = {"dynamo": [], "forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler
    aot = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)
    torch._dynamo.reset()
    step_compiled = torch.compile(step, backend=backend)
    step_compiled(*args)
    return graphs


def sequencer_op_calls(graphs: list[torch.fx.GraphModule]) -> list[torch.fx.Node]:
    return [node for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("sequencer.")]


def gru_autocast_step(gru, x):
    """A CPU GRU under bf16 autocast (``rnn_native``, whose autocast kernel runs below dynamo's graph)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = recurrence.run_rnn(gru, x, "native")
    y.float().square().sum().backward()


def lstm_training_step(lstm, x):
    """A single-layer CPU LSTM in fp32 training (``onednn_lstm`` where oneDNN trains, else ``rnn_native``)."""
    recurrence.run_rnn(lstm, x, "native").square().sum().backward()


@pytest.mark.parametrize("layer, step, ops", [
    ("gru", gru_autocast_step, {"rnn_native", "rnn_native_backward"}),
    ("lstm", lstm_training_step, {"onednn_lstm", "onednn_lstm_backward"}),
])
def test_every_op_call_of_every_graph_carries_the_kernel_code(layer, step, ops):
    if layer == "lstm" and not onednn_lstm.trains_in(torch.float32):
        ops = {"rnn_native", "rnn_native_backward"}
    torch.manual_seed(0)
    module = recurrence.RNN_TYPES[layer](6, 5, batch_first=True, bidirectional=True)
    graphs = traced_graphs(partial(step, module), torch.randn(3, 4, 6))
    for kind in ("dynamo", "forward", "backward"):
        calls = sequencer_op_calls(graphs[kind])
        names = {str(call.target).split(".")[1] for call in calls}
        assert names and names <= ops, (kind, names)
        assert all(KERNEL_CODE in call.args for call in calls), kind
    traced = sequencer_op_calls(graphs["forward"] + graphs["backward"])
    assert {str(call.target).split(".")[1] for call in traced} == ops


def test_the_kernel_code_fingerprint_changes_with_any_source_and_only_with_it(tmp_path, monkeypatch):
    package = tmp_path / "fingerprinted"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("def rule(mode):\n    return None\n")
    (package / "notes.txt").write_text("not code")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_fingerprint("fingerprinted")
    assert source_fingerprint("fingerprinted") == before and len(before) == 16
    (package / "notes.txt").write_text("other notes")
    assert source_fingerprint("fingerprinted") == before
    (package / "ops.py").write_text("def rule(mode):\n    return 'float32'\n")
    assert source_fingerprint("fingerprinted") != before
    assert KERNEL_CODE == source_fingerprint("sequencer.models.kernels")


PROBE = """
import json, torch
from torch._dynamo.utils import counters
from sequencer.models.kernels import recurrence
torch.manual_seed(0)
gru = recurrence.GRU(8, 6, batch_first=True, bidirectional=True)
x = torch.randn(3, 5, 8)
def forward(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return recurrence.run_rnn(gru, x, "native")
with torch.no_grad():
    loss = torch.compile(forward, backend="inductor")(x).float().square().sum().item()
    float32_loss = gru(x)[0].square().sum().item()
print(json.dumps({"loss": loss, "float32_loss": float32_loss, "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
                  "aot_hits": counters["aot_autograd"]["autograd_cache_hit"]}))
"""


def compiled_probe(source_root: Path, cache_dir: Path) -> dict:
    """The probe's compiled GRU step in a new process, importing ``sequencer`` from ``source_root``."""
    env = dict(os.environ, PYTHONPATH=str(source_root), TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_edited_kernel_recompiles_and_an_unchanged_one_reuses_the_cache(tmp_path):
    """Two processes sharing an inductor cache: the second reuses the first's graph. A copy of the package whose
    autocast rule for a CPU GRU differs (cast the layer to float32 rather than running its steps in bf16, below
    dynamo's graph) must not: before the fingerprint it was served the first's graph and numbers. (Inference: one
    graph to compile; the graphs of training are checked above. The graph is the recurrent op alone, the loss taken
    outside it: inductor then compiles no C++ kernel, a quarter of the cold compile's time, and the caches key and
    serve the graph as any other.)"""
    installed_root = Path(sequencer.__file__).resolve().parent.parent
    edited_root = tmp_path / "edited"
    shutil.copytree(installed_root / "sequencer", edited_root / "sequencer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    rule = edited_root / "sequencer" / "models" / "kernels" / "recurrence.py"
    source = rule.read_text()
    assert source.count('    if mode == "gru":\n        return None\n') == 1
    rule.write_text(source.replace('    if mode == "gru":\n        return None\n',
                                   '    if mode == "gru":\n        return torch.float32\n'))
    cache = tmp_path / "inductor-cache"
    first = compiled_probe(installed_root, cache)
    again = compiled_probe(installed_root, cache)
    edited = compiled_probe(edited_root, cache)
    assert first["aot_hits"] == 0 and again["aot_hits"] >= 1 and again["loss"] == first["loss"]
    assert edited["aot_hits"] == 0 and edited["fx_hits"] == 0
    # the edit's numbers (float32's), not the cache's (bf16 steps)
    assert edited["loss"] == pytest.approx(edited["float32_loss"], rel=1e-5)
    assert first["loss"] != pytest.approx(first["float32_loss"], rel=1e-5)
