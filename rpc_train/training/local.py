"""Single-process training of the same model and data: the reference the pipeline must match.

Used by the equivalence tests, by the parameter-server driver for validation, and as the
baseline row of the benchmarks.
"""

import math
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf

from rpc_train.checkpoint.shares import load_worker_state, save_worker_state
from rpc_train.training.builders import build_model, build_optimizer
from rpc_train.training.loss import correct_of, loss_of
from rpc_train.training.protocol import StepResult

CHECKPOINT_FILE = "local.pt"


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
        loss = loss_of(logits, y)
        if not math.isfinite(loss.item()):
            return StepResult(loss.item(), 0, skipped=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return StepResult(loss.item(), correct_of(logits, y), {"lr": self.optimizer.param_groups[0]["lr"]})

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = x.to(self.device), y.to(self.device)
        self.model.eval()
        logits = self.model(x)
        return StepResult(loss_of(logits, y, reduction="sum").item(), correct_of(logits, y))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    # Checkpoints in the format the distributed engines write, so either can resume the other.
    def _param_names(self) -> List[str]:
        return [name for name, _ in self.model.named_parameters()]

    def save_checkpoint(self, directory: str) -> List[dict]:
        return [save_worker_state(directory, CHECKPOINT_FILE, self.state_dict(), self.optimizer,
                                  self._param_names(), self.scheduler, ["local"])]

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        tensors = load_worker_state(directory, index, list(self.model.state_dict()), self.optimizer,
                                    self._param_names(), self.scheduler, ["local"])
        self.model.load_state_dict(tensors)

    def layout(self) -> Dict[str, Any]:
        return {"processes": 1}
