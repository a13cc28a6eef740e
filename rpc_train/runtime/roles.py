"""What each rank is in a job: which worker hosts which stage, and its device maps.

Rank 0 always drives. With loader=service, ranks 1..loader.workers are data workers and the
mode's roles take the ranks after them (`role_rank`); below, "rank r" is the mode's.
Pipeline mode: rank k+1 hosts stage k, on its own device (runtime/devices.py `own_device`).
Parameter-server mode: ranks 1..ps.servers host the parameter shards and every later rank is
a trainer; hybrid mode splits the same way by hybrid.servers.
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List

from omegaconf import DictConfig

from rpc_train.config.schema import data_workers, mode_world_size, num_stages
from rpc_train.runtime.devices import chain_device_maps, local_device, own_device
from rpc_train.runtime.world import World, worker_name


def stage_device_maps(cfg: DictConfig, world: World) -> Dict[str, Dict[str, str]]:
    """Pipeline mode: this rank's device map to the next rank on the chain (every rank calls
    it: across machines the ranks exchange their devices)."""
    if cfg.mode.name != "pipeline":
        return {}  # parameter servers and trainers exchange CPU tensors only
    devices = reported_devices(world, cfg.device, cfg.runtime.rpc_timeout_s)
    return chain_device_maps(devices, world.rank, stage_ranks(cfg, world.size))


def role_rank(cfg: DictConfig, rank: int) -> int:
    """The rank that plays the mode's rank `rank`: the mode's workers come after the data workers."""
    return rank + data_workers(cfg) if rank else 0


def data_worker_names(cfg: DictConfig) -> List[str]:
    return [worker_name(rank) for rank in range(1, data_workers(cfg) + 1)]


def stage_ranks(cfg: DictConfig, world_size: int) -> List[int]:
    """Pipeline mode: the rank of each stage, in order."""
    return [role_rank(cfg, k + 1) for k in range(num_stages(cfg.pipeline, mode_world_size(cfg, world_size)))]


def reported_devices(world: World, device: str, timeout_s: float) -> List[str]:
    """Every rank's device, by rank, as each works it out for itself (`own_device`).

    The device maps are fixed when the RPC world starts, so this comes first. On one machine
    every rank sees the same GPUs and its local rank is its rank: the list needs no
    messages. Across machines, whose GPU counts may differ, the ranks gather what each
    reports through a gloo group over torchrun's rendezvous, closed again before the RPC
    world starts.
    """
    if world.local_size == world.size:
        gpus = _gpu_count() if device == "cuda" else 0
        return [local_device(device, rank, gpus) for rank in range(world.size)]
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s))
    try:
        devices: List[str] = [""] * world.size
        dist.all_gather_object(devices, own_device(device))
        return devices
    finally:
        dist.destroy_process_group()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class ParameterServerRoles:
    servers: List[str]  # worker names; server j holds shard j
    trainers: List[str]  # worker names; trainer i reads data shard i


def ps_roles(cfg: DictConfig, world_size: int) -> ParameterServerRoles:
    """Ranks 1..ps.servers serve parameter shards; the rest train (config/validate.py checks the split)."""
    return server_trainer_roles(cfg.ps.servers, world_size, role_rank(cfg, 1))


def hybrid_roles(cfg: DictConfig, world_size: int) -> ParameterServerRoles:
    """Ranks 1..hybrid.servers hold embedding shards; the rest train under DDP."""
    return server_trainer_roles(cfg.hybrid.servers, world_size, role_rank(cfg, 1))


def server_trainer_roles(servers: int, world_size: int, first: int = 1) -> ParameterServerRoles:
    """`servers` server ranks from `first` on, then trainers to the end of the world."""
    return ParameterServerRoles(
        servers=[worker_name(rank) for rank in range(first, first + servers)],
        trainers=[worker_name(rank) for rank in range(first + servers, world_size)],
    )
