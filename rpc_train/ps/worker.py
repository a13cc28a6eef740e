"""The trainer role: a model copy, a disjoint shard of the data, fetch-compute-push each step.

Why fetch-compute-push rather than distributed autograd over RRefs to the server-held
parameters: on loopback both take the same time per step, within the noise of a shared
machine (docs/benchmarks.md, "Parameter server"). What decides it is the message count, which
loopback hides and a network does not: here a step is one round trip per server (the push's
reply carries the updated shard, so the fetch rides on it), while distributed autograd needs
a recorded fetch, a gradient send in backward, a step call and the context release. The push
is also the one place where a server can hold a sync step (async_execution) and measure and
bound staleness, and the trainer keeps a plain nn.Module, batch-norm statistics included.
"""

import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.rpc as rpc
from hydra.utils import instantiate

from rpc_train.training.builders import build_model
from rpc_train.data.order import DataOrder
from rpc_train.loader.service import trainer_loader
from rpc_train.loader.stream import BatchLoader
from rpc_train.ps.progress import TrainerReport, record_report
from rpc_train.ps.server import PushReply, fetch_shard, push_gradients
from rpc_train.runtime.world import DRIVER
from rpc_train.training.loss import correct_of, loss_of, predictions

log = logging.getLogger(__name__)

class Shard:
    """Where one server's part of the model lives, as this trainer sees it."""

    def __init__(self, server_id: int, worker: str, params: List[str], buffers: List[str]):
        self.server_id, self.worker = server_id, worker
        self.params, self.buffers = params, buffers
        self.version = 0  # the server version this trainer's copy of the shard comes from
        self.made_by: Optional[Tuple[int, int]] = None  # (trainer, staleness) of that version's update


class TrainerWorker:
    def __init__(self, trainer_id: int, trainers: int, shards: List[Tuple[str, List[str]]],
                 model_cfg: dict, data_cfg: dict, batch_size: int, seed: int,
                 total_steps: int, log_every: int, heartbeat_s: float, step_hook: Optional[dict] = None,
                 remedy: str = "lower optim.lr", loader_cfg: Optional[dict] = None, service=None):
        """`step_hook`: the `ps.step_hook` config, a callable built here and called as
        hook(trainer_id, step) before each step (`step` counts from 1). `remedy`: the setting a
        non-finite loss's error suggests. `loader_cfg` and `service`: where the batches come
        from (loader/service.py; the data workers with loader=service)."""
        self.trainer_id = trainer_id
        self.model = build_model(model_cfg, seed).train()
        self.named = self.model.state_dict(keep_vars=True)
        self.params = dict(self.model.named_parameters())
        self.shards = [Shard(j, worker, [n for n in names if n in self.params],
                             [n for n in names if n not in self.params])
                       for j, (worker, names) in enumerate(shards)]
        self.loader = trainer_loader(data_cfg, loader_cfg or {"name": "local"}, service, batch_size, trainer_id,
                                     trainers, seed)
        self.total_steps, self.log_every, self.heartbeat_s = total_steps, log_every, heartbeat_s
        self.step = 0
        self.order = DataOrder(self.loader)
        self.report = TrainerReport(trainer_id)
        self._last_sent = time.monotonic()
        self._step_hook = instantiate(step_hook) if step_hook else None
        self._remedy = remedy
        log.info("trainer %d (pid %d): %d steps per epoch of %d samples", trainer_id, os.getpid(),
                 len(self.loader), batch_size)

    def steps_per_epoch(self) -> int:
        """Also the readiness check: it answers once the data and model are loaded."""
        self._fetch_shards()  # start from the servers' state, whatever it is
        return len(self.loader)

    def _fetch_shards(self) -> None:
        for shard in self.shards:
            version, state = rpc.rpc_sync(shard.worker, fetch_shard, args=(shard.server_id,))
            self._load(shard, version, state)

    def resume(self, step: int, loader_state: torch.Tensor, batch: int) -> None:
        """Go on from a checkpoint: `step` steps done, the next epoch's loader starts from
        `loader_state` (its generator state at that epoch's start) and skips `batch` batches.
        Re-fetches the shards, which the driver has just loaded."""
        self.step = step
        self.order.resume(loader_state, batch)
        self._fetch_shards()

    def loader_state(self, at_epoch_start: bool) -> torch.Tensor:
        """The data order's position: at the start of the last epoch run, or now (after it)."""
        return self.order.state(at_epoch_start)

    def run_epoch(self, epoch: int, steps: int) -> int:
        """Train `steps` batches of this epoch's shard; return the steps taken so far."""
        for x, y in self.order.epoch(epoch, steps):
            if self._step_hook is not None:
                self._step_hook(self.trainer_id, self.step + 1)
            started = time.perf_counter()
            loss, correct = self._train_step(x, y)
            self.report.add(loss, correct, len(y), time.perf_counter() - started, predictions(y))
            self.step += 1
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                self.report.step, self.report.epoch = self.step, epoch
                if isinstance(self.loader, BatchLoader):
                    self.report.input_wait_s = self.loader.pop_stats()["waited_s"]
                self._send(self.report)
                self.report = TrainerReport(self.trainer_id)
            elif time.monotonic() - self._last_sent > self.heartbeat_s:
                self._send(self.report.heartbeat(epoch))
        return self.step

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, int]:
        """Compute, push to every server; redo for the servers that found the gradient stale."""
        pending, first = self.shards, None
        while pending:
            loss, correct, grads = self._compute(x, y)
            first = first or (loss, correct)
            futures = [self._push(shard, grads) for shard in pending]
            replies: List[PushReply] = torch.futures.wait_all(futures)
            for shard, reply in zip(pending, replies):
                self._load(shard, reply.version, reply.state)
                shard.made_by = reply.made_by
                self.report.note_push(reply.applied, reply.staleness, reply.lr)
            pending = [s for s, r in zip(pending, replies) if not r.applied]
        return first

    def _compute(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, int, Dict[str, torch.Tensor]]:
        self.model.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = loss_of(logits, y)
        value = loss.item()
        if not math.isfinite(value):
            # Raised before any push: no server ever steps on it, so the last checkpoint stays good.
            raise FloatingPointError(f"non-finite loss ({value}) at step {self.step + 1} of trainer {self.trainer_id}"
                                     f"{self._last_update()}; {self._remedy} (trainer.skip_nonfinite "
                                     "applies to mode=pipeline only)")
        loss.backward()
        # A parameter the loss never reached still needs a gradient: servers average them all.
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}
        return value, correct_of(logits, y), grads

    def _last_update(self) -> str:
        """Which gradient last changed the parameters this step ran on: the stalest shard's."""
        made = [(s.made_by[1], s.made_by[0], s.server_id) for s in self.shards if s.made_by is not None]
        if not made:
            return ""
        staleness, trainer, server = max(made)
        return f", on parameters last updated by trainer {trainer}'s gradient of staleness {staleness} (server {server})"

    def _push(self, shard: Shard, grads: Dict[str, torch.Tensor]) -> torch.futures.Future:
        buffers = {n: self.named[n].detach() for n in shard.buffers}
        # The default timeout (runtime.rpc_timeout_s) bounds a sync step whose peers never come.
        return rpc.rpc_async(shard.worker, push_gradients, args=(
            shard.server_id, self.trainer_id, shard.version,
            {n: grads[n] for n in shard.params}, buffers))

    def _load(self, shard: Shard, version: int, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self.named[name].copy_(value)
        shard.version = version

    def _send(self, message) -> None:
        # rpc_sync: a few numbers every log_every steps; if the driver is gone, stop here.
        rpc.rpc_sync(DRIVER, record_report, args=(message,))
        self._last_sent = time.monotonic()
