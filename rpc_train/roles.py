"""What each rank is in a job: which worker hosts which stage, and its device maps."""

from typing import Dict

from omegaconf import DictConfig

from rpc_train.devices import pipeline_device_maps
from rpc_train.pipeline import num_stages
from rpc_train.runtime import World, worker_name


def stage_of(world: World, cfg: DictConfig):
    """The pipeline stage this rank hosts (rank k+1 hosts stage k), or None."""
    k = num_stages(cfg, world.size)
    return world.rank - 1 if 1 <= world.rank <= k else None


def stage_device_maps(cfg: DictConfig, world: World) -> Dict[str, Dict[str, str]]:
    stage = stage_of(world, cfg)
    if stage is None:
        return {}
    return pipeline_device_maps(cfg.device, stage, num_stages(cfg, world.size), worker_name(world.rank + 1))
