"""Training checkpoints: atomic writes, the best-N history, recovery files and resuming.

Every file is written to a temporary name in the destination folder, flushed, fsync'ed and then renamed over
the target with ``os.replace`` (atomic on POSIX and Windows), so a kill or a full disk at any moment leaves the
previous file intact and no half-written file behind.

Files in an experiment folder (as timm's ``CheckpointSaver`` names them):
  ``last.pth.tar``            end of the latest finished epoch
  ``model_best.pth.tar``      the epoch with the best ``--eval-metric`` so far (none without a held-out split)
  ``checkpoint-<E>.pth.tar``  the best ``--checkpoint-hist`` epochs (the latest, without a held-out split)
  ``recovery.pth.tar``        written on SIGTERM/SIGINT in the middle of an epoch (removed once the epoch ends)
  ``abandoned-checkpoint-<E>.pth.tar``  epochs a resume from an earlier epoch trains again (the earlier trajectory's)
  ``abandoned-last.pth.tar``  (and ``abandoned-recovery.pth.tar``) where that trajectory had gone

Checkpoint dict (contract shared with validate/predict/...; every value is ``weights_only``-loadable):
``version, arch, model_kwargs, class_names, data_config, data, state_dict, [state_dict_ema], optimizer,
scheduler, scaler, epoch, metric, args, rng_state`` (``data``: the dataset trained on, see data_record.py) plus our own bookkeeping: ``epoch_complete`` (False for a recovery
file), ``step``, ``best_metric``, ``best_epoch``, ``checkpoint_history``, ``evaluated_weights`` ("ema" or "model": the
weights ``metric`` and the best were measured on), ``probabilities`` ("sigmoid" for a ``bce_loss`` run, else
"softmax": how predict turns its logits into probabilities), ``eval_amp_dtype`` (the autocast it evaluated under); a
recovery file also holds
``epoch_progress`` (how far the interrupted epoch's updates went: a resume goes on from there, see
``loop.resumed_progress``).
"""
from __future__ import annotations

import errno
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import SequencerError
from ..fileio import fsync_dir, temp_path, write_atomically
from ..models.loading import read_checkpoint

CHECKPOINT_VERSION = 1
LAST, BEST, RECOVERY = "last.pth.tar", "model_best.pth.tar", "recovery.pth.tar"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it (and the folder) untouched.

    Raises SequencerError naming the file when the write fails (full disk, no permission, ...).
    """
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            writer = _WriteErrorKeeper(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:  # torch reports a failed write as "unexpected pos": give the real cause
                if writer.error is not None:
                    raise writer.error from None
                raise

    write_atomically(path, save, what="checkpoint")


class _WriteErrorKeeper:
    """A binary file wrapper that remembers the first OSError of a write (ENOSPC, EFBIG), which torch.save hides."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold the bytes of ``src`` atomically: a hard link when the filesystem allows, else a copy."""
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)  # later os.replace of src keeps this inode alive, so dst stays valid
        except OSError:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                while chunk := fi.read(1 << 22):
                    fo.write(chunk)
                fo.flush()
                os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "the disk is full" if full else (e.strerror or str(e))
        raise SequencerError(f"could not write checkpoint {str(dst)!r}: {reason}; nothing was half-written",
                             hint=("free some space or " if full else "") + "pass another `output`") from None
    fsync_dir(dst.parent)


# ---------------------------------------------------------------------------------------------------- RNG state
def get_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as weights_only-safe values (lists, ints, tensors)."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------------- history
class CheckpointManager:
    """Writes last/best/history/recovery checkpoints of one experiment folder (rank 0 only).

    ``decreasing``: lower metric is better (``--eval-metric loss``). ``by_epoch``: a run without a held-out split
    has no metric: the history keeps the latest epochs and no epoch is best (no ``model_best``).
    """

    def __init__(self, folder: str | os.PathLike, max_history: int = 10, decreasing: bool = False,
                 by_epoch: bool = False):
        self.by_epoch = by_epoch
        self.folder = Path(folder)
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: list[tuple[int, float]] = []  # (epoch, metric), best first
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.decreasing else a > b)

    def restore(self, checkpoint: dict) -> None:
        """Take over best metric and history from a checkpoint being resumed (files that vanished are dropped)."""
        self.best_metric = checkpoint.get("best_metric")
        self.best_epoch = checkpoint.get("best_epoch")
        self.history = [(int(e), float(m)) for e, m in checkpoint.get("checkpoint_history") or []
                        if (self.folder / f"checkpoint-{int(e)}.pth.tar").exists()]

    def best_of_the_epochs_kept(self, resumed: Path) -> str | None:
        """After :meth:`restore` from ``resumed`` (rank 0): make ``model_best`` the restored best epoch's again where
        it is a later epoch's, one the resume abandons (a resume from ``checkpoint-<N>`` of a run that went past
        N): it stayed there while the run named its best epoch, and validate scored the abandoned epoch. It is
        taken from ``checkpoint-<best>`` or the ``resumed`` file where one holds that epoch; otherwise the best is
        picked again from the resumed epoch on, and the returned note says so (None where nothing was wrong)."""
        best = self.folder / BEST
        abandoned = _epoch_of(best) if self.best_epoch is not None and best.is_file() else self.best_epoch
        if abandoned == self.best_epoch:
            return None
        for source in (self.folder / f"checkpoint-{self.best_epoch}.pth.tar", Path(resumed)):
            if source.is_file() and _epoch_of(source, complete=True) == self.best_epoch:
                atomic_link_or_copy(source, best)
                return None
        note = (f"{BEST} held epoch {abandoned}, which this resume from {resumed} trains again, and no file holds "
                f"the best epoch before it ({self.best_epoch}): the best is picked again from the resumed epoch on")
        self.best_metric, self.best_epoch = None, None
        return note

    def set_aside_abandoned(self, start_epoch: int, resumed: Path, checkpoint: dict) -> list[tuple[Path, Path]]:
        """After a resume at ``start_epoch`` from ``resumed`` (its contents ``checkpoint``; rank 0): rename the
        ``checkpoint-<E>.pth.tar`` of epochs from ``start_epoch`` on, the run's abandoned epochs, to
        ``abandoned-checkpoint-<E>.pth.tar`` (``.<k>`` added where that name is taken). Left under their names they
        passed for this run's epochs wherever it did not write its own (an epoch the history did not keep, one it has
        not reached, a shorter run), so ``checkpoint average checkpoint-*.pth.tar`` mixed two runs' weights. A
        ``last``/``recovery`` further on than ``resumed`` is the abandoned run's too: until this run's first epoch
        ended, a kill left it for ``--resume auto`` to continue; it becomes ``abandoned-last``/``abandoned-recovery``
        and ``last`` the resumed epoch. Renamed, not deleted: they are the user's. Returns the (old, new) names."""
        moved = []
        for path in sorted(self.folder.glob("checkpoint-*.pth.tar")):
            match = re.fullmatch(r"checkpoint-(\d+)\.pth\.tar", path.name)
            if match is not None and int(match.group(1)) >= start_epoch:
                moved.append((path, _set_aside(path)))
        position = _progress(checkpoint)
        for path in (self.folder / LAST, self.folder / RECOVERY):
            if path.is_file() and not path.samefile(resumed) and (_position_of(path) or position) > position:
                moved.append((path, _set_aside(path)))
        if any(old.name == LAST for old, _ in moved) and checkpoint.get("epoch_complete", True):
            atomic_link_or_copy(Path(resumed), self.folder / LAST)
        if moved:
            fsync_dir(self.folder)
        return moved

    def restart_best(self, write: bool = True) -> Path | None:
        """Forget the best metric and the history's ranking: the epochs so far were measured on another evaluation
        (``resume.evaluation_change``), which later metrics cannot be compared with. Their ``checkpoint-<E>.pth.tar``
        files stay, outside the ranking, and the earlier best's is made from ``model_best`` where the history had not
        kept it (``write``: on rank 0), before the next best replaces ``model_best``. Returns that file (None without
        an earlier best)."""
        kept = None
        if self.best_epoch is not None and (self.folder / BEST).is_file():
            kept = self.folder / f"checkpoint-{self.best_epoch}.pth.tar"
            if write and not kept.is_file():
                atomic_link_or_copy(self.folder / BEST, kept)
        self.best_metric, self.best_epoch, self.history = None, None, []
        return kept

    def bookkeeping(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "checkpoint_history": [[e, m] for e, m in self.history]}

    def save_epoch(self, state: dict, epoch: int, metric: float | None) -> bool:
        """Write ``last``; update ``model_best`` and the history when ``metric`` is finite and good enough.

        ``state`` is the checkpoint dict without the bookkeeping keys. Returns True when this epoch is the new best.
        A non-finite metric never becomes best, so a diverged model cannot overwrite ``model_best``.
        """
        if self.by_epoch:  # ranked by recency; never best
            metric, self.decreasing = float(epoch), False
        usable = metric is not None and np.isfinite(metric)
        is_best = usable and not self.by_epoch and self._better(metric, self.best_metric)
        if is_best:
            self.best_metric, self.best_epoch = float(metric), epoch
        keep = False
        if usable and self.max_history > 0:
            worst = self.history[-1][1] if len(self.history) >= self.max_history else None
            keep = len(self.history) < self.max_history or self._better(metric, worst)
            if keep:
                self.history.append((epoch, float(metric)))
                self.history.sort(key=lambda em: em[1], reverse=not self.decreasing)
        dropped = self.history[self.max_history:] if self.max_history > 0 else []
        self.history = self.history[:self.max_history] if self.max_history > 0 else []
        state = dict(state, **self.bookkeeping())
        last = self.folder / LAST
        atomic_save(state, last)
        if is_best:
            atomic_link_or_copy(last, self.folder / BEST)
        if keep and any(e == epoch for e, _ in self.history):
            atomic_link_or_copy(last, self.folder / f"checkpoint-{epoch}.pth.tar")
        for e, _ in dropped:
            (self.folder / f"checkpoint-{e}.pth.tar").unlink(missing_ok=True)
        (self.folder / RECOVERY).unlink(missing_ok=True)  # the finished epoch supersedes it
        return is_best

    def save_recovery(self, state: dict) -> Path:
        path = self.folder / RECOVERY
        atomic_save(dict(state, **self.bookkeeping()), path)
        return path


def _mapped(path: Path) -> dict | None:
    """The training checkpoint at ``path`` with its tensors mapped, not read; None for a file that is not one of
    ours."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch's own errors for a file that is not one of ours; it stands for no checkpoint
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def _epoch_of(path: Path, complete: bool = False) -> int | None:
    """The ``epoch`` a training checkpoint of this folder records; with ``complete``, None for an epoch it holds
    unfinished (a recovery file)."""
    checkpoint = _mapped(path)
    if checkpoint is None or (complete and not checkpoint.get("epoch_complete", True)):
        return None
    return checkpoint.get("epoch")


def _position_of(path: Path) -> tuple[int, int] | None:
    """:func:`_progress` of the training checkpoint at ``path``; None for a file that is not one of ours."""
    checkpoint = _mapped(path)
    return None if checkpoint is None else _progress(checkpoint)


def _progress(checkpoint: dict) -> tuple[int, int]:
    """How far a training checkpoint went, as ``--resume auto`` ranks files (:func:`find_auto_resume`): the epoch a
    resume starts at, then the batches of it already done."""
    return resume_position(checkpoint), int(checkpoint.get("step", 0))


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to ``abandoned-<name>`` (``.<k>`` before ``.pth.tar`` where that name is taken); the new name."""
    aside, k = path.with_name(f"abandoned-{path.name}"), 0
    while aside.exists():
        k += 1
        aside = path.with_name(f"abandoned-{path.name.removesuffix('.pth.tar')}.{k}.pth.tar")
    os.rename(path, aside)
    return aside


def resume_position(checkpoint: dict) -> int:
    """The epoch to start at when resuming ``checkpoint``: the next one, or the same one for a recovery file."""
    epoch = int(checkpoint.get("epoch", -1))
    return epoch + 1 if checkpoint.get("epoch_complete", True) else epoch


def find_auto_resume(folder: str | os.PathLike) -> Path | None:
    """The most advanced loadable checkpoint of an experiment folder (recovery or last), or None.

    Used by ``--resume auto`` so that torchrun ``--max-restarts`` continues where the killed run stopped.
    """
    folder = Path(folder)
    best, best_pos = None, None
    for name in (LAST, RECOVERY):
        path = folder / name
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint(path)
        except SequencerError as e:  # cannot happen with atomic writes, but a copied-in file might be broken
            warnings.warn(f"`resume=auto`: skipping {path}: {e}")
            continue
        pos = _progress(ckpt)
        if best_pos is None or pos > best_pos:
            best, best_pos = path, pos
    return best


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, opt: str, keep_lr: bool = False,
                         hint: str = "pass the run's `opt`") -> None:
    """Load a resumed optimizer's state (its moments, step counts) into ``optimizer``, built from this start's
    settings, keeping their hyperparameters: loading the groups as saved would run a resume's `lr`, `weight_decay`,
    `momentum`, betas, eps and layer decay at the checkpoint's values whatever was given. ``keep_lr``: the groups'
    `lr` and `initial_lr` are the checkpoint's (a plateau schedule's reduced lr is its state). A state of another
    optimizer kind than ``opt`` is refused (``hint`` says what to do) instead of failing later."""
    saved_keys = {k for g in state.get("param_groups", []) for k in g if k != "params"}
    own_keys = {k for g in optimizer.param_groups for k in g if k != "params"}
    if len(state.get("param_groups", [])) != len(optimizer.param_groups) or not own_keys <= saved_keys:
        raise SequencerError(f"`resume`: the checkpoint's optimizer state is not one of `opt={opt}`", hint=hint)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update({k: v for k, v in own.items() if not (keep_lr and k in ("lr", "initial_lr"))})
