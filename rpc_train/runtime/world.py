"""Who is who in the RPC world, and how many threads each process gets.

Every torchrun process becomes one RPC worker. Rank 0 is the driver; every other rank is a
worker that hosts what the driver builds on it (a pipeline stage, a parameter shard) and
otherwise only serves RPCs until the driver ends the job.
"""

import os
from dataclasses import dataclass

import torch

from rpc_train.config.schema import RuntimeConf
from rpc_train.runtime.allocator import configure_allocator
from rpc_train.runtime.interface import set_listen_interface

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
    """Threads, allocator and listening interface for this rank, before it builds anything (the
    hybrid mode's DDP group and the RPC world); returns the thread count."""
    configure_allocator(runtime)
    set_listen_interface(runtime.interface, one_machine=world.local_size == world.size)
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
