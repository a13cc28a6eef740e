"""Single-process training of the same model and data: the reference the pipeline must match.

Used by the equivalence tests and as the baseline row of the benchmarks.
"""

import math
from typing import Dict

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from rpc_train.training.builders import build_model, build_optimizer
from rpc_train.pipeline.engine import StepResult


class LocalEngine:
    def __init__(self, cfg: DictConfig, device: str = "cpu"):
        container = OmegaConf.to_container(cfg, resolve=True)
        self.device = torch.device(device)
        self.model = build_model(container["model"], cfg.seed).to(self.device)
        self.optimizer, self.scheduler = build_optimizer(
            self.model.parameters(), container["optim"], container.get("scheduler") or None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if not math.isfinite(loss.item()):
            return StepResult(loss.item(), 0, skipped=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        correct = int((logits.argmax(1) == y).sum())
        return StepResult(loss.item(), correct, {"lr": self.optimizer.param_groups[0]["lr"]})

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = x.to(self.device), y.to(self.device)
        self.model.eval()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, reduction="sum").item()
        return StepResult(loss, int((logits.argmax(1) == y).sum()))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
