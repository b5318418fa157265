"""A DataLoader whose worker failures end the run within seconds, naming the cause.

torch's DataLoader notices a worker that exits (killed by a signal, or crashed) and re-raises an
exception a worker raises, but not an item a worker fails to *send*: the worker's queue
pickles it in a background thread, and a failure there (a tensor shared through a file in
/dev/shm on a full /dev/shm or under ``ulimit -f``: "unable to resize file ... File too large";
an object that cannot be pickled) is printed and the item dropped. The worker lives on, idle,
and the main process waits for that item forever.

Here: (1) tensors travel as numpy arrays, pickled through the queue's pipe, not as shared
files, so the file-size limit and /dev/shm's size do not apply; (2) a failure to send anything
ends the worker at once (``os._exit``) after writing the cause to a pipe of its own; the main
process (torch's liveness check runs every 5 s) raises :class:`WorkerError` with that cause.
"""

import multiprocessing
import multiprocessing.queues
import os
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["WorkerError", "as_list", "iterate_loader", "make_loader"]

_SEND_FAILED = 3  # a worker's exit status when it could not send an item


class WorkerError(RuntimeError):
    """A data-loading worker died: killed, crashed, or unable to send what it loaded."""


class _Array:
    """A tensor on its way from a worker, as numpy (pickled bytes, no shared file)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        return _Array(obj.numpy())
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _to_torch(obj):
    if isinstance(obj, _Array):
        return torch.from_numpy(obj.array)
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


class _Collate:
    """The loader's collate_fn, then tensors as numpy (runs in the worker)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        return _to_numpy(self.collate_fn(batch))


class _WorkerInit:
    """Runs first in each worker: a failure to send an item ends the worker, cause reported."""

    def __init__(self, causes):
        self.causes = causes  # a SimpleQueue: written synchronously, no background thread

    def __call__(self, worker_id: int) -> None:
        causes = self.causes

        def on_send_error(e, obj):
            try:
                causes.put(
                    f"worker {worker_id} (pid {os.getpid()}) could not send what it loaded to "
                    f"the main process: {type(e).__name__}: {e}"
                )
            finally:
                os._exit(_SEND_FAILED)

        # The queue's feeder thread calls this hook on a pickling/sending error (by default
        # it prints and drops the item). Patched in this worker process only.
        multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(on_send_error)


def as_list(batch):
    """A collate_fn that keeps the batch a list (module-level: picklable by spawned workers)."""
    return batch


def make_loader(dataset, *, num_workers: int = 0, collate_fn=None, **kwargs) -> DataLoader:
    """A ``DataLoader`` (same arguments) for :func:`iterate_loader`: with workers, items come
    back as numpy-backed tensors and a worker that cannot send one dies with a cause."""
    if collate_fn is None:
        collate_fn = as_list if kwargs.get("batch_size", 1) is None else None
    if num_workers == 0:
        return DataLoader(dataset, num_workers=0, collate_fn=collate_fn, **kwargs)
    from torch.utils.data import default_collate

    causes = multiprocessing.SimpleQueue()
    loader = DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=_Collate(collate_fn or default_collate),
        worker_init_fn=_WorkerInit(causes),
        **kwargs,
    )
    loader._vild_causes = causes
    return loader


def iterate_loader(loader: DataLoader) -> Iterator:
    """Iterate ``loader`` (from :func:`make_loader`); a dead worker raises :class:`WorkerError`
    naming why (its exception, the signal that killed it, or what it could not send)."""
    causes = getattr(loader, "_vild_causes", None)
    if causes is None:
        yield from loader
        return
    iterator = iter(loader)
    try:
        for item in iterator:
            yield _to_torch(item)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e) or isinstance(e, WorkerError):
            raise
        why = []
        while not causes.empty():
            try:
                why.append(causes.get())
            except (EOFError, OSError):  # pragma: no cover - the pipe closed under us
                break
        why = why or _exit_statuses(iterator) or [str(e).splitlines()[0]]
        raise WorkerError(f"a data-loading worker died: {'; '.join(why)}") from e


def _exit_statuses(iterator) -> list:
    """How the iterator's dead workers ended ("killed by signal SIGKILL", "exit status 1")."""
    out = []
    for worker_id, w in enumerate(getattr(iterator, "_workers", [])):
        code = w.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            hint = " (SIGKILL: often the out-of-memory killer, see dmesg)" if code == -9 else ""
            out.append(f"worker {worker_id} (pid {w.pid}) was killed by signal {name}{hint}")
        else:
            out.append(f"worker {worker_id} (pid {w.pid}) exited with status {code}")
    return out
