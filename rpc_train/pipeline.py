"""The driver's view of a pipeline: stages on the workers, micro-batches through them.

Schedule: every micro-batch's forward is issued at once (stage k works on micro-batch i
while stage k+1 works on i-1), then one distributed-autograd backward over the summed loss,
then one `step` RPC per stage, all stages in parallel.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from rpc_train.builders import build_model
from rpc_train.devices import stage_device
from rpc_train.partition import plan_stages, stage_bounds
from rpc_train.runtime import worker_name
from rpc_train.stage import StageWorker, forward_on_stage

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float
    correct: int
    stats: Dict[str, float] = field(default_factory=dict)


def _as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def num_stages(cfg: DictConfig, world_size: int) -> int:
    return cfg.pipeline.stages or world_size - 1


class PipelineEngine:
    """Builds the stages on workers 1..K and runs training and evaluation steps through them."""

    def __init__(self, cfg: DictConfig, world_size: int):
        """Start building the stages; `wait_ready` blocks until they are built.

        Workers build their stages (and pay torch.optim's first-use import, seconds on a small
        machine) while the driver goes on to load the data.
        """
        self.micro_batches = cfg.pipeline.micro_batches
        k = num_stages(cfg, world_size)
        model_cfg = _as_dict(cfg.model)
        layers = list(build_model(model_cfg, cfg.seed))
        # Timing layers needs only the shape of a micro-batch, not real data.
        micro = max(1, cfg.trainer.batch_size // self.micro_batches)
        sample = torch.randn(micro, *cfg.data.shape)
        self.counts = plan_stages(layers, k, cfg.pipeline.balance, sample)
        self.workers = [worker_name(rank) for rank in range(1, k + 1)]
        self.stages = [
            rpc.remote(self.workers[i], StageWorker,
                       args=(i, model_cfg, bounds, _as_dict(cfg.optim), _as_dict(cfg.scheduler) or None,
                             stage_device(cfg.device, i), cfg.seed))
            for i, bounds in enumerate(stage_bounds(self.counts))
        ]
        self._connected = [
            stage.rpc_async().connect(*((self.workers[i + 1], i + 1) if i + 1 < k else (None, None)))
            for i, stage in enumerate(self.stages)
        ]
        self._seq = 0
        log.info("pipeline: %d stages on %s, layers per stage %s, %d micro-batches",
                 k, ", ".join(self.workers), self.counts, self.micro_batches)

    def wait_ready(self) -> None:
        torch.futures.wait_all(self._connected)

    def _forward_all(self, x: torch.Tensor, training: bool) -> List[torch.Tensor]:
        chunks = x.tensor_split(min(self.micro_batches, len(x)))
        futures = []
        for chunk in chunks:
            futures.append(rpc.rpc_async(self.workers[0], forward_on_stage,
                                         args=(0, self._seq, chunk, training)))
            self._seq += 1
        return torch.futures.wait_all(futures)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        with dist_autograd.context() as context_id:
            outputs = self._forward_all(x, training=True)
            logits = torch.cat(outputs)
            # Summed per micro-batch then divided by the whole batch: the same mean loss, and
            # so the same gradients, as one forward over the whole batch.
            loss = F.cross_entropy(logits, y, reduction="sum") / len(y)
            dist_autograd.backward(context_id, [loss])
            futures = [stage.rpc_async().step(context_id) for stage in self.stages]
            per_stage = torch.futures.wait_all(futures)
        stats = {"lr": per_stage[0]["lr"]}
        for i, s in enumerate(per_stage):
            stats[f"stage{i}/forward_ms"] = s["forward_ms"]
            stats[f"stage{i}/backward_ms"] = s["backward_ms"]
        correct = int((logits.argmax(1) == y).sum())
        return StepResult(loss.item(), correct, stats)

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = torch.cat(self._forward_all(x, training=False))
        loss = F.cross_entropy(logits, y, reduction="sum").item()
        return StepResult(loss, int((logits.argmax(1) == y).sum()))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's state, named as in the `models/` class, gathered from the stages."""
        state = {}
        for part in torch.futures.wait_all([s.rpc_async().state_dict() for s in self.stages]):
            state.update(part)
        return state
