"""Multi-node training on one machine: two processes that each are LOCAL_RANK 0 of their own "node" (as torchrun
--nnodes 2 --nproc_per_node 1 starts them), each in its own working directory with a relative output folder, so
that rank 1's "node" cannot see the files rank 0 writes (no shared filesystem)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from torch.distributed import TCPStore

import sequencer
from run_helpers import REPO, subprocess_env
from sequencer.models.loading import read_checkpoint

TINY = dict(model="sequencer2d_nano", model_kwargs=dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16),
                                                        hidden_sizes=(4, 4), mlp_ratios=(2, 2)),
            img_size=16, batch_size=8, workers=0, device="cpu", opt="adamw", lr=3e-3, warmup_epochs=0, hflip=0.0,
            experiment="mn", progress=False)

# one rank of the job: resume the run (rank 0's node holds it), while rank 1's node is stopped by SIGTERM during its
# first evaluation (a preempted machine: its torchrun agent signals its own workers only); the warnings each rank
# logged are kept
RANK = textwrap.dedent('''
    import json, logging, os, signal, sys
    import sequencer
    from sequencer.engine import evaluate as evaluate_module

    settings = json.loads(sys.argv[1])
    warned = logging.Handler(logging.WARNING)
    warned.messages, warned.emit = [], lambda record: warned.messages.append(record.getMessage())
    logging.getLogger("sequencer").addHandler(warned)
    if os.environ["RANK"] == "1":
        real, calls = evaluate_module.evaluate, []
        def evaluate(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        evaluate_module.evaluate = evaluate
    signal.signal(signal.SIGTERM, lambda *_: None)  # the caller's own handler: train returns the result
    run = sequencer.train(**settings)
    print(json.dumps(dict(summary=[r["epoch"] for r in run.summary], best_top1=run.best_top1,
                          best_epoch=run.best_epoch, checkpoint=str(run.checkpoint), exit_code=run.exit_code,
                          interrupted=run.interrupted, warnings=warned.messages)))
''')


@pytest.mark.slow
def test_two_nodes_without_a_shared_filesystem_resume_and_stop_together(image_folder, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    sequencer.train(data=str(image_folder), epochs=1, output=str(nodes[0] / "out"), **TINY)  # epoch 0, on node 0
    settings = json.dumps(dict(TINY, data=str(image_folder), epochs=3, output="out", resume="auto"))
    # the job's store, which torchrun's agent on the first node holds: bound here to a port the system picks (a port
    # found free and bound later by rank 0 could be taken in between on a busy machine)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = []
    for rank, node in enumerate(nodes):
        env = dict(subprocess_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                   TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, settings], cwd=node, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]  # a rank left waiting for its peer hangs: killed
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    # a note on the run is rank 0's alone (the 1-process checkpoint's RNG state: every rank reseeds), a rank's own
    # problem that rank's (rank 1 was the one signalled); each rank said the first
    warned = [result.pop("warnings") for result in results]
    assert any("RNG state missing" in w for w in warned[0]) and not any("received" in w for w in warned[0])
    assert warned[1] == ["received SIGTERM: stopping once epoch 1 is finished and saved in last.pth.tar (no recovery "
                         "checkpoint)"], warned
    # node 1 read the checkpoint rank 0 found (its own disk has none), the signal to node 1 stopped both after
    # epoch 1, and node 1's result is rank 0's (it cannot read rank 0's summary.csv)
    assert results[0] == results[1]
    assert results[0]["summary"] == [0, 1] and results[0]["interrupted"] and results[0]["exit_code"] == 143
    assert results[0]["best_epoch"] is not None and results[0]["best_top1"] is not None
    assert read_checkpoint(nodes[0] / "out" / "mn" / "last.pth.tar")["epoch"] == 1
    assert os.listdir(nodes[1]) == []  # only global rank 0 writes, not node 1's LOCAL_RANK 0


def test_distributed_train_sh_takes_torchrun_arguments_for_several_nodes(tmp_path):
    """TORCHRUN_ARGS replaces --standalone (one node) with this node's place in a multi-node job."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")  # prints the command line it was given
    python.chmod(0o755)

    def launched(**env):
        proc = subprocess.run(["bash", str(REPO / "distributed_train.sh"), "8", "/data", "--epochs", "3"],
                              env=dict(os.environ, PYTHON=str(python), **env), capture_output=True, text=True,
                              check=True)
        return proc.stdout.split()

    node = "--nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500"
    assert launched(TORCHRUN_ARGS=node) == ["-m", "sequencer.engine.distributed", *node.split(),
                                            "--nproc_per_node=8", "-m", "sequencer", "train", "/data", "--epochs", "3"]
    assert launched()[2:4] == ["--standalone", "--nproc_per_node=8"]


def test_every_rank_of_a_start_makes_its_group_under_the_same_prefix():
    """torchrun's TORCHELASTIC_RESTART_COUNT differs between nodes after one node's worker failed (its node counts
    a restart, the other node's agent restarts its healthy workers without counting), so the ranks of one start
    made their groups under different prefixes and never met. Each rank's own count of its starts agrees."""
    from torch.distributed import HashStore

    from sequencer.engine.distributed import start_prefix

    store = HashStore()  # torchrun's store outlives the starts
    first = [start_prefix(store, rank, 2) for rank in (0, 1)]
    restarted = [start_prefix(store, rank, 2) for rank in (1, 0)]  # whichever rank comes first
    grown = [start_prefix(store, rank, 3) for rank in (2, 0, 1)]  # an elastic job with another node
    assert len(set(first)) == len(set(restarted)) == len(set(grown)) == 1
    assert len({first[0], restarted[0], grown[0]}) == 3


def test_a_resume_path_is_rank_0s_file_only(tmp_path, monkeypatch):
    """`resume=PATH` names rank 0's file: a node without a shared filesystem gets the checkpoint from rank 0
    (`resume.read_on_every_rank`), so only rank 0 refuses a path it does not have. Another node's ranks stopped the
    job with "no such file" before joining the group (rank 0 then waited for them), as docs/training.md's
    "Resuming (`--resume auto` or `--resume PATH`)" says they do not (checked by hand with the two processes above)."""
    from sequencer.engine.config import RunState, TrainConfig
    from sequencer.engine.config_checks import check_config
    from sequencer.errors import SequencerError

    monkeypatch.chdir(tmp_path)  # a node whose out/ holds nothing
    cfg = TrainConfig(device="cpu", resume="out/mn/last.pth.tar")
    monkeypatch.setenv("RANK", "1")
    check_config(cfg, RunState())
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SequencerError, match=r"`resume='out/mn/last.pth.tar'`: no such file"):
        check_config(cfg, RunState())
