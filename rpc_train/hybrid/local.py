"""The DLRM trained in one process, no RPC: the reference mode=hybrid is tested against, and the
benchmark's baseline. Same optimizers as the hybrid job: `optim` for the dense part,
`hybrid.embedding_optim` for the tables (their gradients sparse, as the servers' are).
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rpc_train.config.schema import as_dict
from rpc_train.data.clicks import load_clicks
from rpc_train.hybrid.evaluate import evaluate_clicks
from rpc_train.hybrid.model import build_dlrm
from rpc_train.hybrid.optim import build_embedding_optimizer
from rpc_train.training.builders import build_optimizer


class LocalClickEngine:
    def __init__(self, cfg: DictConfig):
        self.model = build_dlrm(as_dict(cfg.model), cfg.seed)
        for table in self.model.embeddings:
            table.sparse = True
        tables = [t.weight for t in self.model.embeddings]
        dense = [p for name, p in self.model.named_parameters() if not name.startswith("embeddings.")]
        self.optimizer, self.scheduler = build_optimizer(dense, as_dict(cfg.optim), as_dict(cfg.scheduler) or None)
        self.table_optimizer = build_embedding_optimizer(cfg.hybrid.embedding_optim, tables, cfg.hybrid.embedding_lr)

    def train_step(self, dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor) -> float:
        loss = F.binary_cross_entropy_with_logits(self.model(dense, sparse), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.table_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.table_optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.item()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def train_clicks_locally(cfg: DictConfig, batch_size: Optional[int] = None) -> tuple:
    """Train cfg's epochs (or max_steps) at `batch_size` (trainer.batch_size by default) in the
    batch order N hybrid trainers of batch_size / N see together; (final state, val metrics)."""
    batch_size = batch_size or cfg.trainer.batch_size
    train, val = load_clicks(cfg.data, cfg.seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    engine, steps = LocalClickEngine(cfg), 0
    for _ in range(cfg.trainer.epochs):
        for dense, sparse, labels in loader:
            if cfg.trainer.max_steps and steps == cfg.trainer.max_steps:
                break
            engine.train_step(dense, sparse, labels)
            steps += 1
    metrics = evaluate_clicks(engine.model.eval(), DataLoader(val, batch_size=4096))
    return engine.state_dict(), metrics
