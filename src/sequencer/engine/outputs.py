"""The files of a training run: the experiment folder, ``args.yaml``, ``summary.csv`` and ``summary.png``.

Everything is written atomically; a start that fails before its first write removes the folders it created.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from ..errors import SequencerError
from ..fileio import remove_stale_temporaries, temp_path, write_atomically
from . import distributed as dist_utils
from .amp import say_notes
from .checkpoint import LAST, RECOVERY, CheckpointManager
from .guest import warn
from .resume import experiment_folder
from .user_data import module_name

VAL_FILES = "val_files.txt"  # the held-out files --val-fraction carved, one key per line (sequencer.data.splits)
SUMMARY_FIELDS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "epoch_seconds"]


@dataclass
class Outputs:
    """The experiment folder, the checkpoint manager that writes into it and the summary rows so far."""
    folder: Path
    manager: CheckpointManager
    rows: list[dict]
    resumed_rows: int = 0  # how many of ``rows`` earlier invocations wrote (a resume)

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.csv"

    def run_seconds(self, started: float) -> float:
        """The whole run's time for its finish line: the epochs of earlier invocations (resumed) plus this one's
        since ``started``."""
        return sum(float(r.get("epoch_seconds") or 0) for r in self.rows[:self.resumed_rows]) + time.time() - started


def prepare_outputs(cfg, state, info: dist_utils.DistInfo, resume_path: str | None, resume_ckpt: dict | None,
                    start_epoch: int, img_size: int, held_out=None, evaluated: bool = True,
                    evaluation_change: tuple[str, str] | None = None) -> Outputs:
    """Create the experiment folder (nothing is written before this point), take over the resumed run's best
    checkpoints and summary rows when it continues in the same folder, and write ``args.yaml`` (and
    ``val_files.txt``, the files of a held-out split carved by --val-fraction). Without evaluation (``evaluated``
    False) the checkpoint history keeps the latest epochs and no epoch is called best. ``evaluation_change``
    (``resume.evaluation_change``, ``segmentation_eval.resumed_evaluation_change``): the resumed epochs were
    evaluated otherwise, so the best is picked again."""
    module = getattr(state, "module", None)  # a caller's nn.Module (sequencer.train(model=...)) has no model name
    folder = make_output_dir(cfg, state, info, cfg.model or module_name(module), img_size,
                             resumed=resume_ckpt is not None)
    manager = CheckpointManager(folder, max_history=cfg.checkpoint_hist, decreasing=cfg.eval_metric == "loss",
                                by_epoch=not evaluated)
    if resume_ckpt is not None and Path(resume_path).resolve().parent == folder.resolve():
        # best metric and history belong to this folder's files; a resume into a new folder starts its own
        manager.restore(resume_ckpt)
        manager.history = [(e, m) for e, m in manager.history if e < start_epoch]
        abandoned = manager.best_of_the_epochs_kept(Path(resume_path)) if info.is_primary else None
        if abandoned:
            state.start_warnings.append(abandoned)
        moved = manager.set_aside_abandoned(start_epoch, Path(resume_path), resume_ckpt) if info.is_primary else []
        if moved:
            auto_resumable = any(old.name in (LAST, RECOVERY) for old, _ in moved)  # --resume auto picked them
            auto = " and `--resume auto` continues this run" if auto_resumable else ""
            state.start_warnings.append(
                f"this resume from {resume_path} trains the epochs from {start_epoch} on again: renamed the earlier "
                f"run's {', '.join(f'{old.name} to {new.name}' for old, new in moved)}, so that no "
                f"checkpoint-<E>.pth.tar mixes them with this run's epochs{auto}")
        if evaluation_change and start_epoch > 0:  # epochs were evaluated the other way
            state.start_warnings.append(_best_restarted(cfg, info, manager, resume_path, start_epoch,
                                                        evaluation_change))
    outputs = Outputs(folder, manager, rows=[])
    if resume_ckpt is not None:
        outputs.rows = [r for r in read_summary(outputs.summary_path) if int(r["epoch"]) < start_epoch]
        saved = resume_ckpt.get("summary_rows") if manager.folder.resolve() == Path(resume_path).resolve().parent \
            else None
        if saved and len(saved) > len(outputs.rows):  # killed after the checkpoint, before summary.csv
            outputs.rows = [dict(r) for r in saved if int(r["epoch"]) < start_epoch]
        outputs.resumed_rows = len(outputs.rows)
    if info.is_primary:
        args_yaml = yaml.safe_dump(run_args(cfg), sort_keys=False)
        write_atomically(folder / "args.yaml", lambda tmp: Path(tmp).write_text(args_yaml))
        files = getattr(held_out, "held_out_files", None)
        if files:
            listing = "".join(f"{f}\n" for f in files)
            # surrogateescape: a file name that is not UTF-8 (Latin-1 caf\xe9.jpg) is listed as its own bytes
            write_atomically(folder / VAL_FILES, lambda tmp: Path(tmp).write_text(listing, encoding="utf-8",
                                                                                    errors="surrogateescape"))
    return outputs


def say_start_notes(state, info: dist_utils.DistInfo, more: list[str] = ()) -> None:
    """What a training run (train's, segment train's) says once its folder is ready, on rank 0 only: the notes held
    until the run starts (``state.start_warnings``, then ``more``), then the autocast rule's (``state.amp_notes``)."""
    if not info.is_primary:
        return
    for message in [*state.start_warnings, *more]:
        warn(message)
    say_notes(state.amp_notes)


def _best_restarted(cfg, info: dist_utils.DistInfo, manager: CheckpointManager, resume_path: str, start_epoch: int,
                    change: tuple[str, str]) -> str:
    """Restart the best-epoch tracking of ``manager`` (``CheckpointManager.restart_best``) and say so: the line names
    what was evaluated before and now (``change``), and where the earlier best stays."""
    earlier = manager.best_metric, manager.best_epoch
    kept = manager.restart_best(write=info.is_primary)
    plateau = ", the plateau schedule's" if getattr(cfg, "sched", None) == "plateau" else ""  # segment train: none
    stays = (f"; the earlier best, {cfg.eval_metric} {earlier[0]:.2f} at epoch {earlier[1]}, stays as {kept.name}"
             if kept is not None else "")
    return (f"`resume={resume_path}`: epochs 0..{start_epoch - 1} were evaluated on {change[0]}, this run evaluates "
            f"{change[1]}: their metrics do not compare, so the best epoch (model_best.pth.tar, the checkpoint "
            f"history{plateau}) starts again at epoch {start_epoch}{stays}")


def plural(n: int, word: str, words: str | None = None) -> str:
    """"1 epoch", "2 epochs"; "1 class", "3 classes" (``words`` for an irregular plural)."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def run_args(cfg) -> dict:
    """The run's settings (a TrainConfig's fields) as written to args.yaml and into checkpoints."""
    return plain({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def plain(value):
    """A YAML/weights_only-safe copy of an argument value."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_summary(path: Path) -> list[dict]:
    """summary.csv's rows as written (text); [] when there is no file. :func:`summary_numbers` reads one as
    numbers."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_numbers(row: dict) -> dict:
    """A summary.csv row as numbers: ``epoch`` an int, the rest floats (an empty cell: nan). What the results of
    :func:`sequencer.train` and ``train_segmenter`` hold."""
    return {k: int(v) if k == "epoch" else float(v or "nan") for k, v in row.items()}


@dataclass
class ReadBack:
    """What a run's result is made of, read back from its folder (:func:`read_back`)."""
    rows: list[dict]  # summary.csv's rows as numbers
    best_epoch: int | None
    best_row: dict | None  # the best epoch's row; None without one
    checkpoint: Path | None  # model_best.pth.tar (or last.pth.tar, see read_back); None where there is no file


def read_back(folder: Path, manager: CheckpointManager | None, scored: str, metric: str, higher_is_better: bool,
              best_epoch: int | None = None, last_without_evaluation: bool = False) -> ReadBack:
    """A run's :class:`ReadBack` from what it wrote (``summary.csv``, ``model_best.pth.tar``): ``sequencer.train``'s
    and ``train_segmenter``'s results. ``scored``: the column that is nan on an epoch not evaluated; ``metric`` (and
    ``higher_is_better``): the column that picks the best epoch of a finished run resumed (``manager`` None) whose
    checkpoint records no ``best_epoch``: its best row (the recorded one counts only the epochs since its evaluation
    last changed: ``resume.evaluation_change``). ``last_without_evaluation``: a run with rows but none evaluated
    (no held-out split) points at ``last.pth.tar``."""
    rows = [summary_numbers(r) for r in read_summary(folder / "summary.csv")]
    evaluated = [r for r in rows if not math.isnan(r[scored])]
    best_epoch = manager.best_epoch if manager is not None else best_epoch
    if manager is None and best_epoch is None and evaluated:
        sign = 1 if higher_is_better else -1
        best_epoch = max(evaluated, key=lambda r: (sign * r[metric], -r["epoch"]))["epoch"]
    best_row = next((r for r in evaluated if r["epoch"] == best_epoch), None)
    last = last_without_evaluation and rows and not evaluated
    best = folder / ("last.pth.tar" if last else "model_best.pth.tar")
    return ReadBack(rows, best_epoch, best_row, best if best.is_file() else None)


def primary_result(info: dist_utils.DistInfo, read):
    """``read()`` on rank 0, its result on every rank (every rank calls): rank 0 alone wrote a run's files and kept
    its best epoch, and another node may not see its files (no shared filesystem)."""
    return dist_utils.broadcast_object(read() if info.is_primary else None, info)


def write_summary(path: Path, rows: list[dict], fields: list[str] = SUMMARY_FIELDS) -> None:
    """Rewrite summary.csv in full (atomically), so a kill never leaves a partial row. ``fields``: the columns
    (segmentation's differ)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomically(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def plot_summary(rows: list[dict], path: Path) -> None:
    """Loss, top-1 and lr per epoch as a PNG beside summary.csv."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name):
        return [float(r[name]) if r.get(name) not in (None, "", "nan") else float("nan") for r in rows]

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, col("train_loss"), "o-", label="train")
    axes[0].plot(epochs, col("eval_loss"), "o-", label="eval")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, col("eval_top1"), "o-", color="C2")
    axes[1].set_title("eval top-1 (%)")
    axes[2].plot(epochs, col("lr"), "o-", color="C3")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = temp_path(path)
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _holds_a_run(folder: Path) -> bool:
    """A folder with a checkpoint or a summary row of a run (a header-only summary.csv is not a run)."""
    if any((folder / name).exists() for name in ("last.pth.tar", "recovery.pth.tar")):
        return True
    return bool(read_summary(folder / "summary.csv"))


def make_output_dir(cfg, state, info: dist_utils.DistInfo, model_name: str, img_size: int,
                    resumed: bool = False) -> Path:
    """Pick (rank 0), create and claim the experiment folder; every rank gets the same path. ``resumed``: the run
    continues a checkpoint; a new run (also one whose ``resume=auto`` found none) never writes over another's files.

    ``state.created_dirs`` (a :class:`~sequencer.engine.config.RunState`) lists the folders this call created
    (innermost first), so that a start that fails later can remove them again while they are empty. The claim
    (`claim_folder`) makes "is this folder free?" and "it is mine now" one atomic step: of two runs started
    together into one folder, the second is refused.
    """
    folder = None
    if info.is_primary:
        root = Path(cfg.output or "./output/train")
        if cfg.experiment:
            folder = experiment_folder(cfg)
        elif cfg.resume and cfg.resume != "auto":
            folder = Path(cfg.resume).parent  # continue the resumed run's own folder (docs/training.md)
        else:
            stem = "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), model_name, str(img_size)])
            folder, n = root / stem, 1
            while folder.exists():
                folder, n = root / f"{stem}-{n}", n + 1
        while True:
            try:
                _create_and_claim(state, folder)
                break
            except FolderInUse:
                if cfg.experiment or cfg.resume:
                    raise
                folder, n = root / f"{stem}-{n}", n + 1  # a run started in the same second took this name
        remove_stale_temporaries(folder)  # of a run that was killed mid-write (only once the folder is ours)
        if cfg.experiment and not resumed and _holds_a_run(folder):  # checked under the claim: no race
            if cfg.resume == "auto":  # its last.pth.tar unreadable: a new run wrote over model_best, history, summary
                raise SequencerError(f"experiment folder {str(folder)!r} holds a run, but `resume=auto` found no "
                                     f"checkpoint there to continue (last.pth.tar and recovery.pth.tar missing or "
                                     f"unreadable)",
                                     hint="pass `resume=PATH` of one of its checkpoint-<epoch>.pth.tar, or another "
                                          "`experiment`")
            raise SequencerError(f"experiment folder {str(folder)!r} already holds a run",
                                 hint="pass `resume=auto` to continue it, or another `experiment`")
        folder = str(folder)
    return Path(dist_utils.broadcast_object(folder, info))


def _create_and_claim(state, folder: Path) -> None:
    created = [folder, *folder.parents]
    state.created_dirs = [str(f) for f in created[:next(i for i, f in enumerate(created) if f.exists())]]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        remove_if_empty(state)
        raise SequencerError(f"output folder {str(folder)!r} is not writable ({e.strerror or e})",
                             hint="pass `output=DIR` somewhere you can write") from None
    claim_folder(state, folder)


class FolderInUse(SequencerError):
    """Another live run holds the folder's claim."""


CLAIM_NAME = ".run.lock"  # "HOST PID" of the run writing into the folder; hidden, removed when the run ends


def claim_folder(state, folder: Path) -> None:
    """Make ``folder`` this run's (``state.claim``), atomically (O_EXCL); refuse it while another live run holds it.

    A claim left by a run that was killed (its process is gone) is taken over, so ``--resume auto`` works after a
    SIGKILL. A claim from another host cannot be checked and is refused with the file to remove.
    """
    path = folder / CLAIM_NAME
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, pid = _claim_owner(path)
            if host != socket.gethostname() or pid is None or _process_alive(pid):
                where = f"process {pid}" + ("" if host == socket.gethostname() else f" on {host}")
                raise FolderInUse(f"experiment folder {str(folder)!r} is in use by another run ({where})",
                                     hint=f"wait for it, pass another `experiment`, or remove {str(path)!r} if "
                                          f"that run is gone") from None
            path.unlink(missing_ok=True)  # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        state.claim = str(path)
        return
    raise FolderInUse(f"experiment folder {str(folder)!r} is in use by another run starting now")


def _claim_owner(path: Path) -> tuple[str, int | None]:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):  # being written this very instant (or garbage): held, by an unknown process
        return socket.gethostname(), None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def release_claim(state) -> None:
    """Remove this run's claim (at the end of the run, however it ends)."""
    if state.claim:
        Path(state.claim).unlink(missing_ok=True)
        state.claim = None


def remove_if_empty(state) -> None:
    """Remove the folders this start created when a failure left them empty (no debris)."""
    for folder in state.created_dirs:
        try:
            os.rmdir(folder)  # fails, as it should, when anything was written there
        except OSError:
            return


@contextlib.contextmanager
def claimed_process_group(device: str, state):
    """The run's process group (:func:`.distributed.process_group`: this process alone, a torchrun rank, or the
    caller's group), yielding its ``DistInfo``; however the run ends its claim is released, and a run that fails
    leaves none of the folders this start created empty behind."""
    try:
        with dist_utils.process_group(device) as info:
            yield info
    except BaseException:
        release_claim(state)  # first: the claim file would keep a folder this start made from counting as empty
        remove_if_empty(state)
        raise
    finally:
        release_claim(state)
