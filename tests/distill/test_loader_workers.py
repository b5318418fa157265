"""A data-loading worker that dies ends the run within seconds, naming why: killed by a signal,
raising, unable to send what it loaded (vild_d2.distill.loader, used by the precompute tools).
Each case once hung the main process forever, or could."""

import vild_d2  # noqa: F401  (first: compat bridges)

import errno
import os
import resource
import signal
import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from vild_d2.distill.loader import WorkerError, as_list, iterate_loader, make_loader

BOUND_S = 60  # loose on this shared machine; torch checks its workers every 5 s


class Items(Dataset):
    """Four (k, tensor) items; item 2 does ``fail`` in the worker."""

    def __init__(self, fail=None):
        self.fail = fail

    def __len__(self):
        return 4

    def __getitem__(self, k):
        if k == 2 and self.fail == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if k == 2 and self.fail == "raise":
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/cache.bin")
        if k == 2 and self.fail == "unpicklable":
            return k, threading.Lock()  # the worker's queue cannot pickle it
        if self.fail == "ulimit":
            # The worker may write no file above 1 KB: a tensor shared through a file in
            # /dev/shm would fail ("unable to resize file ... File too large") and hang.
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        return k, torch.full((256, 256), float(k))


def _run(fail, batch_size=None):
    loader = make_loader(Items(fail), num_workers=1, batch_size=batch_size, collate_fn=as_list)
    return [item for item in iterate_loader(loader)]


@pytest.mark.parametrize(
    "fail, error, message",
    [
        ("kill", WorkerError, r"data-loading worker died: worker 0 .* killed by signal SIGKILL"),
        ("raise", OSError, r"No space left on device"),
        ("unpicklable", WorkerError, r"worker 0 .* could not send .*(pickle|Lock)"),
    ],
)
def test_a_dying_worker_is_an_error_naming_why_within_seconds(fail, error, message):
    start = time.monotonic()
    with pytest.raises(error, match=message):
        _run(fail)
    assert time.monotonic() - start < BOUND_S


def test_items_do_not_go_through_shared_files():
    # Under a 1 KB file-size limit in the worker, 256 KB tensors still arrive (numpy through
    # the queue's pipe), equal to what was loaded.
    start = time.monotonic()
    items = _run("ulimit")
    assert [k for k, _ in items] == [0, 1, 2, 3]
    assert all(
        isinstance(t, torch.Tensor) and torch.equal(t, torch.full_like(t, k)) for k, t in items
    )
    assert time.monotonic() - start < BOUND_S


def test_without_workers_the_loader_is_torchs():
    loader = make_loader(Items(), num_workers=0, batch_size=None)
    assert [k for k, _ in iterate_loader(loader)] == [0, 1, 2, 3]
