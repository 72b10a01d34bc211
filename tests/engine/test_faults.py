"""Training under faults: SIGKILL mid-epoch, SIGTERM preemption, non-finite loss, full disk."""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from run_helpers import HELD_RUN, TINY_RUN, env_with_site, held_after_batch_3, start_train, summary_epochs, train_cli
from sequencer.models import create_model
from sequencer.models.loading import read_checkpoint



def wait_for(log: Path, text: str, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {text!r}:\n{log.read_text()[-3000:]}")


def assert_loads(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    model = create_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return ckpt


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_keeps_every_epoch_once(image_folder, tmp_path, capsys):
    args = [image_folder, *HELD_RUN, "--output", tmp_path, "--experiment", "run", "--epochs", "2"]
    log = tmp_path / "log.txt"
    proc = start_train(args, log, env_with_site(tmp_path, held_after_batch_3(epoch=1)))  # killed in epoch 1
    wait_for(log, "train: epoch 1 [   3/", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    folder = tmp_path / "run"
    assert assert_loads(folder / "last.pth.tar")["epoch"] == 0  # the previous checkpoint survived the kill
    assert summary_epochs(folder) == [0]

    capsys.readouterr()
    assert train_cli([*args, "--resume", "auto"]) == 0
    said = "".join(capsys.readouterr())
    # a run that started over would also leave epochs [0, 1]: the resume must name the file it went on from
    assert f"--resume auto: continuing from {folder / 'last.pth.tar'}" in said
    assert summary_epochs(folder) == [0, 1]
    ckpt = assert_loads(folder / "last.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["epoch_complete"]
    assert not list(folder.glob(".*tmp*"))


@pytest.mark.slow
def test_sigterm_saves_recovery_and_auto_resume_finishes(image_folder, tmp_path, capsys):
    args = [image_folder, *HELD_RUN, "--output", tmp_path, "--experiment", "run", "--epochs", "2"]
    log = tmp_path / "log.txt"
    proc = start_train(args, log, env_with_site(tmp_path, held_after_batch_3(epoch=0)))  # it lands after batch 3
    wait_for(log, "train: epoch 0 [   3/", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "recovery checkpoint" in text and "Traceback" not in text
    folder = tmp_path / "run"
    recovery = assert_loads(folder / "recovery.pth.tar")
    assert recovery["epoch"] == 0 and recovery["epoch_complete"] is False and recovery["step"] == 3
    assert recovery["optimizer"]["state"], "optimizer state must be saved"
    assert not (folder / "last.pth.tar").exists()

    capsys.readouterr()
    assert train_cli([*args, "--resume", "auto"]) == 0
    said = "".join(capsys.readouterr())
    assert f"--resume auto: continuing from {folder / 'recovery.pth.tar'}" in said
    assert "--resume: epoch 0 goes on after its first 3 of " in said
    assert summary_epochs(folder) == [0, 1]
    assert not (folder / "recovery.pth.tar").exists()  # superseded by the finished epochs
    assert assert_loads(folder / "last.pth.tar")["epoch"] == 1


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    from timm.loss import LabelSmoothingCrossEntropy
    real_forward = LabelSmoothingCrossEntropy.forward
    calls = []

    def forward(self, x, target):  # 6 steps per epoch: the loss diverges at epoch 1, step 2
        calls.append(1)
        loss = real_forward(self, x, target)
        return loss * float("nan") if len(calls) == 9 else loss

    monkeypatch.setattr(LabelSmoothingCrossEntropy, "forward", forward)
    args = [image_folder, *TINY_RUN, "--output", tmp_path, "--experiment", "nan", "--epochs", "3"]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "epoch 1 step 2" in err and "last good checkpoint" in err
    folder = tmp_path / "nan"
    assert summary_epochs(folder) == [0]
    assert assert_loads(folder / "last.pth.tar")["epoch"] == 0
    assert assert_loads(folder / "model_best.pth.tar")["epoch"] == 0


def test_a_rank_whose_own_loss_is_finite_does_not_call_it_not_finite(tmp_path, monkeypatch):
    """Under DDP every rank stops when any rank's loss is not finite (`loop.must_stop`, one all-reduce), and every
    rank's console shows its error: one whose own loss was finite said "loss is not finite (2.3)"."""
    from types import SimpleNamespace

    from sequencer.engine import distributed as dist_utils
    from sequencer.engine.loop import must_stop
    from sequencer.engine.stop_request import StopRequest
    from sequencer.errors import SequencerError

    run = SimpleNamespace(info=dist_utils.DistInfo(True, 0, 0, 2), out=SimpleNamespace(folder=tmp_path))
    monkeypatch.setattr(dist_utils, "all_reduce_max", lambda values, info: [values[0], 1.0])  # another rank's nan
    with pytest.raises(SequencerError, match=r"^loss is not finite \(on another process\) at epoch 1 step 2; "):
        must_stop(run, StopRequest(), 2.3, 1, 2)
    with pytest.raises(SequencerError, match=r"^loss is not finite \(nan\) at epoch 1 step 2; "):
        must_stop(run, StopRequest(), float("nan"), 1, 2)


def test_ranks_stop_by_the_all_reduced_signal_only(monkeypatch):
    """A stop is decided by the all-reduce alone. A signal that arrives while a rank waits in the collective is
    handled as it returns, after the rank sent 0: that rank once stopped on it while its peers, told 0, went on into
    DDP's backward, and both waited for each other until torchrun killed them, with no recovery checkpoint (a Ctrl-C
    under distributed_train.sh, seen in CI). It stops all ranks at the next step instead."""
    from sequencer.engine import distributed as dist_utils
    from sequencer.engine.stop_request import StopRequest

    info = dist_utils.DistInfo(True, 0, 0, 2)
    with StopRequest() as stop:
        def all_reduce_max(values, _info):  # the peers sent 0 too; SIGINT arrives during the wait
            os.kill(os.getpid(), signal.SIGINT)
            return list(values)

        monkeypatch.setattr(dist_utils, "all_reduce_max", all_reduce_max)
        assert stop.agreed(info) == 0 and stop.received == signal.SIGINT
        monkeypatch.setattr(dist_utils, "all_reduce_max", lambda values, _info: list(values))
        assert stop.agreed(info) == signal.SIGINT and stop.signum == signal.SIGINT


def test_huge_lr_diverges_with_a_clear_error(image_folder, tmp_path, capsys):
    rc = train_cli([image_folder, *TINY_RUN, "--opt", "sgd", "--lr", "1e30", "--output", tmp_path, "--epochs", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "epoch 0 step" in err and "Traceback" not in err


def test_full_disk_during_training_keeps_previous_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    saves = []

    def save(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) == 2:  # epoch 1's last.pth.tar
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    assert train_cli([image_folder, *TINY_RUN, "--output", tmp_path, "--experiment", "full", "--epochs", "3"]) == 2
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert "disk is full" in err and "last.pth.tar" in err
    folder = tmp_path / "full"
    assert assert_loads(folder / "last.pth.tar")["epoch"] == 0
    assert not [p for p in os.listdir(folder) if "tmp" in p]


def test_a_forked_data_worker_ignores_the_runs_stop_handler():
    """Ctrl-C reaches every process of the group, DataLoader workers included, which are forked while the run holds
    its handler: only the run's own process stops (and says so once); a worker neither flags a stop nor logs (the
    paper-run check printed "received SIGINT" five times, once per process: rank 0 and its four loader workers)."""
    import logging

    from sequencer.engine.stop_request import StopRequest

    with StopRequest() as stop:
        child = os.fork()
        if child == 0:  # the worker: count what the handler logs and whether it flagged a stop, as the exit status
            records = []
            handler = logging.Handler()
            handler.emit = records.append
            logging.getLogger("sequencer").addHandler(handler)
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(len(records) + 10 * bool(stop.received))
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.kill(os.getpid(), signal.SIGINT)  # the run's own process still stops
        assert stop.received == signal.SIGINT


def test_a_signal_during_evaluation_says_the_run_stops_once_the_epoch_is_saved(image_folder, tmp_path, monkeypatch,
                                                                              capsys):
    """SIGINT while epoch 0 is evaluated: the run finishes and saves the epoch, then stops with no recovery file.
    It used to say "stopping at the next step with a recovery checkpoint" there too."""
    from sequencer.engine import train as train_engine

    evaluate_epoch = train_engine.evaluate_epoch

    def signalled_evaluation(run):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate_epoch(run)

    monkeypatch.setattr(train_engine, "evaluate_epoch", signalled_evaluation)
    args = [image_folder, *TINY_RUN, "--output", tmp_path, "--experiment", "run", "--epochs", "2"]
    assert train_cli(args) == 128 + signal.SIGINT
    said = "".join(capsys.readouterr())
    assert ("received SIGINT: stopping once epoch 0 is finished and saved in last.pth.tar (no recovery checkpoint)"
            in said)
    assert "next step" not in said
    folder = tmp_path / "run"
    assert not (folder / "recovery.pth.tar").exists()
    assert assert_loads(folder / "last.pth.tar")["epoch"] == 0 and summary_epochs(folder) == [0]


def tiny_library_run(image_folder, tmp_path, **settings) -> dict:
    """`sequencer.train`'s settings of TINY_RUN's run (tiny model, 16 px, CPU, no workers)."""
    return dict(data=str(image_folder), model="sequencer2d_nano", img_size=16, batch_size=8, workers=0,
                device="cpu", opt="adamw", lr=3e-3, warmup_epochs=0, hflip=0.0, output=str(tmp_path),
                experiment="run", progress=False,
                model_kwargs=dict(layers=(1, 1), patch_sizes=(2, 1), embed_dims=(16, 16), hidden_sizes=(4, 4),
                                  mlp_ratios=(2, 2)), **settings)


def test_ctrl_c_during_the_last_epochs_evaluation_raises_that_the_run_is_finished(image_folder, tmp_path,
                                                                                 monkeypatch):
    """sequencer.train raised "training stopped by SIGINT; resume from ...", and that resume found nothing to do;
    the run has all its epochs: ``interrupted`` False, the exit status still 130 (a Ctrl-C ends a loop of runs)."""
    import sequencer
    from sequencer.engine import train as train_engine

    evaluate_epoch = train_engine.evaluate_epoch

    def signalled_evaluation(run):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate_epoch(run)

    monkeypatch.setattr(train_engine, "evaluate_epoch", signalled_evaluation)
    with pytest.raises(sequencer.TrainingInterrupted) as stopped:
        sequencer.train(**tiny_library_run(image_folder, tmp_path, epochs=1))
    folder = tmp_path / "run"
    assert str(stopped.value) == f"training stopped by SIGINT; the run had finished its epochs; checkpoints in {folder}"
    result = stopped.value.result
    assert not result.interrupted and result.exit_code == 128 + signal.SIGINT and len(result.summary) == 1


def test_a_signal_during_the_last_epochs_callbacks_stops_the_finished_run_as_it_says(image_folder, tmp_path, capsys,
                                                                                   caplog):
    """SIGINT while a callback takes the last epoch's row: it said "stopping at the next step with a recovery
    checkpoint", and the run ended with status 0 (the Ctrl-C swallowed, no recovery file). It says the epoch is
    saved, and the run stops by it once finished (exit 130, TrainingInterrupted)."""
    import logging
    import sequencer

    caplog.set_level(logging.INFO, logger="sequencer")
    with pytest.raises(sequencer.TrainingInterrupted) as stopped:
        sequencer.train(**tiny_library_run(image_folder, tmp_path, epochs=2),
                        callbacks=[lambda row: row["epoch"] == 1 and os.kill(os.getpid(), signal.SIGINT)])
    folder = tmp_path / "run"
    assert ("received SIGINT: stopping once epoch 1 is finished and saved in last.pth.tar (no recovery checkpoint)"
            in caplog.text) and "next step" not in caplog.text
    assert f"stopped by SIGINT after epoch 1, the run's last: the run is finished; checkpoints in {folder}" in caplog.text
    assert stopped.value.result.exit_code == 128 + signal.SIGINT and not stopped.value.result.interrupted
    assert summary_epochs(folder) == [0, 1] and not (folder / "recovery.pth.tar").exists()


def test_the_recovery_line_says_which_batches_a_resume_trains(image_folder, tmp_path, monkeypatch, caplog):
    """Ctrl-C as step 3 goes forward: "stopped ... at epoch 0 step 3" (steps count from 0) went on "(a resume goes
    on after batch 3 ...)", as if step 3 were trained; the resume trains it first."""
    import logging
    import sequencer
    from sequencer.engine import loop

    forward, forwards = loop._forward, []

    def forward_then_interrupt(run, *args):
        forwards.append(1)
        if len(forwards) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(run, *args)

    monkeypatch.setattr(loop, "_forward", forward_then_interrupt)
    caplog.set_level(logging.INFO, logger="sequencer")
    with pytest.raises(sequencer.TrainingInterrupted):
        sequencer.train(**tiny_library_run(image_folder, tmp_path, epochs=1))
    recovery = tmp_path / "run" / "recovery.pth.tar"
    assert (f"stopped by SIGINT at epoch 0 step 3; recovery checkpoint {recovery} (a resume goes on after the epoch's "
            f"first 3 batches: `resume={recovery}` or `resume=auto`)") in caplog.text
    assert read_checkpoint(recovery)["epoch_progress"]["batches"] == 3
