"""
``launch``: detectron2's multi-process launcher, also on machines without a GPU.

detectron2 0.6's :func:`detectron2.engine.launch` asserts CUDA in each worker and hard-codes
NCCL, so ``--num-gpus 2`` cannot start on a CPU. This is the one place that bridges it: with
CUDA, it defers to detectron2's launch (NCCL, one process per GPU); without, it spawns the
processes itself with the gloo backend and sets up what detectron2's worker would
(``comm._LOCAL_PROCESS_GROUP``, a first barrier). Newer detectron2 releases choose gloo on a
CPU themselves; this file can go once the project moves to one.

On both paths it first checks what it can before starting anything (processes the machine can
serve, the rendezvous port); on the CPU path the rendezvous names the ranks that never joined.
"""

import logging
import os
import socket
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = [
    "DEFAULT_TIMEOUT",
    "LaunchArgumentError",
    "launch",
    "ProcessDiedError",
    "RendezvousError",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)  # detectron2's


class LaunchArgumentError(ValueError):
    """--num-gpus / --num-machines / --dist-url that this machine cannot run, found before any
    process starts: one line for the user, not a traceback."""


class RendezvousError(RuntimeError):
    """The processes of a distributed job could not form their process group."""


class ProcessDiedError(RuntimeError):
    """A process of the job died (killed by a signal, or exited with an error); the others were
    stopped."""


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity, e.g. under a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """
    Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``
    machines (call it on every machine), as :func:`detectron2.engine.launch`.

    Args:
        num_gpus_per_machine: processes on this machine: one per GPU; on a machine without
            CUDA, CPU processes (gloo), at most one per usable core.
        machine_rank: this machine's rank; machine 0 hosts the rendezvous at ``dist_url``.
        dist_url: ``tcp://HOST:PORT`` of machine 0, or "auto" (a free port on 127.0.0.1,
            one machine only).
        timeout: for the rendezvous and for every collective operation after it.
    Returns:
        ``main_func``'s result when it ran in this process (one process on this machine);
        None when processes were spawned.
    """
    world_size = num_machines * num_gpus_per_machine
    if num_gpus_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise LaunchArgumentError(
            f"--num-gpus {num_gpus_per_machine} --num-machines {num_machines} --machine-rank "
            f"{machine_rank}: need at least one process and machine, and 0 <= rank < machines"
        )
    _check_processes(num_gpus_per_machine)
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise LaunchArgumentError("--dist-url auto picks a port on 127.0.0.1: one machine only")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    host, port = _parse_url(dist_url)
    if machine_rank == 0:
        _check_port_free(port, dist_url)
    if torch.cuda.is_available():
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout
        )
    logger.info(f"No CUDA: {world_size} CPU processes with the gloo backend at {dist_url}")
    worker_args = (
        main_func,
        world_size,
        num_gpus_per_machine,
        machine_rank,
        host,
        port,
        args,
        timeout,
    )
    if num_gpus_per_machine == 1:
        # This machine's one process is this one: a spawned copy would only add a start-up.
        return _cpu_worker(0, *worker_args)
    try:
        mp.spawn(_cpu_worker, nprocs=num_gpus_per_machine, args=worker_args, daemon=False)
    except mp.ProcessRaisedException as e:  # a child's exception, as its traceback's text
        # A rendezvous error stays one clear line (what to check), not a child's traceback.
        line = next((x for x in str(e).splitlines() if x.startswith(_RENDEZVOUS_PREFIX)), None)
        if line is not None:
            raise RendezvousError(line[len(_RENDEZVOUS_PREFIX) :]) from None
        raise
    except mp.ProcessExitedException as e:  # killed (e.g. by the out-of-memory killer)
        rank = machine_rank * num_gpus_per_machine + e.error_index
        how = (
            f"was killed by signal {e.signal_name}"
            if e.signal_name
            else (f"exited with status {e.exit_code}")
        )
        hint = (
            " (SIGKILL: often the out-of-memory killer, see dmesg)"
            if e.signal_name == "SIGKILL"
            else ""
        )
        raise ProcessDiedError(
            f"the process of rank {rank} (pid {e.error_pid}) {how}{hint}; the other processes "
            "of this machine were stopped"
        ) from None
    return None


_RENDEZVOUS_PREFIX = f"{__name__}.RendezvousError: "


def _check_processes(per_machine: int) -> None:
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if per_machine > gpus:
            raise LaunchArgumentError(
                f"--num-gpus {per_machine} but this machine has {gpus} GPU(s): detectron2 runs "
                f"one process per GPU; use --num-gpus {gpus} or fewer (CUDA_VISIBLE_DEVICES "
                f"limits what is visible)"
            )
        return
    # More processes than cores would only take turns on them (and each holds a model copy):
    # refused rather than capped, since capping would silently change the images per process.
    cores = usable_cpus()
    if per_machine > cores:
        raise LaunchArgumentError(
            f"--num-gpus {per_machine} on a machine without CUDA starts {per_machine} CPU "
            f"processes, but this process may use {cores} core(s): use --num-gpus {cores} "
            f"or fewer"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # the OS picks; another process may still take it later
        return sock.getsockname()[1]


def _parse_url(dist_url: str):
    url = urlparse(dist_url or "")
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise LaunchArgumentError(f"--dist-url {dist_url!r}: expected tcp://HOST:PORT or 'auto'")
    return url.hostname, url.port


def _check_port_free(port: int, dist_url: str) -> None:
    """Machine 0 listens on ``port``: fail before starting any process if it cannot."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the TCPStore server will: every interface, TIME_WAIT leftovers reusable.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", port))
    except OSError as e:
        raise RendezvousError(
            f"--dist-url {dist_url}: port {port} cannot be used on this machine ({e.strerror}); "
            "another job is probably listening on it. Pick another port, or --dist-url auto "
            "on one machine."
        ) from e


# What gloo says when the other end of a collective has gone (a peer process died).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _cpu_worker(
    local_rank, main_func, world_size, per_machine, machine_rank, host, port, args, timeout
):
    rank = machine_rank * per_machine + local_rank
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes with torch's default thread count each would oversubscribe the cores.
        torch.set_num_threads(max(1, usable_cpus() // per_machine))
    store = _rendezvous(host, port, rank, world_size, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    # As detectron2's worker: the group of this machine's ranks, for comm.get_local_rank().
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        return main_func(*args)
    except RuntimeError as e:
        # A collective that failed because a peer died: let the peer's own error (the cause)
        # reach the launcher first, as spawn reports the first process that exits.
        if any(s in str(e) for s in _PEER_GONE):
            time.sleep(3)
        raise
    finally:
        comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()


def _rendezvous(host: str, port: int, rank: int, world_size: int, timeout: timedelta):
    """
    A TCPStore on machine 0 where every rank checks in; after ``timeout``, a
    :class:`RendezvousError` that names the ranks that never did (torch's own says only how
    many clients joined, and only on rank 0).
    """
    seconds = timeout.total_seconds()
    where = f"tcp://{host}:{port}"
    if rank != 0:
        # Reach machine 0 with a plain socket first: torch's TCPStore client, failing, logs
        # ~70 lines of C++ stack frames per retry before its exception.
        _wait_for_listener(host, port, rank, world_size, seconds)
    try:
        store = dist.TCPStore(
            host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
    except Exception as e:  # connection refused / timed out / address in use: open-ended
        what = f"could not listen on {where}" if rank == 0 else f"could not reach {where}"
        raise RendezvousError(
            f"rank {rank} of {world_size} {what} within {seconds:g} s ({type(e).__name__}: "
            f"{_first_line(e)}). Is machine 0 (--machine-rank 0) running, with the same "
            f"--dist-url, and is port {port} open between the machines?"
        ) from e
    store.set(f"vild_d2/joined/{rank}", "1")
    deadline = time.monotonic() + seconds
    while True:
        joined = [r for r in range(world_size) if store.check([f"vild_d2/joined/{r}"])]
        if len(joined) == world_size:
            return store
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(joined))
            raise RendezvousError(
                f"rank {rank}: {len(missing)} of {world_size} ranks never joined the process "
                f"group at {where} within {seconds:g} s: rank(s) {missing} are missing. Start "
                "every machine with the same --num-machines, --num-gpus and --dist-url and "
                "its own --machine-rank (or raise the timeout)."
            )
        time.sleep(0.05)


def _first_line(error: BaseException) -> str:
    """A torch error's message without its C++ stack frames."""
    return (str(error).strip().splitlines() or [""])[0]


def _wait_for_listener(host: str, port: int, rank: int, world_size: int, seconds: float):
    """Wait until something listens at ``host:port`` (machine 0's rendezvous), else one clear
    :class:`RendezvousError`."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rank {rank} of {world_size} could not reach machine 0 (--machine-rank 0) "
                    f"at tcp://{host}:{port} within {seconds:g} s ({e.strerror or e}): check "
                    f"that it is running with the same --dist-url, that {host} is its address "
                    f"and that port {port} is open between the machines (--dist-timeout waits "
                    "longer)"
                ) from None
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
