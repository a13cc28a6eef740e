"""A hybrid trainer: the dense part under DDP, the tables' rows fetched from the servers.

A step, inside one distributed-autograd context:
1. per table, the batch's unique indices (`torch.unique`), split by the server holding them;
2. one `rpc_async` to each server with all its tables' rows, all in flight at once;
3. the pooled vectors assembled here from the unique rows, the dense forward, the loss;
4. `dist_autograd.backward`: DDP's all-reduce averages the dense gradients among the
   trainers, and the rows' gradients travel back to their servers, recorded on the way out;
5. the dense optimizer steps on the gradients read from the context, and each server is told
   to apply its part (`apply_gradients`), which in sync mode answers once every trainer has.
"""

import logging
import math
import os
import time
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel

from rpc_train.checkpoint.shares import load_worker_state, save_worker_state
from rpc_train.config.errors import first_line
from rpc_train.loader.service import trainer_loader
from rpc_train.loader.stream import BatchLoader
from rpc_train.data.order import DataOrder
from rpc_train.hybrid.group import dense_group
from rpc_train.hybrid.model import DenseArch, build_dlrm
from rpc_train.hybrid.server import apply_gradients, lookup_rows
from rpc_train.hybrid.sharding import Piece, Router
from rpc_train.training.builders import build_optimizer

log = logging.getLogger(__name__)

# The backward, where DDP's all-reduce waits for every trainer: one stuck elsewhere holds them all.
WAITING_FOR_PEERS = "the backward (DDP's all-reduce waits for every trainer)"


class HybridTrainer:
    def __init__(self, trainer_id: int, trainers: int, servers: List[str], held: List[List[Piece]],
                 model_cfg: dict, data_cfg: dict, optim_cfg: dict, scheduler_cfg, batch_size: int, seed: int,
                 log_every: int, device: str = "cpu", step_hook: Optional[dict] = None,
                 loader_cfg: Optional[dict] = None, service=None):
        """`step_hook`: the hybrid.step_hook config, built here and called as hook(trainer_id, step).
        `loader_cfg` and `service`: where the batches come from (loader/service.py)."""
        self.trainer_id, self.servers, self.log_every = trainer_id, servers, log_every
        self.device = local_device(device)
        model = build_dlrm(model_cfg, seed)
        self.tables = len(model.table_rows)
        self.router = Router(held, self.tables)
        self.dense = DenseArch(model).to(self.device)
        self.ddp = DistributedDataParallel(self.dense, process_group=dense_group(),
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = list(self.ddp.parameters())
        self._param_names = [name for name, _ in self.dense.model.named_parameters()]  # the plain model's names
        self.optimizer, self.scheduler = build_optimizer(self.params, optim_cfg, scheduler_cfg)
        self.loader = trainer_loader(data_cfg, loader_cfg or {"name": "local"}, service, batch_size, trainer_id,
                                     trainers, seed)
        self.step = 0
        self.last_loss: Optional[float] = None  # the latest step's, for the driver's progress line
        self._versions = [0] * len(servers)
        self._made_by: Dict[int, tuple] = {}  # server -> the update that made the rows it last sent (LookupReply)
        self._step_hook = instantiate(step_hook) if step_hook else None
        self.order = DataOrder(self.loader)
        self.doing = "data loading"  # what the training thread does now (whereabouts)
        log.info("hybrid trainer %d (pid %d): %d steps per epoch of %d samples on %s", trainer_id, os.getpid(),
                 len(self.loader), batch_size, self.device)

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def run_epoch(self, steps: int, epoch: int = 0) -> List[Dict[str, float]]:
        """Train `steps` batches of epoch `epoch`; one dict of window means every `log_every` steps."""
        windows, window = [], _Window()
        for dense, sparse, labels in self.order.epoch(epoch, steps):
            if self._step_hook is not None:
                self.doing = "its step hook"
                self._step_hook(self.trainer_id, self.step + 1)
            started = time.perf_counter()
            loss, lookup_s = self._train_step(dense, sparse, labels)
            window.add(loss, len(labels), time.perf_counter() - started, lookup_s)
            self.step, self.last_loss = self.step + 1, loss
            if self.step % self.log_every == 0:
                windows.append(self._window_means(window))
                window = _Window()
        if window.steps:
            windows.append(self._window_means(window))
        return windows

    def _window_means(self, window: "_Window") -> Dict[str, float]:
        """The window's means, and with loader=service the time spent waiting for its batches."""
        means = window.means(self.step)
        if isinstance(self.loader, BatchLoader):
            means["input_wait_s"] = self.loader.pop_stats()["waited_s"]
        return means

    def _train_step(self, dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
        with dist_autograd.context() as context_id:
            started = time.perf_counter()
            self.doing = "lookups"
            rows, inverse, asked = self._lookup(sparse)
            lookup_s = time.perf_counter() - started
            pooled = [rows[t][inverse[t]].to(self.device) for t in range(self.tables)]
            logits = self.ddp(dense.to(self.device), pooled)
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(self.device))
            value = loss.item()
            if not math.isfinite(value):
                culprit = last_update(self._made_by, asked, self.step)
                raise FloatingPointError(f"non-finite loss ({value}) at step {self.step + 1} of hybrid trainer "
                                         f"{self.trainer_id}{culprit}; lower optim.lr or hybrid.embedding_lr")
            self.doing = WAITING_FOR_PEERS
            dist_autograd.backward(context_id, [loss])
            self.doing = "its optimizer step"
            grads = dist_autograd.get_gradients(context_id)
            for p in self.params:
                p.grad = grads[p]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            # Inside the context: a server reads the gradients from it, so it must still exist.
            self.doing = "applying gradients"
            self._wait("applying gradients", {
                j: rpc.rpc_async(worker, apply_gradients, args=(
                    j, self.trainer_id, context_id if j in asked else -1, self._versions[j]))
                for j, worker in enumerate(self.servers)})
        self.doing = "data loading"
        return value, lookup_s

    def whereabouts(self) -> Tuple[int, str, Optional[float]]:
        """(steps done, what the training thread is doing, the latest loss): answered by an RPC
        thread, so a trainer stuck in its step still says where."""
        return self.step, self.doing, self.last_loss

    def _lookup(self, sparse: torch.Tensor):
        """(unique rows per table, inverse per table, servers asked): one RPC per server."""
        requests: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        places: List[List[Tuple[int, int]]] = []  # per table: (server, position in its reply) per part
        inverse = []
        for t in range(self.tables):
            unique, inv = torch.unique(sparse[:, t], sorted=True, return_inverse=True)
            inverse.append(inv)
            parts = []
            for server, piece, local in self.router.split(t, unique):
                batch = requests.setdefault(server, [])
                parts.append((server, len(batch)))
                batch.append((piece, local))
            places.append(parts)
        replies = self._wait("lookup", {j: rpc.rpc_async(self.servers[j], lookup_rows, args=(j, batch))
                                        for j, batch in requests.items()})
        for j, reply in replies.items():
            self._versions[j] = reply.version
            self._made_by[j] = reply.made_by
        rows = [torch.cat([replies[j].rows[k] for j, k in parts]) for parts in places]
        return rows, inverse, set(requests)

    def _wait(self, what: str, futures: Dict[int, torch.futures.Future]) -> Dict[int, object]:
        """Every server's answer; a failure names the server (a timeout's own message does not)."""
        out = {}
        for j, future in futures.items():
            try:
                out[j] = future.wait()
            except RuntimeError as err:
                raise RuntimeError(f"hybrid trainer {self.trainer_id}: {what} on {self.servers[j]} (embedding "
                                   f"server {j}) failed: {first_line(err)}") from err
        return out

    # Checkpoints: the dense part is the same on every trainer (DDP), so trainer 0 saves it and
    # every trainer loads it; the data position is the loader's generator state, as in ps/worker.py.
    def save_checkpoint(self, directory: str) -> dict:
        return save_worker_state(directory, "dense.pt", self.dense.plain_state_dict(), self.optimizer,
                                 self._param_names, self.scheduler, "dense")

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        tensors = load_worker_state(directory, index, list(self.dense.model.state_dict()), self.optimizer,
                                    self._param_names, self.scheduler, "dense")
        self.dense.model.load_state_dict(tensors)

    def resume(self, step: int, loader_state: Optional[torch.Tensor], batch: int) -> None:
        """Go on from a checkpoint: `step` steps done; the next epoch's loader starts from
        `loader_state` (its generator state when that epoch began) and skips `batch` batches."""
        self.step = step
        self.order.resume(loader_state, batch)

    def loader_state(self, at_epoch_start: bool) -> torch.Tensor:
        """The data order's position: at the start of the last epoch run, or now (after it)."""
        return self.order.state(at_epoch_start)

    def dense_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.dense.plain_state_dict().items()}


def last_update(made_by: Dict[int, Optional[tuple]], servers: Set[int], step: int) -> str:
    """Which gradient last changed the parameters of a step after `step` steps, as the parameter
    server's error names it: async, the stalest update of the rows from `servers`; sync, every
    trainer's gradient of the last step (the dense part's, under DDP, always is)."""
    made = [(m[1], m[0], j) for j, m in made_by.items() if j in servers and m is not None and m[0] is not None]
    if made:
        staleness, trainer, server = max(made)
        return f", on rows last updated by trainer {trainer}'s gradient of staleness {staleness} (embedding server {server})"
    return f", on parameters last updated by step {step}'s gradient (every trainer's, averaged)" if step else ""


def local_device(device: str) -> torch.device:
    """cuda: this process's GPU by its local rank on its own machine; else the CPU."""
    if device != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


class _Window:
    def __init__(self):
        self.steps = self.samples = 0
        self.loss = self.seconds = self.lookup_s = 0.0

    def add(self, loss: float, samples: int, seconds: float, lookup_s: float) -> None:
        self.steps += 1
        self.samples += samples
        self.loss += loss
        self.seconds += seconds
        self.lookup_s += lookup_s

    def means(self, step: int) -> Dict[str, float]:
        return {"step": step, "train/loss": self.loss / self.steps, "samples": self.samples,
                "seconds": self.seconds, "time/lookup_ms": 1e3 * self.lookup_s / self.steps}
