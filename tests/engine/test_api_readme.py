"""The README's notebook example runs exactly as written: a user's own nn.Module trained on their own Datasets with
a callback, then validated as the module in memory."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "tests/engine/test_api_readme.py"


def readme_example() -> str:
    """The first ```python block after the paragraph that names this test."""
    text = README.read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    namespace = {"__name__": "readme_example"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        exec(compile(readme_example(), str(README), "exec"), namespace)
    return folder, namespace


def test_the_callback_saw_every_epoch_as_numbers_and_stopped_the_run(example):
    _, ns = example
    history, run = ns["history"], ns["run"]
    assert [m["epoch"] for m in history] == list(range(len(history)))
    assert all(type(v) in (int, float) for m in history for v in m.values())
    stopped = [m["eval_top1"] == 100.0 for m in history]
    assert not any(stopped[:-1])  # True stops right after the epoch that returned it, not before
    assert len(history) == 6 or stopped[-1]
    assert [r["epoch"] for r in run.summary] == [m["epoch"] for m in history]
    assert run.summary[-1]["eval_top1"] == pytest.approx(history[-1]["eval_top1"], abs=1e-4)
    assert not run.interrupted and run.exit_code == 0


def test_the_module_was_trained_in_place_and_validates_as_its_last_epoch(example):
    _, ns = example
    result, history = ns["result"], ns["history"]
    assert result.images == 64 and result["top1"] == result.top1
    assert result.top1 == pytest.approx(history[-1]["eval_top1"], abs=1e-3)
    assert result.top1 > 90  # the stripes are learnt: the example shows something that works


def test_the_checkpoint_holds_the_state_dict_and_says_the_architecture_is_not_recorded(example):
    import torch

    import sequencer
    from sequencer.models.loading import read_checkpoint
    folder, ns = example
    ckpt = read_checkpoint(folder / "runs" / "stripes" / "last.pth.tar")
    assert ckpt["arch"] is None and "not recorded" in ckpt["architecture"]
    assert ckpt["class_names"] == ["horizontal", "vertical"]
    assert ckpt["state_dict"].keys() == ns["net"].state_dict().keys()
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in ns["net"].state_dict().items())
    with pytest.raises(sequencer.SequencerError, match="architecture is not recorded"):
        sequencer.validate(folder / "runs" / "stripes" / "last.pth.tar", progress=False)
