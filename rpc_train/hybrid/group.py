"""The trainers' DDP process group, created next to the RPC world on every rank.

`torch.distributed` needs a default group of the whole world before `new_group` can make one
of the trainers alone, and every rank must take part in both calls (non-members too). The
default group is gloo and only carries that setup; the trainers' group is gloo on CPU and
NCCL with device=cuda. Its timeout is runtime.rpc_timeout_s, so a trainer that stops makes
its peers' all-reduce fail within the same limit as an RPC to it would.
"""

from datetime import timedelta
from typing import List, Optional

import torch.distributed as dist

from rpc_train.config.errors import ConfigError

_GROUP: Optional[dist.ProcessGroup] = None


def trainer_ranks(first_trainer: int, world_size: int) -> List[int]:
    return list(range(first_trainer, world_size))


def check_gpus(device: str, first_trainer: int, rank: int, world_size: int, local_size: int) -> None:
    """NCCL takes one GPU per rank: with device=cuda each machine needs a GPU per trainer it runs.
    Every rank checks its own machine (torchrun gives each machine local_size ranks in order)."""
    if device != "cuda":
        return
    import torch

    node = rank // local_size
    local_trainers = sum(1 for r in range(node * local_size, min((node + 1) * local_size, world_size))
                         if r >= first_trainer)
    gpus = torch.cuda.device_count()
    if local_trainers > gpus:
        raise ConfigError(f"device=cuda: mode=hybrid runs {local_trainers} trainers on this machine but it has {gpus} "
                          "GPU(s), and NCCL takes one GPU per trainer; use fewer trainers (NPROC) or device=cpu")


def join_dense_group(device: str, first_trainer: int, rank: int, world_size: int, timeout_s: float) -> None:
    global _GROUP
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    backend = "nccl" if device == "cuda" else "gloo"
    _GROUP = dist.new_group(trainer_ranks(first_trainer, world_size), backend=backend, timeout=timeout)


def dense_group() -> dist.ProcessGroup:
    if _GROUP is None:
        raise RuntimeError("the trainers' process group does not exist: join_dense_group runs first, on every rank")
    return _GROUP


def leave_dense_group() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None
