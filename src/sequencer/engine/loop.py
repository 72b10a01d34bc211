"""The epoch loop of ``sequencer train``: one epoch of training, its evaluation, and what is saved after it.

``train.py`` builds a :class:`TrainingRun` step by step; the functions here only use it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SequencerError
from . import distributed as dist_utils
from .amp import autocast, dtype_name
from .checkpoint import CHECKPOINT_VERSION, get_rng_state
from .config import RunState, TrainConfig
from .data_record import evaluated_data, evaluated_weights
from .evaluate import check_head_covers, class_count
from .guest import warn
from .outputs import Outputs, plain, plot_summary, plural, run_args, write_summary
from .stop_request import StopRequest
from .user_data import architecture_recorded

_logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the run's state
@dataclass
class Loaders:
    train: Any
    eval: Any
    data_config: dict  # what checkpoints record: mean, std, crop_pct, interpolation, img_size
    img_size: int
    steps_per_epoch: int
    updates_per_epoch: int


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, or None
    num_epochs: int
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast dtype, None without --amp
    model_ema: Any  # timm ModelEmaV3, or None
    mixup_fn: Any  # timm Mixup, or None
    loss_fn: nn.Module


@dataclass
class TrainingRun:
    cfg: TrainConfig
    info: dist_utils.DistInfo
    model: nn.Module  # the plain model: checkpoints, EMA updates and gradient clipping use it
    train_model: nn.Module  # the model as trained: DDP and/or torch.compile around ``model``
    eval_model: nn.Module
    class_names: list[str]
    loaders: Loaders
    opt: Optimization
    out: Outputs
    ignored_classes: list[str] = field(default_factory=list)  # kept in checkpoints: validate leaves them out too
    state: RunState = field(default_factory=RunState)  # the run's bookkeeping: quiet (no progress bar), wandb


@dataclass
class EpochProgress:
    """How far an epoch's updates went: its first ``batches`` batches (a whole number of ``--grad-accum-steps``
    windows) are in the weights, with this process's summed loss over their ``seen`` images and its random state
    (``checkpoint.get_rng_state``) as the next batch began. A recovery checkpoint records it, and the resumed epoch
    goes on from there: the rest of its batches, once each, drawing as the interrupted run did. ``buffers``: the
    model's buffers as that update left them (`state_buffers`), which later forward passes move (BatchNorm's
    statistics) although those batches are trained again on resume."""
    batches: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    rng: dict | None = None
    buffers: dict | None = field(default=None, compare=False)


@dataclass
class EpochResult:
    train_loss: float
    lr: float  # what the epoch's last update used (with a per-update schedule, not the next one's)
    started: float  # time.time() at the start of the epoch
    stopped_at: int | None = None  # the step at which a stop request (SIGTERM/SIGINT) ended the epoch
    done: EpochProgress = field(default_factory=EpochProgress)  # what the epoch's updates covered


# ------------------------------------------------------------------------------------------------ training
def train_one_epoch(run: TrainingRun, epoch: int, stop: StopRequest, start: EpochProgress | None = None
                    ) -> EpochResult:
    """One pass over the training data: forward, backward and, every ``--grad-accum-steps`` batches, an update.
    ``start``: what a recovery checkpoint's updates already covered of this epoch (its batches are not loaded).

    Returns early (``stopped_at`` set) when any rank was asked to stop; raises SequencerError on a non-finite loss,
    before that loss is used for an update.
    """
    cfg, info, loaders = run.cfg, run.info, run.loaders
    start = start or EpochProgress()
    _set_epoch(run, epoch, start.batches)
    started = time.time()
    run.train_model.train()
    steps = loaders.steps_per_epoch
    last_accum = steps % cfg.grad_accum_steps or cfg.grad_accum_steps  # the last, possibly shorter, accumulation
    num_updates = epoch * loaders.updates_per_epoch + start.batches // cfg.grad_accum_steps
    loss_sum, seen = start.loss_sum, start.seen
    buffers = buffer_names(run.model)  # once: an update copies them only where there are any
    done = dataclasses.replace(start, rng=get_rng_state(), buffers=state_buffers(run.model, buffers))
    lr = current_lr(run.opt.optimizer)
    progress = _Progress(run, epoch, started, start.seen)
    run.opt.optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(loaders.train, start=start.batches):
        accum = last_accum if step >= steps - last_accum else cfg.grad_accum_steps
        need_update = step == steps - 1 or (step + 1) % cfg.grad_accum_steps == 0
        images, targets = _prepare_batch(run, images, targets)
        lr = current_lr(run.opt.optimizer)  # what this batch's update uses: a per-update schedule moves on after it
        sync = run.train_model.no_sync if info.distributed and not need_update else contextlib.nullcontext
        with sync():
            loss = _forward(run, images, targets)
            loss_value = loss.item()
            if must_stop(run, stop, loss_value, epoch, step, last=step == steps - 1):
                progress.close()
                return EpochResult(float("nan"), current_lr(run.opt.optimizer), started, stopped_at=step, done=done)
            run.opt.scaler.scale(loss / accum).backward()
        loss_sum += loss_value * images.shape[0]
        seen += images.shape[0]
        if need_update:
            num_updates += 1
            _update(run, num_updates, loss_sum / seen)
            # before the next batch draws and goes forward
            done = EpochProgress(step + 1, loss_sum, seen, get_rng_state(), state_buffers(run.model, buffers))
        if cfg.recovery_interval and (step + 1) % cfg.recovery_interval == 0 and step < steps - 1:
            write_recovery(run, epoch, step, done)  # --recovery-interval: a resume goes on after ``done``
        progress.step(step, loss_value, loss_sum / seen, seen, lr)
    progress.close()
    train_loss = dist_utils.all_reduce_mean([loss_sum / max(seen, 1)], info)[0]
    return EpochResult(train_loss, lr, started, done=done)


def _set_epoch(run: TrainingRun, epoch: int, skip_batches: int = 0) -> None:
    # shuffling and augmentation seeds depend on the epoch only, so a resumed epoch sees the same batches; an
    # epoch resumed where it stopped leaves out the batches already trained (data.ImageLoader.set_epoch)
    loader = run.loaders.train
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, skip_batches) if skip_batches else loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    mixup_fn = run.opt.mixup_fn
    if mixup_fn is not None and run.cfg.mixup_off_epoch and epoch >= run.cfg.mixup_off_epoch:
        mixup_fn.mixup_enabled = False


def _prepare_batch(run: TrainingRun, images: torch.Tensor, targets: torch.Tensor):
    """(images, targets) on the device, mixed (--mixup/--cutmix) and in the model's memory format."""
    device = run.info.device
    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    if run.opt.mixup_fn is not None:
        images, targets = run.opt.mixup_fn(images, targets)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _forward(run: TrainingRun, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with autocast(run.info.device.type, run.opt.amp_dtype):
        logits = run.train_model(images)
        check_head_covers(logits, class_count(run.loaders.train))
        return run.opt.loss_fn(logits, targets)


def must_stop(run, stop: StopRequest, loss_value: float, epoch: int, step: int, last: bool = False) -> bool:
    """True when any rank was asked to stop; SequencerError when any rank's loss is not finite: one all-reduce for
    both, after the step's forward pass and before its backward. ``run``: any run with ``info`` and ``out``
    (classification's :class:`TrainingRun`, segmentation's run). The forward pass of a step that stops moved the
    model's buffers (BatchNorm's statistics): the recovery checkpoint takes them from the last update's
    `state_buffers` (`recovery_state`). Past the epoch's ``last`` step a signal stops the run only after the epoch's
    checkpoint (``stop.finishing_epoch``)."""
    # all ranks agree before any backward, so a stop never leaves DDP waiting on a peer
    signum, bad_flag = stop.agreed_with(run.info, not math.isfinite(loss_value))
    if last and not signum:
        stop.finishing_epoch = epoch
    if bad_flag:
        last = run.out.folder / "last.pth.tar"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished"
        # every rank raises: one whose own loss is finite names the process that had none, not its own number
        whose = f"({loss_value})" if not math.isfinite(loss_value) else "(on another process)"
        raise SequencerError(f"loss is not finite {whose} at epoch {epoch} step {step}; training stopped "
                             f"before that update and {kept}",
                             hint="lower `lr`, add `clip_grad`, or use `amp_dtype=bfloat16`")
    return bool(signum)


def _update(run: TrainingRun, num_updates: int, mean_loss: float) -> None:
    """Clip, step the optimizer (through the scaler), then the EMA and the per-update schedule."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad

    cfg, opt = run.cfg, run.opt
    if cfg.clip_grad is not None:
        opt.scaler.unscale_(opt.optimizer)
        # as timm's train.py: adaptive clipping leaves the classifier (the last two parameters) out
        clipped = model_parameters(run.model, exclude_head="agc" in cfg.clip_mode)
        dispatch_clip_grad(clipped, value=cfg.clip_grad, mode=cfg.clip_mode)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    if opt.model_ema is not None:
        opt.model_ema.update(run.model, step=num_updates)
    if opt.scheduler is not None:
        opt.scheduler.step_update(num_updates=num_updates, metric=mean_loss)


class _Progress:
    """A tqdm bar on rank 0's terminal, else a log line every ``--log-interval`` steps (and at the last)."""

    def __init__(self, run: TrainingRun, epoch: int, started: float, seen_before: int = 0):
        self.run, self.epoch, self.started, self.seen_before = run, epoch, started, seen_before
        self.bar = None
        if run.info.is_primary and sys.stderr.isatty() and not run.state.quiet:
            from ..models.hub import ProgressBar
            self.bar = ProgressBar(total=run.loaders.steps_per_epoch, desc=f"epoch {epoch}/{run.opt.num_epochs - 1}",
                                   leave=False, dynamic_ncols=True, initial=seen_before // run.cfg.batch_size)

    def step(self, step: int, loss_value: float, mean_loss: float, seen: int, lr: float) -> None:
        """Show ``step``'s losses and the ``lr`` its update used."""
        run, steps = self.run, self.run.loaders.steps_per_epoch
        rate = (seen - self.seen_before) * run.info.world_size / max(time.time() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        elif run.info.is_primary and (step % run.cfg.log_interval == 0 or step == steps - 1):
            _logger.info(f"train: epoch {self.epoch} [{step + 1:>4d}/{steps} {100 * (step + 1) / steps:3.0f}%] "
                         f"loss {loss_value:.4f} ({mean_loss:.4f}) lr {lr:.2e} {rate:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def current_lr(optimizer) -> float:
    return sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_epoch(run: TrainingRun) -> tuple[dict, float | None]:
    """(metrics of the held-out split, the raw model's top-1 when the metrics are the EMA's, else None); (None,
    None) without a held-out split."""
    from .evaluate import evaluate

    if run.loaders.eval is None:
        return None, None
    device, opt = run.info.device, run.opt
    dist_utils.sync_running_stats(run.model, run.cfg.dist_bn, run.info)  # the checkpoint is the model evaluated
    metrics = evaluate(run.eval_model, run.loaders.eval, device, amp_dtype=opt.amp_dtype,
                       distributed=run.info.distributed)
    if evaluated_weights(opt, device) == "model":
        return metrics, None
    ema = opt.model_ema
    raw_top1 = metrics["top1"]
    dist_utils.sync_running_stats(ema.module, run.cfg.dist_bn, run.info)  # each rank's EMA took its own statistics
    metrics = evaluate(ema.module, run.loaders.eval, device, amp_dtype=opt.amp_dtype,
                       distributed=run.info.distributed)
    return metrics, raw_top1


# ------------------------------------------------------------------------------------------------- saving
def save_epoch(run: TrainingRun, epoch: int, result: EpochResult, metrics: dict | None, metric: float | None,
               raw_top1: float | None) -> dict:
    """Append the epoch's summary row, write summary.csv, the checkpoints and summary.png, and log the epoch
    (``metrics`` None: no held-out split, the eval columns stay empty). Returns the row as numbers (what
    callbacks get; nan where nothing was evaluated)."""
    seconds = time.time() - result.started
    scored = metrics is not None
    nan = float("nan")
    row = dict(epoch=epoch, train_loss=result.train_loss, eval_loss=float(metrics["loss"]) if scored else nan,
               eval_top1=float(metrics["top1"]) if scored else nan, eval_top5=float(metrics["top5"]) if scored else nan,
               lr=result.lr, epoch_seconds=seconds)
    rows = run.out.rows
    rows.append(dict(epoch=epoch, train_loss=f"{result.train_loss:.6f}",
                     eval_loss=f"{metrics['loss']:.6f}" if scored else "",
                     eval_top1=f"{metrics['top1']:.4f}" if scored else "",
                     eval_top5=f"{metrics['top5']:.4f}" if scored else "",
                     lr=f"{result.lr:.6e}", epoch_seconds=f"{seconds:.2f}"))
    rng_states = dist_utils.all_gather_object(get_rng_state(), run.info)
    skipped = skipped_note(run.loaders.train, run.info)
    if not run.info.is_primary:
        return row
    # checkpoint first, holding the rows so far: a row never stands for a checkpoint that is not on disk, and a
    # resume after a kill between the two writes takes the rows from the checkpoint (prepare_outputs)
    state = checkpoint_state(run, epoch, True, 0, metric, rng_states)
    state["summary_rows"] = [{k: str(v) for k, v in r.items()} for r in rows]
    is_best = run.out.manager.save_epoch(state, epoch, metric if math.isfinite(result.train_loss) else None)
    write_summary(run.out.summary_path, rows)
    if run.state.wandb is not None:  # --log-wandb
        run.state.wandb.log({k: float(v) for k, v in rows[-1].items() if v != ""}, step=epoch)
    try:
        plot_summary(rows, run.out.folder / "summary.png")
    except Exception as e:  # a plotting problem must never stop training
        warn(f"could not draw summary.png: {e}")
    ema_note = f" (raw model {raw_top1:.2f})" if raw_top1 is not None else ""
    scores = ("not evaluated (no held-out split)" if metrics is None else
              f"eval_loss {metrics['loss']:.4f} top1 {metrics['top1']:.2f}{ema_note} top5 {metrics['top5']:.2f}")
    _logger.info(f"epoch {epoch}: train_loss {result.train_loss:.4f} {scores} "
                 f"lr {result.lr:.2e} {seconds:.1f}s{' *best*' if is_best else ''}{skipped}")
    return row


def epoch_ends_run(run, stop: StopRequest, epoch: int, num_epochs: int, row: dict) -> bool:
    """After ``epoch`` is saved (its summary ``row``): call the callbacks, then whether the run ends here, on every
    rank: the run's last epoch, a callback's stop, or a signal to any rank since the epoch's last training step (its
    evaluation, saving or callbacks). Until the run goes on, a signal stops it after this epoch
    (``stop.finishing_epoch``, read back by ``stop_request.stopped_after_epochs`` once the handlers are restored): a
    signal during the last epoch's callbacks said "stopping at the next step with a recovery checkpoint", and the
    run ended with status 0. ``run``: any run with ``state``, ``info`` (classification's :class:`TrainingRun`,
    segmentation's run)."""
    if callbacks_ask_to_stop(run, row):
        if run.info.is_primary:
            _logger.info(f"a callback stopped the run after epoch {epoch}")
        return True
    if epoch == num_epochs - 1 or stop.agreed(run.info):
        return True
    stop.finishing_epoch = None
    return False


def callbacks_ask_to_stop(run: TrainingRun, metrics: dict) -> bool:
    """Call every callback with the epoch's ``metrics`` (a dict of numbers); True when one returned True on any
    rank (all ranks agree, so none waits on a peer that stopped). ``run``: any run with ``state`` (its
    callbacks) and ``info`` (classification's :class:`TrainingRun`, segmentation's run).

    Under DDP every rank takes part in the agreement, also one given no callbacks: a script that passes its
    callbacks on rank 0 only made rank 0 all-reduce here while the others went on to the next step's all-reduce
    of another size, and gloo waited 30 minutes for the rest of both before failing (a no-op outside DDP).

    A callback that raises on one rank raises there after the agreement, and the other ranks stop with
    :class:`~.distributed.PeerGone` naming it, all at this one point: in the caller's own process group the failing
    rank left the others waiting here, and its next collective of the caller's own met theirs (gloo aborted the
    process: 'Received data size doesn't match expected size')."""
    wants, failure = [], None
    for cb in run.state.callbacks:
        try:
            wants.append(cb(dict(metrics)) is True)
        except BaseException as e:  # noqa: BLE001 -- raised below, once every rank knows
            failure = e
            break
    stop, failed = dist_utils.all_reduce_max([float(any(wants)), float(run.info.rank + 1 if failure else 0)],
                                             run.info)
    if failure is not None:
        raise failure
    if failed:
        raise dist_utils.PeerGone(f"another process of the run stopped (rank {int(failed) - 1}'s callback raised)")
    return bool(stop)


def write_recovery(run: TrainingRun, epoch: int, step: int, done: EpochProgress):
    """Write ``recovery.pth.tar`` after ``step`` of ``epoch``, with what the epoch's updates covered (``done``)
    (every rank calls; rank 0 writes and gets the path)."""
    split = batch_split(run.cfg, run.info, run.loaders.steps_per_epoch, run.cfg.grad_accum_steps)
    rng_states, progress = recovery_progress(done, run.info, split)
    if not run.info.is_primary:
        return None
    state = checkpoint_state(run, epoch, False, step, None, rng_states)
    return run.out.manager.save_recovery(recovery_state(state, done, progress))


def recovery_state(state: dict, done: EpochProgress, progress: dict) -> dict:
    """``state`` (a training checkpoint of the interrupted epoch) made a recovery checkpoint, in place: the
    model's buffers as ``done``'s update left them (the batches forwarded since are trained again on resume, and
    must not have moved BatchNorm's statistics) and ``progress`` (`recovery_progress`'s ``epoch_progress``)."""
    state["state_dict"].update(done.buffers or {})
    state["epoch_progress"] = progress
    return state


def buffer_names(model: nn.Module) -> set[str]:
    """The names of ``model``'s buffers (BatchNorm's running statistics, ...); none in Sequencer's models."""
    return {name for name, _ in model.named_buffers()}


def state_buffers(model: nn.Module, names: set[str]) -> dict | None:
    """Copies of ``model``'s state-dict buffers among ``names`` (`buffer_names`), None where there are none
    (Sequencer's models: nothing is read or copied, at no cost per update)."""
    if not names:
        return None
    return {name: value.detach().clone() for name, value in model.state_dict().items() if name in names}


def batch_split(cfg, info: dist_utils.DistInfo, steps_per_epoch: int, grad_accum_steps: int = 1) -> dict:
    """How a run cuts its data into batches and updates (``cfg.batch_size``, processes, batches per epoch,
    batches per update): a recovery checkpoint's epoch goes on only where the resumed run cuts it alike."""
    return dict(batch_size=cfg.batch_size, grad_accum_steps=grad_accum_steps, world_size=info.world_size,
                steps_per_epoch=steps_per_epoch)


def recovery_progress(done: EpochProgress, info: dist_utils.DistInfo, split: dict) -> tuple[list, dict]:
    """Every rank's random state at ``done`` (the recovery file's ``rng_state``: a resume draws on from there) and
    its ``epoch_progress`` entry: ``done``'s batches, every rank's loss sum and count, and the ``batch_split``
    (read back by `resumed_progress`). Every rank calls (they gather)."""
    gathered = dist_utils.all_gather_object((done.rng, [done.loss_sum, done.seen]), info)
    rng_states, losses = [rng for rng, _ in gathered], [loss for _, loss in gathered]
    return rng_states, dict(batches=done.batches, losses=losses, **split)


def resumed_progress(checkpoint: dict | None, info: dist_utils.DistInfo, split: dict) -> EpochProgress:
    """Where the interrupted epoch of a recovery ``checkpoint`` goes on: after the batches its updates covered
    (`recovery_progress`), when this start cuts the data alike (``split``, a `batch_split`, as recorded);
    otherwise (with a warning), and for a finished epoch or an older recovery file, at the epoch's beginning."""
    if checkpoint is None or checkpoint.get("epoch_complete", True):
        return EpochProgress()
    recorded = checkpoint.get("epoch_progress")
    if not isinstance(recorded, dict):  # written before interrupted epochs went on: the epoch re-runs
        return EpochProgress()
    changed = [f"{key} {recorded.get(key)} -> {value}" for key, value in split.items() if recorded.get(key) != value]
    epoch = checkpoint.get("epoch")
    if changed:
        if info.is_primary:
            warn(f"`resume`: the interrupted epoch {epoch} re-runs from its beginning, its batches not being the "
                 f"interrupted run's ({', '.join(changed)})")
        return EpochProgress()
    loss_sum, seen = recorded["losses"][info.rank]
    done = EpochProgress(int(recorded["batches"]), float(loss_sum), int(seen))
    if info.is_primary and done.batches:
        _logger.info(f"`resume`: epoch {epoch} goes on after its first {done.batches} of "
                     f"{split['steps_per_epoch']} batches")
    return done


def save_recovery(run: TrainingRun, epoch: int, result: EpochResult, signum: int) -> int:
    """Write ``recovery.pth.tar`` (a resume goes on after the epoch's last update) and return the exit status
    128 + signal."""
    path = write_recovery(run, epoch, result.stopped_at, result.done)
    if run.info.is_primary:
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        _logger.warning(f"stopped by {name} at epoch {epoch} step {result.stopped_at}; recovery checkpoint {path} "
                        f"(a resume goes on {resume_point(result.done.batches)}: `resume={path}` or `resume=auto`)")
    dist_utils.barrier(run.info)
    return 128 + signum


def resume_point(batches: int) -> str:
    """Where a recovery file's resume goes on in its epoch, ``batches`` trained (`EpochProgress.batches`): "after
    batch 3" after "stopped ... at epoch 0 step 3" (steps count from 0) read as if step 3 were trained, and it is the
    first batch the resume trains."""
    return f"after the epoch's first {plural(batches, 'batch', 'batches')}" if batches else "from the epoch's beginning"


def training_checkpoint(model: nn.Module, optimizer, scaler, cfg, epoch: int, complete: bool, step: int, metric,
                        rng_states, **described) -> dict:
    """The keys every training checkpoint holds, classification's (:func:`checkpoint_state`) and segmentation's:
    ``version``, what the model is (``described``: e.g. ``arch`` or ``segmenter``, ``class_names``, ``data_config``),
    the weights, optimizer and scaler state, the position a resume starts from (``epoch``, ``epoch_complete``,
    ``step``), the epoch's ``metric``, the run's settings (``args``) and every process's ``rng_state``."""
    return {
        "version": CHECKPOINT_VERSION,
        **described,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "epoch_complete": complete,
        "step": step,
        "metric": metric,
        "args": run_args(cfg),
        "rng_state": rng_states,
    }


def checkpoint_state(run: TrainingRun, epoch: int, complete: bool, step: int, metric, rng_states) -> dict:
    model, opt = run.model, run.opt
    recorded = architecture_recorded(model)
    state = training_checkpoint(
        model, opt.optimizer, opt.scaler, run.cfg, epoch, complete, step, metric, rng_states,
        arch=model.model_name if recorded else None,
        model_kwargs=plain(model.model_kwargs) if recorded else None,
        class_names=list(run.class_names),
        data_config=plain(run.loaders.data_config),
        eval_amp_dtype=dtype_name(opt.amp_dtype),
        probabilities="sigmoid" if run.cfg.bce_loss else "softmax",  # the loss it trains: predict's probabilities
        data=evaluated_data(run.cfg, run.state, run.loaders.eval),
        scheduler=opt.scheduler.state_dict() if opt.scheduler is not None else None)
    if not recorded:  # loading it by name (validate, predict, resume without the module) says so
        state["architecture"] = (f"the weights of a {type(model).__module__}.{type(model).__qualname__} given to "
                                 f"sequencer.train; its architecture is not recorded: load state_dict into that "
                                 f"module")
    if opt.model_ema is not None:
        state["state_dict_ema"] = opt.model_ema.module.state_dict()
    state["evaluated_weights"] = evaluated_weights(opt, run.info.device)  # a resume says when this changes
    if run.ignored_classes:
        state["ignored_classes"] = list(run.ignored_classes)
    return state


def skipped_note(loader, info: dist_utils.DistInfo) -> str:
    """Unreadable training images of the epoch (every rank's), for the end of its log line ("" when none); every
    rank calls it."""
    from .evaluate import unreadable_skipped

    skipped = unreadable_skipped(loader, info.distributed)
    return f"; skipped {skipped} unreadable training image{'s' if skipped != 1 else ''}" if skipped else ""
