"""The worker processes of the loaders a library call makes end with the call, returned or raised.

A loader with workers keeps them across passes (``persistent_workers``), and they live as long as the loader does.
When a call returns, its loaders are freed and their workers end. When it raises, the exception's traceback holds
the call's frames and so its loaders: a notebook keeps the last one (``sys.last_value``), a sweep that collects its
failures keeps them all, and each held loader kept its worker processes, their pipes and the threads feeding them.
:func:`workers_stopped_on_exit` stops them when the call ends; the loaders stay usable (a next pass starts new
workers).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref

from torch.utils.data import DataLoader

_made: contextvars.ContextVar[list | None] = contextvars.ContextVar("sequencer_loaders_made", default=None)


def track(loader: DataLoader) -> None:
    """Note ``loader`` as made inside the current :func:`workers_stopped_on_exit` (weakly: it is not kept alive)."""
    made = _made.get()
    if made is not None:
        made.append(weakref.ref(loader))


def stop_workers(loader: DataLoader) -> None:
    """End ``loader``'s persistent worker processes now; its next pass starts new ones."""
    # the DataLoader keeps a persistent-workers iterator in ``_iterator`` and ends its workers in
    # ``_shutdown_workers`` (what its ``__del__`` calls); torch has no public name for either
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@contextlib.contextmanager
def workers_stopped_on_exit():
    """Stop the worker processes of every loader made in the body (in this thread or task) when the body ends,
    also when it raises; usable as a decorator."""
    made: list = []
    token = _made.set(made)
    try:
        yield
    finally:
        _made.reset(token)
        for ref in made:
            loader = ref()
            if loader is not None:
                stop_workers(loader)
