"""The reference every distributed run is compared with: the same config trained in one process."""

from typing import Dict, List

import torch

from rpc_train.config.compose import compose
from rpc_train.data.datasets import make_loaders
from rpc_train.training.local import LocalEngine
from rpc_train.training.loop import Trainer


def train_locally(overrides: List[str], device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Train `overrides`' config in this process, no RPC, one batch at a time; its final state."""
    cfg = compose(overrides)
    torch.manual_seed(cfg.seed)
    train_loader, val_loader = make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed)
    engine = LocalEngine(cfg, device)
    Trainer(engine, train_loader, val_loader, cfg.trainer).fit()
    return engine.state_dict()


def initial_state(overrides: List[str]) -> Dict[str, torch.Tensor]:
    """The untrained model of that config, to show that the compared run trained at all."""
    return LocalEngine(compose(overrides)).state_dict()
