"""Stop requests of a training run: SIGTERM/SIGINT noted as a flag that the training loop reads at its next step
(it saves a recovery checkpoint and exits), or, past an epoch's last step, once that epoch is saved, agreed by every rank, and a library call's SIGTERM handed back to the
caller."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from . import distributed as dist_utils
from .config import RunState

_logger = logging.getLogger(__name__)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the training loop saves a recovery checkpoint at the next step and exits, or, once
    the epoch's last step has passed (``finishing_epoch``: its evaluation, saving, callbacks), exits after the epoch's
    checkpoint (:func:`stopped_after_epochs`).

    A second SIGINT while stopping raises KeyboardInterrupt as usual (atomic writes keep files intact). A library
    entry point's run (``state.caller_sigterm``) leaves SIGTERM to the caller: ignored (SIG_IGN) it is not caught,
    and one caught is noted in ``state.sigterm_caught`` for :func:`hand_sigterm_to_caller`.
    """

    def __init__(self, state: RunState | None = None):
        self.received = 0  # the signal this process's handler took
        self.signum = 0  # the signal every rank agreed to stop by (`agreed`): what the run stops and exits by
        # the epoch whose training steps have all passed their stop check (the loops set it, None again once the
        # run goes on to the next epoch, `loop.epoch_ends_run`): a signal now stops the run after that epoch's
        # evaluation, checkpoint and callbacks, not at a step with a recovery checkpoint
        self.finishing_epoch: int | None = None
        self._state = state
        self._previous = {}
        self._pid = os.getpid()

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:
            # a process forked while the run holds the handler (a DataLoader worker) inherits it; Ctrl-C reaches the
            # whole process group, and only the run's own process stops (shutting its workers down): each worker
            # used to repeat the warning below
            return
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if signum == signal.SIGTERM and self._state is not None:
            self._state.sigterm_caught = True
        _logger.warning(f"received {signal.Signals(signum).name}: {self._what_happens_next()}")

    def _what_happens_next(self) -> str:
        if self.finishing_epoch is None:
            return "stopping at the next step with a recovery checkpoint"
        # the signal was said to stop "at the next step with a recovery checkpoint" here too (during evaluation),
        # though the run finished the epoch, saved it and wrote no recovery file
        return (f"stopping once epoch {self.finishing_epoch} is finished and saved in last.pth.tar (no recovery "
                f"checkpoint)")

    def agreed(self, info: dist_utils.DistInfo) -> int:
        """The signal any rank was asked to stop by (0: none), adopted by this rank; every rank calls it at the
        same point, so all stop there together, also when the signal reached one node only (its torchrun agent
        was stopped): the others would go on and wait for it in the next collective."""
        return self.agreed_with(info)[0]

    def agreed_with(self, info: dist_utils.DistInfo, *flags: bool) -> tuple[int, ...]:
        """:meth:`agreed`, and whether any rank raised each of ``flags``, in the same one all-reduce:
        (signal, flag, ...)."""
        asked, *raised = dist_utils.all_reduce_max([float(self.received), *map(float, flags)], info)
        # the all-reduced value alone decides: a signal handled while this rank waited in the collective (or since)
        # was not in the value it sent, and deciding on it here made this rank stop while its peers went on into
        # DDP's backward, each waiting for the other until torchrun killed both (no recovery checkpoint)
        self.signum = self.signum or int(asked)
        return (self.signum, *(bool(r) for r in raised))

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and self._caller_ignores_sigterm():
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _caller_ignores_sigterm(self) -> bool:
        return (self._state is not None and self._state.caller_sigterm
                and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)


def stopped_after_epochs(stop: StopRequest, info: dist_utils.DistInfo, epoch: int, num_epochs: int,
                         folder: Path) -> tuple[int, bool]:
    """Once the run's epochs ended at ``epoch`` (saved) and ``stop``'s handlers are restored: (128 + the signal any
    rank took since that epoch's last training step, whether epochs are left to resume), saying where a resume goes
    on, or, the epoch being the run's last, that nothing is left (it said "resume with ...", and the resume found
    nothing to do); (0, False) without one. Every rank calls (they agree). A later signal is the caller's, as it
    would be without the run."""
    signum = stop.agreed(info)
    if not signum:
        return 0, False
    if info.is_primary:
        name = signal.Signals(signum).name
        if epoch == num_epochs - 1:
            _logger.warning(f"stopped by {name} after epoch {epoch}, the run's last: the run is finished; "
                            f"checkpoints in {folder}")
        else:
            _logger.warning(f"stopped by {name} after epoch {epoch}; resume with "
                            f"`resume={folder / 'last.pth.tar'}`")
    return 128 + signum, epoch < num_epochs - 1


def hand_sigterm_to_caller(state: RunState) -> None:
    """Deliver the SIGTERM a library call's run caught again, to the caller's own disposition (restored by now):
    the default one ends the process by SIGTERM, after the recovery checkpoint; a handler of the caller's runs.
    The library's entry points call it last; the command instead exits with 128 + signal (torchrun restarts)."""
    if state.sigterm_caught:
        state.sigterm_caught = False
        signal.raise_signal(signal.SIGTERM)
