"""The driver's view of a pipeline: stages on the workers, batches through them.

Per training step the driver makes one call to stage 0 with the batch and its targets
(`train_on_stage`): stage 0 splits it into micro-batches, each in its own distributed-autograd
context so its backward can start the moment its loss is known and run while other
micro-batches are still in forward or backward elsewhere (one shared context would serialise
the backward passes). The last stage computes each loss and starts its backward
(pipeline/feed.py, pipeline/stage.py). Once every backward is done, stage 0 has every stage
sum its gradients over all contexts and step, closes the contexts, and answers with the
losses and the stages' stats: the driver's one call is the whole step.

Schedules: stage 0 starts every micro-batch at once. With `gpipe` each stage runs the
forwards as they come; with `1f1b` stage k (of K) starts a forward only while fewer than K-k
micro-batches are past its forward and not yet through its backward, the textbook bound: the
last stage runs each backward straight after its forward, stage 0 holds K micro-batches'
activations. The stage enforces it (`StageWorker.max_in_flight`): a forward starts the moment
a backward ends there, with no round trip to anyone.
"""

import logging
import os
import time
from typing import Any, Dict, List

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig

from rpc_train.config.schema import as_dict
from rpc_train.data.datasets import example_inputs
from rpc_train.runtime.roles import stage_ranks
from rpc_train.pipeline.partition import plan_stages, stage_bounds
from rpc_train.pipeline.profile import RankProfiler
from rpc_train.pipeline.stage import StageWorker, evaluate_on_stage, train_on_stage
from rpc_train.pipeline.timeline import bubble_fraction, handoffs_ms
from rpc_train.runtime.devices import mps_running, own_device, shared_gpu_note
from rpc_train.runtime.remote import call_all, gather_state
from rpc_train.runtime.world import DRIVER, worker_name
from rpc_train.training.builders import build_model
from rpc_train.training.protocol import StepResult

log = logging.getLogger(__name__)


class PipelineEngine:
    """Builds the stages on workers 1..K and runs training and evaluation steps through them."""

    def __init__(self, cfg: DictConfig, world_size: int):
        """Start building the stages; `wait_ready` blocks until they are built.

        Workers build their stages (and pay torch.optim's first-use import, seconds on a small
        machine) while the driver goes on to load the data.
        """
        self.micro_batches = cfg.pipeline.micro_batches
        self.device = torch.device(own_device(cfg.device))
        ranks = stage_ranks(cfg, world_size)
        k = len(ranks)
        model_cfg = as_dict(cfg.model)
        layers = list(build_model(model_cfg, cfg.seed))
        # Timing layers needs only the shape of a micro-batch, not real data, on the stages'
        # kind of device (check_device has made sure the driver has one too).
        micro = max(1, cfg.trainer.batch_size // self.micro_batches)
        sample = example_inputs(cfg.data, micro, self.device)
        self.counts = plan_stages(layers, k, cfg.pipeline.balance, sample)
        self.workers = [worker_name(rank) for rank in ranks]
        self.stages = [
            rpc.remote(self.workers[i], StageWorker,
                       args=(i, model_cfg, bounds, as_dict(cfg.optim), as_dict(cfg.scheduler) or None,
                             cfg.device, cfg.seed, k - i if cfg.pipeline.schedule == "1f1b" else None,
                             cfg.trainer.loss, self.micro_batches))
            for i, bounds in enumerate(stage_bounds(self.counts))
        ]
        others = [(self.workers[i], i) for i in range(1, k)]  # the stages stage 0 has step
        self._connected = [
            stage.rpc_async().connect(*((self.workers[i + 1], i + 1) if i + 1 < k else (None, None)),
                                      others if i == 0 else ())
            for i, stage in enumerate(self.stages)
        ]
        self._profiler = RankProfiler()
        log.info("pipeline: %d stages on %s, layers per stage %s, %d micro-batches, %s schedule",
                 k, ", ".join(self.workers), self.counts, self.micro_batches, cfg.pipeline.schedule)
        # The driver and the stages on this machine each take a GPU by local rank.
        here = min(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), k + 1)
        note = shared_gpu_note(cfg.device, here, torch.cuda.device_count(), mps_running())
        if note:
            log.warning(note)

    def wait_ready(self) -> None:
        torch.futures.wait_all(self._connected)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        started = time.perf_counter()
        # One host-to-device copy per batch; stage 0 splits it into views.
        x, y = x.to(self.device), y.to(self.device)
        done, per_stage, step_ms = rpc.rpc_sync(self.workers[0], train_on_stage, args=(0, x, y))
        loss = sum(d[0] for d in done)
        if per_stage is None:  # a non-finite loss: stage 0 had no stage step
            return StepResult(loss, 0, skipped=True)
        result = step_result(loss, sum(d[1] for d in done), per_stage, started, step_ms)
        count_messages(result.stats, per_stage, len(done))
        return result

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        loss, correct = rpc.rpc_sync(self.workers[0], evaluate_on_stage, args=(0, x.to(self.device), y.to(self.device)))
        return StepResult(loss, correct)

    # pipeline.profile_step (pipeline/profile.py): every rank's torch.profiler, this one's too.
    def start_profile(self) -> None:
        call_all(self.stages, "start_profile")
        self._profiler.start(self.device.type)

    def stop_profile(self) -> Dict[str, dict]:
        """Each rank's trace since `start_profile`, by worker name."""
        traces = {DRIVER: self._profiler.stop()}
        traces.update(zip(self.workers, call_all(self.stages, "stop_profile")))
        return traces

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's state, named as in the `models/` class, gathered from the stages."""
        return gather_state(self.stages)

    def close(self) -> None:
        """Free the stages and stage 0's micro-batch threads (for a process that builds engines anew)."""
        call_all(self.stages, "release")
        self._profiler.close()

    # Checkpoints (rpc_train/checkpoint/manager.py): every stage reads and writes its own share.
    def save_checkpoint(self, directory: str) -> List[dict]:
        """Each stage writes its file into `directory`, all at once; their manifest records."""
        return call_all(self.stages, "save_checkpoint", directory)

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Each stage loads the tensors it owns, by name, from whichever files hold them."""
        call_all(self.stages, "load_checkpoint", directory, index)

    def layout(self) -> Dict[str, Any]:
        return {"stages": len(self.stages), "layers_per_stage": list(self.counts), "workers": self.workers}


def count_messages(stats: Dict[str, float], per_stage: List[Dict[str, Any]], micro_batches: int) -> None:
    """Messages per micro-batch (its forward, backward and context cleanup, counted by the
    stages: pipeline/messages.py) and per step: those, plus the driver's call to stage 0 and
    stage 0's to each other stage to step, and their replies."""
    path = sum(s["messages"] for s in per_stage)
    stats["pipeline/messages_per_micro_batch"] = path / micro_batches
    stats["pipeline/messages_per_step"] = path + 2 * len(per_stage)


def step_result(loss: float, correct: int, per_stage: List[Dict[str, Any]], started: float,
                step_ms: float) -> StepResult:
    """A training step's result from what each stage's optimizer step returned.

    step_ms: the stages' gradient sums and optimizer steps, after the last backward. `lr` is
    the first stage's that has an optimizer; a model of parameter-free layers only has none.
    """
    stats = {"pipeline/step_ms": step_ms}
    lr = next((s["lr"] for s in per_stage if s["lr"] is not None), None)
    if lr is not None:
        stats["lr"] = lr
    for i, s in enumerate(per_stage):
        stats[f"stage{i}/forward_ms"] = s["forward_ms"]
        stats[f"stage{i}/backward_ms"] = s["backward_ms"]
        stats[f"stage{i}/page_faults"] = s["page_faults"]
        stats[f"stage{i}/peak_memory_mb"] = s["peak_memory_mb"]
    spans = [s["spans"] for s in per_stage]
    stats["pipeline/bubble_fraction"] = bubble_fraction(spans, started, time.perf_counter())
    for way, ms in handoffs_ms(spans).items():
        stats[f"pipeline/{way}_handoff_ms"] = ms
    return StepResult(loss, correct, stats, spans=spans, started=started)
