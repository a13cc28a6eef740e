"""The driver's view of a pipeline: stages on the workers, micro-batches through them.

Each micro-batch gets its own distributed-autograd context, so its backward pass can start
the moment its loss is known and run while other micro-batches are still in forward or
backward elsewhere (one shared context would serialise the backward passes). A driver
thread per micro-batch carries its context: issue the forward, compute the loss, run the
backward. The stages then sum their gradients over all contexts and step: one RPC per stage.

Schedules: the driver sends every micro-batch at once. With `gpipe` each stage runs the
forwards as they come; with `1f1b` a stage starts a forward only while fewer than K
micro-batches are past its forward and not yet through its backward, so it holds at most K
micro-batches' activations. The stage enforces it (`StageWorker.max_in_flight`): a forward
starts the moment a backward ends there, with no round trip to the driver. (Textbook 1F1B
lets stage k hold K - k; here the loss is on the driver, one hop past the last stage, and
a last stage allowed one micro-batch would idle through every round trip to it.)
"""

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from omegaconf import DictConfig

from rpc_train.config.schema import as_dict, num_stages
from rpc_train.pipeline.messages import context_messages
from rpc_train.pipeline.partition import plan_stages, stage_bounds
from rpc_train.pipeline.stage import StageWorker, forward_on_stage
from rpc_train.pipeline.timeline import bubble_fraction
from rpc_train.runtime.devices import bind_cuda_context, driver_device, mps_running, shared_gpu_note, stage_device
from rpc_train.runtime.remote import call_all, gather_state
from rpc_train.runtime.world import worker_name
from rpc_train.training.builders import build_model
from rpc_train.training.loss import correct_of, loss_of
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
        self.device = torch.device(driver_device(cfg.device))
        k = num_stages(cfg.pipeline, world_size)
        # One thread per micro-batch: each holds its autograd context until the step.
        self._pool = ThreadPoolExecutor(self.micro_batches, thread_name_prefix="micro-batch")
        model_cfg = as_dict(cfg.model)
        layers = list(build_model(model_cfg, cfg.seed))
        # Timing layers needs only the shape of a micro-batch, not real data, on the stages'
        # kind of device (check_device has made sure the driver sees it too).
        micro = max(1, cfg.trainer.batch_size // self.micro_batches)
        sample = torch.randn(micro, *cfg.data.shape, device=stage_device(cfg.device, 0))
        self.counts = plan_stages(layers, k, cfg.pipeline.balance, sample)
        self.workers = [worker_name(rank) for rank in range(1, k + 1)]
        self.stages = [
            rpc.remote(self.workers[i], StageWorker,
                       args=(i, model_cfg, bounds, as_dict(cfg.optim), as_dict(cfg.scheduler) or None,
                             stage_device(cfg.device, i), cfg.seed, k if cfg.pipeline.schedule == "1f1b" else None))
            for i, bounds in enumerate(stage_bounds(self.counts))
        ]
        self._connected = [
            stage.rpc_async().connect(*((self.workers[i + 1], i + 1) if i + 1 < k else (None, None)))
            for i, stage in enumerate(self.stages)
        ]
        self._seq = 0
        log.info("pipeline: %d stages on %s, layers per stage %s, %d micro-batches, %s schedule",
                 k, ", ".join(self.workers), self.counts, self.micro_batches, cfg.pipeline.schedule)
        note = shared_gpu_note(cfg.device, k, torch.cuda.device_count(), mps_running())
        if note:
            log.warning(note)

    def wait_ready(self) -> None:
        torch.futures.wait_all(self._connected)

    def _forward_all(self, x: torch.Tensor, training: bool) -> List[torch.Tensor]:
        chunks = x.to(self.device).tensor_split(min(self.micro_batches, len(x)))
        return torch.futures.wait_all([rpc.rpc_async(self.workers[0], forward_on_stage,
                                                     args=(0, self.take_seq(), chunk, training))
                                       for chunk in chunks])

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        started = time.perf_counter()
        # One host-to-device copy per batch; the micro-batches are views of it.
        x, y = x.to(self.device), y.to(self.device)
        release = threading.Event()
        try:
            reports = [self.submit_micro_batch(cx, cy, len(y), release)
                       for cx, cy in zip(x.tensor_split(self.micro_batches), y.tensor_split(self.micro_batches))]
            done = [report.result() for report in reports]
            loss = sum(d[1] for d in done)
            if not math.isfinite(loss):
                call_all(self.stages, "drop_stats")
                return StepResult(loss, 0, skipped=True)
            contexts = [d[0] for d in done]
            stepping = time.perf_counter()
            per_stage = call_all(self.stages, "step", contexts)
            step_ms = 1e3 * (time.perf_counter() - stepping)
        finally:
            release.set()  # the contexts may close now: the stages have read their gradients
        result = step_result(loss, sum(d[2] for d in done), per_stage, started, step_ms)
        count_messages(result.stats, sum(d[3] for d in done), per_stage, len(done))
        return result

    def take_seq(self) -> int:
        """The next micro-batch's sequence number: stages run micro-batches in this order."""
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def submit_micro_batch(self, x: torch.Tensor, y: torch.Tensor, batch: int, release: threading.Event) -> Future:
        """Start one training micro-batch on a micro-batch thread; its Future gives (context id,
        loss, correct) once its backward is done. Its context stays open until `release` is set.
        `batch`: the whole batch's size, which the summed loss is divided by."""
        report: Future = Future()
        self._pool.submit(self._micro_batch, self.take_seq(), x, y, batch, release, report)
        return report

    def _micro_batch(self, seq, x, y, batch, release, report: Future) -> None:
        """One micro-batch's forward, loss and backward, in its own autograd context.

        Reports (context id, loss, correct) once its backward is done, then keeps the context
        open until the stages have stepped, since closing it frees the gradients.
        """
        try:
            bind_cuda_context(self.device)
            with dist_autograd.context() as context_id:
                out = rpc.rpc_sync(self.workers[0], forward_on_stage, args=(0, seq, x, True))
                # Summed, then divided by the whole batch: the micro-batches' losses add up
                # to the batch's mean loss, so gradients match one pass over the batch.
                loss = loss_of(out, y, reduction="sum") / batch
                # Even for a non-finite loss (the step is then dropped, not applied): with
                # 1f1b, later forwards wait at each stage for this backward to end there.
                dist_autograd.backward(context_id, [loss])
                report.set_result((context_id, loss.item(), correct_of(out, y), context_messages(context_id)))
                release.wait()
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            if not report.done():
                report.set_exception(err)

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = torch.cat(self._forward_all(x, training=False))
        y = y.to(self.device)
        return StepResult(loss_of(logits, y, reduction="sum").item(), correct_of(logits, y))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's state, named as in the `models/` class, gathered from the stages."""
        return gather_state(self.stages)

    def close(self) -> None:
        """Free the micro-batch threads and the stages (for a process that builds engines anew)."""
        self._pool.shutdown(wait=True)
        call_all(self.stages, "release")

    # Checkpoints (rpc_train/checkpoint/manager.py): every stage reads and writes its own share.
    def save_checkpoint(self, directory: str) -> List[dict]:
        """Each stage writes its file into `directory`, all at once; their manifest records."""
        return call_all(self.stages, "save_checkpoint", directory)

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Each stage loads the tensors it owns, by name, from whichever files hold them."""
        call_all(self.stages, "load_checkpoint", directory, index)

    def layout(self) -> Dict[str, Any]:
        return {"stages": len(self.stages), "layers_per_stage": list(self.counts), "workers": self.workers}


def count_messages(stats: Dict[str, float], driver: int, per_stage: List[Dict[str, Any]], micro_batches: int) -> None:
    """Messages per micro-batch (its forward, backward and context cleanup, counted by every
    process: pipeline/messages.py) and per step (those, plus an optimizer-step call and its
    reply per stage)."""
    path = driver + sum(s["messages"] for s in per_stage)
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
    spans = [s["spans"] for s in per_stage]
    stats["pipeline/bubble_fraction"] = bubble_fraction(spans, started, time.perf_counter())
    return StepResult(loss, correct, stats, spans=spans, started=started)
