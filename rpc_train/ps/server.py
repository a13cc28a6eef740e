"""One parameter server: a shard of the model's tensors and the optimizer that updates them.

The driver creates each `ParameterServer` with `rpc.remote` and keeps the RRef, which owns
its lifetime and carries the control calls (stats, state). Trainers reach it every step
through `push_gradients` by server id instead: passing an RRef as an argument would run the
RRef fork protocol (extra messages) on every call, as in pipeline/stage.py.
"""

import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed.rpc as rpc
from torch import nn

from rpc_train.training.builders import build_model, build_optimizer
from rpc_train.training.staleness import AsyncUpdateRule
from rpc_train.checkpoint.shares import load_worker_state, save_worker_state

# The servers hosted by this process, by server id, for `push_gradients` and `fetch_shard`.
_LOCAL_SERVERS: Dict[int, "ParameterServer"] = {}

Tensors = Dict[str, torch.Tensor]


class PushReply(NamedTuple):
    applied: bool  # false: the gradient was too stale and was dropped (async only)
    staleness: int  # server updates between the trainer's copy and this push
    version: int  # server updates so far; `state` is the shard at this version
    state: Tensors
    lr: float
    # (trainer, staleness) of the gradient whose update made `state`; None before any update.
    made_by: Optional[Tuple[int, int]] = None


class ParameterServer:
    def __init__(self, server_id: int, names: List[str], model_cfg: dict, optim_cfg: dict,
                 scheduler_cfg: Optional[dict], seed: int, trainers: int, sync: bool,
                 max_staleness: int, rule: AsyncUpdateRule = AsyncUpdateRule()):
        """`rule`: how each gradient is clipped and, in async mode, its step scaled by its staleness."""
        # Built from the same config and seed as every trainer's copy: identical initial values.
        state = build_model(model_cfg, seed).state_dict(keep_vars=True)
        self.params = {n: state[n] for n in names if isinstance(state[n], nn.Parameter)}
        self.buffers = {n: state[n] for n in names if n not in self.params}
        self.tensors = {**self.params, **self.buffers}  # both, by name: what replies and files hold
        self.optimizer, self.scheduler = (build_optimizer(self.params.values(), optim_cfg, scheduler_cfg)
                                          if self.params else (None, None))
        self.server_id = server_id
        self.trainers, self.sync, self.max_staleness, self.rule = trainers, sync, max_staleness, rule
        self.version = 0
        self.made_by: Optional[Tuple[int, int]] = None  # see PushReply
        # Guards the tensors, the version and the pending round. Never held across an RPC or a
        # wait: replies are sent after it is released.
        self._lock = threading.Lock()
        self._round: Dict[int, tuple] = {}  # sync: trainer -> (grads, buffers) of this step
        self._waiting: List[torch.futures.Future] = []
        self._stats_since, self._updates_since = time.perf_counter(), 0
        _LOCAL_SERVERS[server_id] = self

    def push(self, trainer: int, version: int, grads: Tensors, buffers: Tensors) -> torch.futures.Future:
        if self.sync:
            return self._push_sync(trainer, version, grads, buffers)
        done = torch.futures.Future()
        done.set_result(self._push_async(trainer, version, grads, buffers))
        return done

    def _push_sync(self, trainer: int, version: int, grads: Tensors, buffers: Tensors) -> torch.futures.Future:
        """Hold the trainer's reply until the last trainer of the step arrives; step once then.

        The reply future frees this RPC thread while the trainer waits (async_execution):
        nothing spins, and a round costs no thread per waiting trainer.
        """
        future = torch.futures.Future()
        with self._lock:
            if version != self.version:
                raise RuntimeError(f"trainer {trainer} pushed a gradient of version {version} in "
                                   f"sync mode, but this server is at {self.version}")
            self._round[trainer] = (grads, buffers)
            self._waiting.append(future)
            if len(self._round) < self.trainers:
                return future
            arrived, waiting = [self._round[t] for t in sorted(self._round)], self._waiting
            self._round, self._waiting = {}, []
            # Summed in trainer order, not arrival order, so a run is bit-for-bit repeatable.
            self._apply(_mean([g for g, _ in arrived]), _mean([b for _, b in arrived]), trainer, 0)
            reply = self._reply(True, 0)
        for waiter in waiting:  # completing a future sends its reply: outside the lock
            waiter.set_result(reply)
        return future

    def _push_async(self, trainer: int, version: int, grads: Tensors, buffers: Tensors) -> PushReply:
        with self._lock:
            staleness = self.version - version
            if staleness > self.max_staleness:
                return self._reply(False, staleness)  # the trainer recomputes on this state
            # The step runs under the lock: two optimizer steps at once would race on the
            # parameters and momentum buffers. It is in-memory work, never an RPC or a wait.
            self._apply(grads, buffers, trainer, staleness)
            return self._reply(True, staleness)

    def _apply(self, grads: Tensors, buffers: Tensors, trainer: int, staleness: int) -> None:
        for name, param in self.params.items():
            param.grad = grads[name]
        if self.optimizer is not None:
            self.rule.step(self.optimizer, [grads[name] for name in self.params], staleness)
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            for name, value in buffers.items():
                self.buffers[name].copy_(value)
        self.version += 1
        self.made_by = (trainer, staleness)
        self._updates_since += 1

    def _reply(self, applied: bool, staleness: int) -> PushReply:
        return PushReply(applied, staleness, self.version, self._snapshot(), self.lr(), self.made_by)

    def _snapshot(self) -> Tensors:
        # Copies: the reply is serialized after the lock is released, while the next step may
        # already be changing these tensors in place.
        return {n: t.detach().clone() for n, t in self.tensors.items()}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    def fetch(self) -> tuple:
        """(version, the shard's parameters and buffers)."""
        with self._lock:
            return self.version, self._snapshot()

    def state_dict(self) -> Tensors:
        return self.fetch()[1]

    # Checkpoints: this shard's tensors, optimizer and scheduler state keyed by full-model names
    # (rpc_train/checkpoint/shares.py), the format the pipeline's stages write. Called by the driver
    # between epochs, when no trainer is pushing.
    def _owner(self) -> list:
        return ["parameter server shard", self.server_id, sorted(self.tensors)]

    def save_checkpoint(self, directory: str) -> dict:
        filename = f"server{self.server_id}.pt"
        with self._lock:
            return save_worker_state(directory, filename, self._snapshot(), self.optimizer, list(self.params),
                                     self.scheduler, self._owner())

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Load this shard's names from whichever files hold them (any layout, either mode)."""
        with self._lock:
            tensors = load_worker_state(directory, index, list(self.tensors), self.optimizer,
                                        list(self.params), self.scheduler, self._owner())
            with torch.no_grad():
                for name, value in tensors.items():
                    self.tensors[name].copy_(value)

    def missing_trainers(self) -> List[int]:
        """Sync: the trainers the open step still waits for; none while no step is open."""
        with self._lock:
            return sorted(set(range(self.trainers)) - set(self._round)) if self._round else []

    def pop_stats(self) -> Dict[str, float]:
        """Updates applied per second since the last call, and the version reached."""
        with self._lock:
            now = time.perf_counter()
            stats = {"updates_per_s": self._updates_since / max(now - self._stats_since, 1e-9),
                     "version": self.version}
            self._stats_since, self._updates_since = now, 0
            return stats


def _mean(parts: List[Tensors]) -> Tensors:
    """Average of the trainers' tensors; integer buffers (batch counts) agree, so take one."""
    out = {}
    for name, first in parts[0].items():
        if first.is_floating_point():
            out[name] = torch.stack([p[name] for p in parts]).sum(0) / len(parts)
        else:
            out[name] = first
    return out


@rpc.functions.async_execution
def push_gradients(server_id: int, trainer: int, version: int, grads: Tensors,
                   buffers: Tensors) -> torch.futures.Future:
    """A trainer's gradient (computed at `version`) and buffers for this server's shard.

    Replies with the shard's state after the update, so the next fetch costs no extra RPC.
    """
    return _LOCAL_SERVERS[server_id].push(trainer, version, grads, buffers)


def fetch_shard(server_id: int) -> tuple:
    return _LOCAL_SERVERS[server_id].fetch()
