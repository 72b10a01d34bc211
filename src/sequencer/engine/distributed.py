"""Process-group helpers for ``torchrun`` launches (DDP: NCCL on GPUs, gloo on CPU).

A run is distributed when the caller already made a process group of more than one process (which is used as it
is, and left alive), or when torchrun's ``WORLD_SIZE`` environment variable is above 1 (a group is made, and
destroyed at the end). Multi-node training uses torchrun's rendezvous (``--nnodes``, ``--rdzv-backend c10d``,
``--rdzv-endpoint HOST:PORT``); nothing here differs between one node and many. Rank 0 is the only process that
writes files.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import SequencerError

_logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    distributed: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the group was made here, so it is destroyed here (never the caller's)

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device.

    ``device`` is "cpu", "cuda" or "cuda:N"; None picks CUDA when available. Under torchrun each process uses
    ``cuda:LOCAL_RANK``. A group the caller made is used as it is (on CUDA, with the caller's current device
    unless ``device`` names one).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return _callers_group(dev)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return DistInfo(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        # env:// reads MASTER_ADDR/MASTER_PORT (or the rendezvous torchrun set up)
        if "TORCHELASTIC_RESTART_COUNT" not in os.environ:  # not torchrun's: no earlier start left keys
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(start_prefix(store, rank, world), store),
                                    rank=rank, world_size=world, timeout=timeout)
    return DistInfo(True, dist.get_rank(), local_rank, dist.get_world_size(), dev, owns_group=True)


def start_prefix(store: dist.Store, rank: int, world_size: int) -> str:
    """The key prefix under which this start of the workers of a torchrun job makes its process group, the same
    on every rank of the start: its number among the starts of ``world_size`` ranks.

    After torchrun (--max-restarts) restarts the workers, its store still holds the keys of the previous start, and
    the new ranks read each other's dead addresses (measured: gloo's connectFullMesh fails with "Connection
    refused"; NCCL reports the same, pytorch/pytorch#167288), so each start needs keys of its own. torchrun's
    ``TORCHELASTIC_RESTART_COUNT`` does not tell starts apart across nodes: a node whose workers failed counts a
    restart, and a node whose healthy workers its agent restarted for the new round does not (measured on two c10d
    nodes, one worker killed: restart counts 1 and 0, and the ranks never met, or met only after a restart more).
    Every start of the job starts each rank once, so each rank's own count of its starts is the same on every rank.
    """
    starts = store.add(f"sequencer/starts/world_{world_size}/rank_{rank}", 1)
    return f"sequencer/world_{world_size}/start_{starts}"


def rank_before_joining() -> int:
    """This process's global rank, known before the run joins its process group: the caller's group's, else
    torchrun's ``RANK``, else 0 (one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _callers_group(dev: torch.device) -> DistInfo:
    world_size = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return DistInfo(world_size > 1, dist.get_rank(), local_rank, world_size, dev)


def print_on_primary(info: DistInfo, *msg) -> None:
    """Log ``msg`` (INFO, the "sequencer" logger) on rank 0 only."""
    if info.is_primary:
        _logger.info(" ".join(str(m) for m in msg))


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if this library made it (a caller's group stays)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class PeerGone(RuntimeError):
    """Another rank of the run failed (and says why itself); this rank stops. ``exit_status``: what a command
    exits with, so that the launch reports the other rank's status."""
    exit_status = 1


@contextlib.contextmanager
def process_group(device: str | None = None):
    """``with process_group(device) as info:`` :func:`init_distributed`, torn down on the way out (only a group
    made here; a caller's group is left as it was).

    On a normal exit every rank first waits for the others: a rank that destroyed the group while a peer still
    used it made the peer's gloo threads abort at exit (seen once: SIGABRT, "terminate called without an active
    exception"). On an exception there is no waiting, since a peer may be gone. A collective that failed because
    a peer is gone, that last wait included, is raised as :class:`PeerGone`.
    """
    info = init_distributed(device)
    try:
        yield info
        barrier(info)
    except BaseException as e:
        cleanup(info)
        if info.distributed and _peer_is_gone(e):
            raise PeerGone(f"another process of the run stopped ({e})") from None
        raise
    cleanup(info)


# the exit status of a rank that stopped because another failed: the launch reports the other's status
PEER_GONE_EXIT = PeerGone.exit_status
# what gloo (and NCCL) say when the rank at the other end of a collective has exited
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def _peer_is_gone(error: BaseException) -> bool:
    return isinstance(error, (RuntimeError, dist.DistError)) and any(m in str(error) for m in _PEER_GONE)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise max over ranks (used to agree on stop flags); a no-op outside DDP."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean over ranks; a no-op outside DDP."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def has_running_stats(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps running statistics (BatchNorm's ``running_mean``/``running_var``), which each rank
    updates from its own batches."""
    return any(name.endswith(("running_mean", "running_var")) for name, _ in model.named_buffers())


def sync_running_stats(model: torch.nn.Module, mode: str, info: DistInfo) -> None:
    """Give every rank the same BatchNorm running statistics before an evaluation (timm's ``--dist-bn``):
    ``"reduce"`` (also ``""``, timm's default) their mean over the ranks, ``"broadcast"`` rank 0's. DDP keeps the
    weights equal, not these buffers: without this each rank scores its share of the held-out split with its own
    statistics, and the logged numbers are of no single model (not of the checkpoint, rank 0's). A no-op outside
    DDP or without running statistics."""
    if not info.distributed or not has_running_stats(model):
        return
    from timm.utils import distribute_bn
    distribute_bn(model, info.world_size, reduce=mode != "broadcast")


def broadcast_weights(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers of ``model``, in place. A model built by name is initialised
    from each rank's own seed; DDP syncs the weights it trains only when it wraps them, after the run's EMA copy
    (``--model-ema``) was taken, which then started from each rank's own weights: the EMA evaluated on a rank's
    share of the held-out split was not the one the checkpoint saves (rank 0's). A no-op outside DDP."""
    if not info.distributed:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            sent = tensor if tensor.is_contiguous() else tensor.contiguous()  # channels-last weights
            dist.broadcast(sent, src=0)
            if sent is not tensor:
                tensor.copy_(sent)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. the experiment folder name, which holds a timestamp)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same_data(info: DistInfo, train_images: int, held_out_images: int | None, class_names: list[str]) -> None:
    """SequencerError on every rank where a rank's copy of the data differs from rank 0's (one all-gather; a no-op
    outside DDP). Every rank reads the data itself, and on nodes without a shared filesystem each reads its own
    copy: one with other files cut the epoch into another number of batches, and its rank went on to its next
    all-reduce while the others had ended the epoch (both waiting out gloo's 30 minutes); one with a class folder
    more or less labelled the images by other classes, training without a word. ``held_out_images``: None without
    a held-out split."""
    if not info.distributed:
        return
    mine = (train_images, held_out_images, list(class_names))
    found = all_gather_object(mine, info)
    for rank, theirs in enumerate(found):
        if theirs != found[0]:
            raise SequencerError(f"the processes read different data: {_data_difference(found[0], theirs, rank)}",
                                 hint="give every node the same copy of the data")


def _data_difference(first: tuple, other: tuple, rank: int) -> str:
    """What differs between rank 0's data and rank ``rank``'s (``check_same_data``'s tuples), in words."""
    names = ("training images", "held-out images")
    counts = [f"{a} {name} on rank 0, {b} on rank {rank}" for name, a, b in zip(names, first, other) if a != b]
    classes, theirs = first[2], other[2]
    if len(classes) != len(theirs):
        counts.append(f"{len(classes)} classes on rank 0, {len(theirs)} on rank {rank}")
    elif classes != theirs:
        i = next(i for i, (a, b) in enumerate(zip(classes, theirs)) if a != b)
        counts.append(f"class {i} is {classes[i]!r} on rank 0, {theirs[i]!r} on rank {rank}")
    return "; ".join(counts)


# Set by launch() for its workers. The first rank to fail in its own right writes its exit status there: torchrun
# may see a peer that merely lost that rank exit first, and stop the failing rank with SIGTERM while it is exiting.
FAILURE_FILE_ENV = "SEQUENCER_LAUNCH_FAILURE_FILE"


def record_own_failure(exit_status: int) -> None:
    """Tell launch() this rank's exit status, unless another rank of this node already failed first."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # another rank was first (or the launcher is gone): its status stands
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(exit_status))


def _recorded_failure(path: str) -> int | None:
    try:
        return int(open(path).read())
    except (OSError, ValueError):
        return None


def _launch_exit_status(error, failure_file: str) -> int:
    recorded = _recorded_failure(failure_file)
    if recorded is not None:
        return recorded
    failures = sorted(error.failures.values(), key=lambda f: f.timestamp)
    # the rank that failed first in its own right, not one that merely lost its peer or was stopped by torchrun
    own = [f.exitcode for f in failures if f.exitcode not in (PEER_GONE_EXIT, -signal.SIGTERM)]
    code = (own or [f.exitcode for f in failures])[0]
    return 128 - code if code < 0 else (code or 1)


def launch(argv: list[str] | None = None) -> int:
    """torchrun (``torch.distributed.run``) as ``distributed_train.sh`` uses it, but failing the way one process does.

    torchrun answers a failed worker with its own traceback and a report per rank, after each worker's own error
    line, and a Ctrl-C with a traceback and exit status 1. Here a failed worker ends the launch with that worker's
    exit status (the first failure's; a worker killed by signal N gives 128+N) and no launcher traceback, and a
    signal to the launcher (Ctrl-C: SIGINT) ends it with 128+signal once torchrun has stopped the workers (which
    save a recovery checkpoint on SIGINT/SIGTERM).
    """
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in list(logging.root.manager.loggerDict):  # its per-rank failure reports repeat the workers' lines
        if name.startswith("torch.distributed.elastic") and os.environ.get("LOGLEVEL") is None:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    status_dir = tempfile.mkdtemp(prefix="sequencer-launch-")
    os.environ[FAILURE_FILE_ENV] = os.path.join(status_dir, "exit-status")  # the workers inherit it
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        return _launch_exit_status(e, os.environ[FAILURE_FILE_ENV])
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        os.environ.pop(FAILURE_FILE_ENV, None)
        shutil.rmtree(status_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(launch())
