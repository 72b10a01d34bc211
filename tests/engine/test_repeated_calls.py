"""The library in a long-lived process (a notebook, a sweep, a service): what a call leaves behind after it ends,
also when it raises. A caller keeps an exception (a notebook's ``sys.last_value``, a sweep's list of failures),
and its traceback holds the call's frames: the data-loader worker processes of the call must have ended all the
same (test_guest_state.py checks the state one call leaves; this file what calls that fail leave)."""
from __future__ import annotations

import multiprocessing

import pytest
from torch import nn

import sequencer
from test_api_objects import Blobs, tiny_net

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


def test_a_validation_that_raises_mid_pass_leaves_no_worker_processes():
    before = set(multiprocessing.active_children())
    failure = kept_failure(lambda: sequencer.validate(model=FailsAtCall(RuntimeError, at=2), data=Blobs(16, 1),
                                                      progress=False, **WORKERS), RuntimeError)
    assert set(multiprocessing.active_children()) == before
    assert "middle of a pass" in str(failure)
