"""Under DDP every rank takes part in each collective of the run in the same order, whatever its own local state
(callbacks, files): a rank that skipped one while its peers entered it, or entered another, left both waiting in
gloo until its 30-minute timeout. The collectives are monkeypatched here; one process."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

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
        return [1.0, 0.0]  # rank 0's callback returned True; no rank's raised

    monkeypatch.setattr(dist_utils, "all_reduce_max", all_reduce_max)
    rank_1 = SimpleNamespace(info=dist_utils.DistInfo(True, 1, 1, 2), state=RunState(callbacks=[]))
    assert callbacks_ask_to_stop(rank_1, {"epoch": 0}) is True
    assert reduced == [[0.0, 0.0]]


def _as_rank_1_of_2(monkeypatch, rank_0_has):
    """Runs in this process as rank 1 of a 2-process group whose rank 0 found ``rank_0_has(what this rank found)``
    (`check_same_data`'s all-gather); any other collective fails (no group is made)."""
    monkeypatch.setattr(dist_utils, "init_distributed", lambda device=None: dist_utils.DistInfo(True, 1, 1, 2))
    monkeypatch.setattr(dist_utils, "all_gather_object", lambda found, info: [rank_0_has(found), found])


def test_ranks_that_read_different_training_data_stop_before_training(image_folder, tmp_path, monkeypatch):
    """Nodes without a shared filesystem read their own copies of the data: a copy with an image less cut the epoch
    into another number of batches on that rank, and the ranks hung at the epoch's end (rank 1's next all-reduce
    met rank 0's mean loss); every rank now refuses the run before it starts."""
    import sequencer
    from sequencer.errors import SequencerError

    _as_rank_1_of_2(monkeypatch, lambda found: (found[0] + 1, *found[1:]))
    with pytest.raises(SequencerError, match=r"^the processes read different data: 49 training images on rank 0, "
                                             r"48 on rank 1 \(hint: give every node the same copy of the data\)$"):
        sequencer.train(data=str(image_folder), model="sequencer2d_nano", output=str(tmp_path), progress=False,
                        device="cpu", workers=0, batch_size=8)
    assert list(tmp_path.iterdir()) == []


def test_ranks_that_read_different_segmentation_classes_stop_before_training(tmp_path, monkeypatch):
    """A class the other node's copy names otherwise labels the same pixels by another class there."""
    import sequencer
    from segmentation_helpers import make_voc
    from sequencer.errors import SequencerError

    voc = make_voc(tmp_path / "voc", n_train=4, n_val=1)
    _as_rank_1_of_2(monkeypatch, lambda found: (*found[:2], [*found[2][:-1], "heron"]))
    with pytest.raises(SequencerError, match=r"^the processes read different data: class 20 is 'heron' on "
                                             r"rank 0, 'tvmonitor' on rank 1 \(hint: "):
        sequencer.train_segmenter(data=voc, output=str(tmp_path / "out"), epochs=1, batch_size=2, device="cpu",
                                  workers=0, progress=False)
    assert not (tmp_path / "out").exists()
