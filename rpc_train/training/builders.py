"""Instantiate the Hydra `_target_` configs: models, optimizers, LR schedulers.

Workers receive these configs as plain dicts over RPC and build their own copies, so every
process that builds a model from the same config and seed holds identical initial weights.
"""

from typing import Iterable, Optional, Tuple

import torch
from hydra.utils import instantiate
from torch import nn


def build_model(model_cfg: dict, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = instantiate(model_cfg)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{model_cfg.get('_target_')} built a {type(model).__name__}; "
                        "rpc_train splits models by their layers, so it must be an nn.Sequential")
    return model


def build_optimizer(params: Iterable[torch.Tensor], optim_cfg: dict, scheduler_cfg: Optional[dict]
                    ) -> Tuple[torch.optim.Optimizer, Optional[torch.optim.lr_scheduler.LRScheduler]]:
    """`optim` and `scheduler` are `_partial_` configs: parameters and optimizer bind here."""
    optimizer = instantiate(optim_cfg)(list(params))
    scheduler = instantiate(scheduler_cfg)(optimizer) if scheduler_cfg else None
    return optimizer, scheduler
