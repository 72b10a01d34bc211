"""The library in a long-lived process (a notebook, a sweep, a service), called again and again (test_guest_state.py
checks the state one call leaves). A caller keeps an exception (a notebook's ``sys.last_value``, a sweep's list of
failures), and its traceback holds the call's frames: the data-loader worker processes of the call must have ended
all the same. A second call gives the first one's numbers, and a compiled one reuses the first one's graph."""
from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sequencer
from sequencer.models.loading import read_checkpoint
from segmentation_helpers import make_voc
from test_api_objects import Blobs, tiny_net
from test_guest_state import TINY_BACKBONE, TINY_SEGMENT, caller_segmenter

WORKERS = dict(workers=2, batch_size=4, device="cpu")


class FailsAtCall(nn.Module):
    """``net``, raising ``error`` on its ``at``-th forward (a bad batch, an out-of-memory error, Ctrl-C in the middle of
    a step)."""

    def __init__(self, error: type[BaseException], at: int):
        super().__init__()
        self.net, self.error, self.at, self.calls = tiny_net(), error, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("failed in the middle of a pass")
        return self.net(x)


def kept_failure(call, error: type[BaseException]) -> BaseException:
    """Run ``call``, which raises ``error``; the exception, kept with its traceback as a notebook keeps it."""
    with pytest.raises(error) as raised:
        call()
    assert raised.value.__traceback__ is not None
    return raised.value


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_training_that_raises_mid_epoch_leaves_no_worker_processes(error, tmp_path):
    before = set(multiprocessing.active_children())
    failures = [kept_failure(lambda: sequencer.train(model=FailsAtCall(error, at=2), data=(Blobs(16, 0), Blobs(8, 1)),
                                                     epochs=1, output=str(tmp_path), experiment=f"run{i}",
                                                     progress=False, **WORKERS), error)
                for i in range(2)]
    assert len(failures) == 2
    assert set(multiprocessing.active_children()) == before



def test_a_segmenter_training_a_callback_interrupts_leaves_no_worker_processes(tmp_path):
    """A callback raising KeyboardInterrupt after the first of two epochs: the training and held-out loaders' workers
    are alive then (they persist across epochs), and end with the call."""
    voc = make_voc(tmp_path / "voc", n_train=4, n_val=2)

    def interrupt(metrics):
        raise KeyboardInterrupt

    settings = dict(TINY_SEGMENT, epochs=2, workers=2)
    before = set(multiprocessing.active_children())
    kept_failure(lambda: sequencer.train_segmenter(voc, **settings, backbone_kwargs=TINY_BACKBONE, callbacks=[interrupt],
                                                   output=str(tmp_path), progress=False), KeyboardInterrupt)
    assert set(multiprocessing.active_children()) == before


class SegmenterFailsAtCall(FailsAtCall):
    """A tiny segmenter (``num_classes`` 3) raising ``error`` on its ``at``-th forward."""

    def __init__(self, error: type[BaseException], at: int):
        super().__init__(error, at)
        self.net, self.num_classes = caller_segmenter().eval(), 3


@pytest.mark.parametrize("entry", ["validate", "validate_segmenter"])
def test_a_validation_that_raises_mid_pass_leaves_no_worker_processes(entry, tmp_path):
    if entry == "validate":
        call = lambda: sequencer.validate(model=FailsAtCall(RuntimeError, at=2), data=Blobs(16, 1),  # noqa: E731
                                          progress=False, **WORKERS)
    else:
        voc = make_voc(tmp_path / "voc", n_train=1, n_val=4)
        call = lambda: sequencer.validate_segmenter(data=voc, model=SegmenterFailsAtCall(RuntimeError, at=2),  # noqa: E731
                                                    eval_size=32, workers=2, device="cpu")
    before = set(multiprocessing.active_children())
    failure = kept_failure(call, RuntimeError)
    assert set(multiprocessing.active_children()) == before
    assert "middle of a pass" in str(failure)


def test_the_same_run_twice_in_one_process_trains_the_same_weights(tmp_path):
    """Nothing of a run carries into the next (a dataset, a random generator, an EMA or a schedule): the same settings
    run again in the same process, after the caller's own random draws, give the same losses and weights, the
    data-loader workers' augmentation and the EMA included."""
    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # the caller's random state differs between the calls
        runs.append(sequencer.train(model="sequencer2d_nano", img_size=16, epochs=1, warmup_epochs=0, model_ema=True,
                                    data=(Blobs(8, 0, pil=True), Blobs(4, 1, pil=True)), output=str(tmp_path),
                                    experiment=f"run{i}", progress=False, **WORKERS))
    first, second = ([{k: v for k, v in row.items() if k != "epoch_seconds"} for row in run.summary] for run in runs)
    assert first == second and len(first) == 1
    weights = [read_checkpoint(run.output_dir / "last.pth.tar") for run in runs]
    for key in ("state_dict", "state_dict_ema"):
        assert weights[0][key].keys() == weights[1][key].keys()
        assert all(torch.equal(weights[0][key][name], weights[1][key][name]) for name in weights[0][key])


def test_validating_new_modules_compiled_reuses_the_compiled_graph():
    """``validate(model=..., torchcompile=...)`` of one module after another (checkpoints of a sweep) compiles once:
    a call that recompiled would reach dynamo's recompile limit (8) and run the later ones eagerly."""
    def validate_a_new_module(seed: int):
        torch.manual_seed(seed)
        model = sequencer.create_model("sequencer2d_nano", num_classes=2, img_size=16)
        return sequencer.validate(model=model, data=Blobs(4, 1, pil=True), batch_size=4, workers=0,
                                  torchcompile="eager", progress=False)

    validate_a_new_module(0)
    compiled = dict(counters["frames"])
    validate_a_new_module(1)
    assert dict(counters["frames"]) == compiled
