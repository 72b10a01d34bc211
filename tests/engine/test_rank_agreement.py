"""Under DDP every rank takes part in each collective of the run in the same order, whatever its own local state
(callbacks, files): a rank that skipped one while its peers entered it, or entered another, left both waiting in
gloo until its 30-minute timeout. The collectives are monkeypatched here; one process."""
from __future__ import annotations

from types import SimpleNamespace

from sequencer.engine import distributed as dist_utils
from sequencer.engine.config import RunState
from sequencer.engine.loop import callbacks_ask_to_stop


def test_a_rank_without_callbacks_still_takes_part_in_their_agreement(monkeypatch):
    """A script that passes its callbacks on rank 0 only (to log there): rank 1 skipped the agreement's all-reduce
    and went on to the next step's, of another size, while rank 0 waited in this one (measured with two gloo
    processes: both waited out the group's timeout). Rank 1 now joins it, and stops when rank 0's callback asks."""
    reduced = []

    def all_reduce_max(values, info):
        reduced.append(list(values))
        return [1.0]  # rank 0's callback returned True

    monkeypatch.setattr(dist_utils, "all_reduce_max", all_reduce_max)
    rank_1 = SimpleNamespace(info=dist_utils.DistInfo(True, 1, 1, 2), state=RunState(callbacks=[]))
    assert callbacks_ask_to_stop(rank_1, {"epoch": 0}) is True
    assert reduced == [[0.0]]
