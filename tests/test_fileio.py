"""sequencer.fileio: atomic outputs get the mode a plain open() gives, and a killed write's temporary is cleared."""
import argparse
import os
import stat
from pathlib import Path

import pytest

from sequencer.engine import distributed
from sequencer.engine.checkpoint import atomic_link_or_copy
from sequencer.engine.config import RunState
from sequencer.engine.outputs import make_output_dir as _make_output_dir
from sequencer.fileio import STALE_TEMP_GLOB, current_umask, remove_stale_temporaries, write_atomically


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_output_mode_follows_the_umask_like_open(tmp_path, umask_027):
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    write_atomically(tmp_path / "atomic.txt", lambda tmp: Path(tmp).write_text("x"))
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o640
    os.umask(0o002)
    write_atomically(tmp_path / "shared.txt", lambda tmp: Path(tmp).write_text("x"))
    assert _mode(tmp_path / "shared.txt") == 0o664
    atomic_link_or_copy(tmp_path / "shared.txt", tmp_path / "linked.txt")
    assert _mode(tmp_path / "linked.txt") == 0o664


def test_current_umask_reads_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_the_writer_names_its_temporaries_as_the_cleanup_looks_for_them(tmp_path):
    seen = []

    def killed_mid_write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt  # stands in for a kill; a real kill leaves the file behind

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "last.pth.tar", killed_mid_write)
    assert seen[0].parent == tmp_path and not seen[0].exists()  # an interrupt is cleaned up at once
    seen[0].write_bytes(b"half")  # recreate what a SIGKILL, which nothing can clean up at once, leaves
    assert list(tmp_path.glob(STALE_TEMP_GLOB)) == [seen[0]]
    (tmp_path / "keep.csv").write_text("epoch\n")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]


def test_resuming_an_experiment_clears_a_killed_runs_temporary(tmp_path):
    folder = tmp_path / "out" / "exp"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text("epoch\n")
    stale = folder / ".last.pth.tar.k3x9_q.tmp"  # the name write_atomically gives (mkstemp's random part)
    stale.write_bytes(b"\0" * 1024)
    cfg = argparse.Namespace(output=str(tmp_path / "out"), experiment="exp", resume="auto")
    assert _make_output_dir(cfg, RunState(), distributed.DistInfo(), "sequencer2d_nano", 32) == folder
    assert not stale.exists() and (folder / "summary.csv").exists()


def _replaced_by_rename(path: Path, write) -> None:
    """``write()`` replaces ``path`` by a rename (a new inode, complete or absent), not by rewriting it in place."""
    path.write_text("previous results\n")
    before = os.stat(path).st_ino
    write()
    assert os.stat(path).st_ino != before and path.read_text() != "previous results\n"
    assert not list(path.parent.glob(STALE_TEMP_GLOB))


def test_validate_results_file_is_written_atomically(tmp_path):
    from sequencer.commands.validate import write_results
    results = {"model": "m", "top1": 50.0}
    _replaced_by_rename(tmp_path / "r.json", lambda: write_results(str(tmp_path / "r.json"), results))
    _replaced_by_rename(tmp_path / "r.csv", lambda: write_results(str(tmp_path / "r.csv"), results))
    assert (tmp_path / "r.csv").read_text().splitlines() == ["model,top1", "m,50.0"]


def test_benchmark_results_file_is_written_atomically(tmp_path, monkeypatch):
    import json

    from sequencer.commands import benchmark
    from sequencer.tools import benchmark as measuring
    report = {"results": [{"impl": "ours", "ms": 1.0}]}
    # the measuring is tested elsewhere; the command imports it inside its run
    monkeypatch.setattr(measuring, "run_benchmark", lambda args: report)
    monkeypatch.setattr(benchmark, "format_results", lambda r: "")
    path = tmp_path / "b.json"
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    _replaced_by_rename(path, lambda: benchmark.run(parser.parse_args(["--results-file", str(path)])))
    assert json.loads(path.read_text()) == report
