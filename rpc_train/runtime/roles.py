"""What each rank is in a job: which worker hosts which stage, and its device maps.

Pipeline mode: rank k+1 hosts stage k. Parameter-server mode: ranks 1..ps.servers host the
parameter shards and every later rank is a trainer; hybrid mode splits the same way by
hybrid.servers. Rank 0 always drives.
"""

from dataclasses import dataclass
from typing import Dict, List

from omegaconf import DictConfig

from rpc_train.config.schema import num_stages
from rpc_train.runtime.devices import pipeline_device_maps
from rpc_train.runtime.world import World, worker_name


def stage_of(world: World, cfg: DictConfig):
    """The pipeline stage this rank hosts (rank k+1 hosts stage k), or None."""
    k = num_stages(cfg.pipeline, world.size)
    return world.rank - 1 if 1 <= world.rank <= k else None


def stage_device_maps(cfg: DictConfig, world: World) -> Dict[str, Dict[str, str]]:
    if cfg.mode.name != "pipeline":
        return {}  # parameter servers and trainers exchange CPU tensors only
    stage = stage_of(world, cfg)
    if stage is None and not world.is_driver:
        return {}  # a rank past the last stage hosts nothing
    return pipeline_device_maps(cfg.device, stage, num_stages(cfg.pipeline, world.size), worker_name(world.rank + 1))


@dataclass(frozen=True)
class ParameterServerRoles:
    servers: List[str]  # worker names; server j holds shard j
    trainers: List[str]  # worker names; trainer i reads data shard i


def ps_roles(cfg: DictConfig, world_size: int) -> ParameterServerRoles:
    """Ranks 1..ps.servers serve parameter shards; the rest train (config/validate.py checks the split)."""
    return server_trainer_roles(cfg.ps.servers, world_size)


def hybrid_roles(cfg: DictConfig, world_size: int) -> ParameterServerRoles:
    """Ranks 1..hybrid.servers hold embedding shards; the rest train under DDP."""
    return server_trainer_roles(cfg.hybrid.servers, world_size)


def server_trainer_roles(servers: int, world_size: int) -> ParameterServerRoles:
    return ParameterServerRoles(
        servers=[worker_name(rank) for rank in range(1, servers + 1)],
        trainers=[worker_name(rank) for rank in range(servers + 1, world_size)],
    )
