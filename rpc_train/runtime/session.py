"""The RPC world: who is who, how many threads each process gets, start and stop.

Every torchrun process becomes one RPC worker. Rank 0 is the driver; every other rank is a
worker that hosts what the driver builds on it (a pipeline stage, a parameter shard) and
otherwise only serves RPCs until the driver ends the job.
"""

import logging
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.distributed.rpc as rpc

from rpc_train.runtime.allocator import configure_allocator
from rpc_train.config.schema import RuntimeConf
from rpc_train.runtime.liveness import ask_whereabouts, kill_if_sibling, timed_out

log = logging.getLogger(__name__)

DRIVER = "driver"


def worker_name(rank: int) -> str:
    return DRIVER if rank == 0 else f"worker{rank}"


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return worker_name(self.rank)

    @classmethod
    def from_env(cls) -> "World":
        """The layout torchrun exports; a plain `python` run is a world of one."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", 1))
        return cls(
            rank=int(env.get("RANK", 0)),
            size=size,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
        )


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_process(runtime: RuntimeConf, world: World) -> int:
    """Threads and allocator for this rank, before it builds anything; returns the thread count."""
    configure_allocator(runtime)
    return configure_threads(runtime, world)


def configure_threads(runtime: RuntimeConf, world: World) -> int:
    """Give each process its share of the cores, so the local ranks never oversubscribe them.

    The driver mostly waits on RPCs, so the workers share the cores; the driver keeps one
    thread for the loss and data. Returns the intra-op thread count that was set.
    """
    if runtime.threads > 0:
        threads = runtime.threads
    elif world.is_driver:
        threads = 1 if world.size > 1 else usable_cores()
    else:
        local_workers = world.local_size - (1 if world.rank < world.local_size else 0)
        threads = max(1, usable_cores() // max(1, local_workers))
    torch.set_num_threads(threads)
    return threads


def _quiet_torch_internals() -> None:
    # init_rpc exchanges device maps through a gloo group internally and trips torch's own
    # deprecation warning about using a Backend as a ProcessGroup; nothing we call can avoid it.
    warnings.filterwarnings("ignore", message=r"You are using a Backend .* as a ProcessGroup")


def backend_options(runtime: RuntimeConf, device_maps: Optional[Dict[str, Dict[str, str]]] = None):
    options = rpc.TensorPipeRpcBackendOptions(
        init_method="env://",
        num_worker_threads=runtime.num_worker_threads,
        rpc_timeout=runtime.rpc_timeout_s,
        _transports=list(runtime.transports),
    )
    for peer, mapping in (device_maps or {}).items():
        options.set_device_map(peer, mapping)
    return options


def set_listen_interface(runtime: RuntimeConf, world: World) -> None:
    """TensorPipe listens on loopback for one machine, on the named interface otherwise.

    RPC messages are unauthenticated pickles: they must never be reachable from outside the
    job's machines (see README, "Security").
    """
    if runtime.interface:
        os.environ["TP_SOCKET_IFNAME"] = runtime.interface
    elif world.local_size == world.size:
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")


@contextmanager
def rpc_session(runtime: RuntimeConf, world: World, device_maps=None) -> Iterator[None]:
    """init_rpc on entry; a graceful shutdown on success.

    On an exception the driver stops every worker first (see `abort_workers`) and shuts down
    without waiting, so one failing rank ends the whole job instead of leaving the others
    blocked in shutdown.
    """
    _quiet_torch_internals()
    set_listen_interface(runtime, world)
    rpc.init_rpc(world.name, rank=world.rank, world_size=world.size,
                 rpc_backend_options=backend_options(runtime, device_maps))
    workers = [worker_name(r) for r in range(1, world.size)]
    whereabouts = ask_whereabouts(workers) if world.is_driver else {}
    try:
        yield
    except BaseException as err:
        if world.is_driver:
            # Said first: once a worker exits, torchrun may end this process before it prints.
            log.error("stopping every worker after %s: %s", type(err).__name__, str(err).strip().split("\n")[0])
            abort_workers(world, whereabouts)
        rpc.shutdown(graceful=False)
        raise
    rpc.shutdown()


def _exit_soon(code: int, delay_s: float) -> None:
    # Runs on a worker's RPC thread: the timer lets this reply leave first, and lets the
    # driver exit before the workers, so torchrun reports the driver's error as the root cause.
    threading.Timer(delay_s, os._exit, args=(code,)).start()


def abort_workers(world: World, whereabouts: Optional[Dict] = None, code: int = 1, delay_s: float = 5.0) -> None:
    """Make every worker exit with `code` shortly (best effort: dead workers are skipped).

    On one machine torchrun stops the workers as soon as the driver fails; the timer is
    what ends workers on other machines. A stopped worker never answers, so the wait is
    bounded well inside `delay_s`: the driver ends first and torchrun reports its error.
    One that does not answer is killed if it runs on this machine (`liveness.kill_if_sibling`).
    """
    futures = {}
    for name in (worker_name(r) for r in range(1, world.size)):
        try:
            futures[name] = rpc.rpc_async(name, _exit_soon, args=(code, delay_s), timeout=delay_s / 2)
        except RuntimeError:  # the agent already knows this worker's connection is closed: gone
            pass
    for name, future in futures.items():
        try:
            future.wait()
        except Exception as err:  # noqa: BLE001 - gone already (what we wanted), or silent
            if timed_out(err):
                kill_if_sibling(name, (whereabouts or {}).get(name))
