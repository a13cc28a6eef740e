"""The hybrid driver (rank 0): shards the tables, builds servers and trainers, validates.

Each epoch the driver starts every trainer's `run_epoch` by RPC and waits for all of them
(watch.py); a trainer or server that fails or stops ends the job with its name. Between epochs it copies the
servers' rows and trainer 0's dense part into its own plain DLRM, which validation runs and
`model.pt` is written from.
"""

import logging
import time
from typing import Dict, List

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rpc_train.checkpoint.manager import Checkpointer
from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import as_dict
from rpc_train.data.clicks import load_clicks
from rpc_train.hybrid.evaluate import evaluate_clicks
from rpc_train.hybrid.model import build_dlrm
from rpc_train.hybrid.server import EmbeddingServer
from rpc_train.hybrid.sharding import plan
from rpc_train.hybrid.trainer import HybridTrainer
from rpc_train.hybrid.watch import run_trainers
from rpc_train.loader.metrics import loader_scalars
from rpc_train.loader.service import start_data_service
from rpc_train.metrics.progress import Progress
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.runtime.remote import call_all
from rpc_train.runtime.roles import ParameterServerRoles, hybrid_roles
from rpc_train.training.protocol import FitResult
from rpc_train.training.staleness import AsyncUpdateRule

log = logging.getLogger(__name__)


class HybridJob:
    """The servers and trainers the driver built, and its own model copy for validation."""

    def __init__(self, cfg: DictConfig, world_size: int):
        hybrid, model_cfg = cfg.hybrid, as_dict(cfg.model)
        self.roles: ParameterServerRoles = hybrid_roles(cfg, world_size)
        self.model = build_dlrm(model_cfg, cfg.seed).eval()
        self.sharding = hybrid.sharding
        self.held = plan(hybrid.sharding, self.model.table_rows, self.model.embedding_dim, len(self.roles.servers))
        trainers = len(self.roles.trainers)
        self.samples_per_step = trainers * cfg.trainer.batch_size
        self.service = start_data_service(cfg)
        rule = AsyncUpdateRule(scale_by_staleness=not hybrid.sync and hybrid.staleness_lr,
                               clip_grad_norm=hybrid.clip_grad_norm)
        self.servers = [rpc.remote(w, EmbeddingServer, args=(j, self.held[j], model_cfg, cfg.seed, trainers,
                                                             hybrid.sync, hybrid.embedding_optim, hybrid.embedding_lr,
                                                             rule))
                        for j, w in enumerate(self.roles.servers)]
        self.trainers = [rpc.remote(w, HybridTrainer, args=(
                             i, trainers, self.roles.servers, self.held, model_cfg, as_dict(cfg.data),
                             as_dict(cfg.optim), as_dict(cfg.scheduler) or None, cfg.trainer.batch_size, cfg.seed,
                             cfg.trainer.log_every, cfg.device, as_dict(hybrid.step_hook), as_dict(cfg.loader),
                             self.service))
                         for i, w in enumerate(self.roles.trainers)]
        self.per_epoch = call_all(self.trainers, "steps_per_epoch")[0]  # also waits until all are built
        if self.per_epoch == 0:
            raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} x {trainers} trainers is more than "
                              f"the training samples of data={cfg.data.name}; lower trainer.batch_size")
        call_all(self.servers, "pop_stats")  # rates count from the first step
        log.info("hybrid (%s, %s sharding): %d server(s) on %s holding %s, %d trainer(s) under DDP on %s",
                 "sync" if hybrid.sync else "async", hybrid.sharding, len(self.servers), ", ".join(self.roles.servers),
                 "; ".join(", ".join(p.name for p in pieces) for pieces in self.held), trainers,
                 ", ".join(self.roles.trainers))

    # The `Checkpointable` side (training/protocol.py), for checkpoint/manager.py's Checkpointer.
    def save_checkpoint(self, directory: str) -> list:
        dense = self.trainers[0].rpc_async().save_checkpoint(directory)
        return call_all(self.servers, "save_checkpoint", directory) + [dense.wait()]

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Any layout loads any other's checkpoint: servers take their rows by overlap."""
        call_all(self.servers, "load_checkpoint", directory, index)
        call_all(self.trainers, "load_checkpoint", directory, index)

    def layout(self) -> dict:
        return {"servers": len(self.servers), "trainers": len(self.trainers), "sharding": self.sharding,
                "samples_per_step": self.samples_per_step}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The plain models/dlrm.py state_dict: trainer 0's dense part and every server's rows."""
        state = self.trainers[0].rpc_sync().dense_state()
        parts: Dict[int, List[tuple]] = {}
        for pieces, rows in zip(self.held, call_all(self.servers, "state_dict")):
            for piece in pieces:
                parts.setdefault(piece.table, []).append((piece.lo, rows[piece.name]))
        for table, pieces in parts.items():
            state[f"embeddings.{table}.weight"] = torch.cat([r for _, r in sorted(pieces, key=lambda p: p[0])])
        return state


def check_same_step_size(saved: dict, now: dict) -> None:
    """The data position counts batches of trainers x batch_size samples: resuming with another
    product would start at the wrong sample. Servers and sharding may change; this may not."""
    if saved and saved.get("samples_per_step") not in (None, now["samples_per_step"]):
        raise ConfigError(f"the checkpoint was written with {saved['samples_per_step']} samples a step (trainers x "
                          f"trainer.batch_size), this run takes {now['samples_per_step']}; resume with the same "
                          "product, or start over with checkpoint.resume=none")


def log_windows(logger: RunLogger, per_trainer: List[List[Dict[str, float]]]) -> Dict[str, float]:
    """One point a window: the trainers' mean loss and lookup time, their summed samples/s."""
    last: Dict[str, float] = {}
    for windows in zip(*per_trainer):
        seconds = max(w["seconds"] for w in windows)
        last = {"train/loss": sum(w["train/loss"] for w in windows) / len(windows),
                "time/lookup_ms": sum(w["time/lookup_ms"] for w in windows) / len(windows),
                "throughput/samples_per_s": sum(w["samples"] for w in windows) / max(seconds, 1e-9)}
        waited = sum(w.get("input_wait_s", 0.0) for w in windows)
        if waited:  # loader=service: the trainers' share of time spent waiting for batches
            last["loader/input_wait_fraction"] = waited / (waited + sum(w["seconds"] for w in windows))
        logger.scalars(int(windows[0]["step"]), last)
    return last


def server_scalars(job: HybridJob) -> Dict[str, float]:
    out = {}
    for j, stats in enumerate(call_all(job.servers, "pop_stats")):
        for key in ("lookups_per_s", "rows_looked_up_per_s", "rows_updated_per_s", "max_staleness"):
            out[f"server{j}/{key}"] = stats[key]
    return out


def fit_hybrid(cfg: DictConfig, world_size: int, logger: RunLogger) -> FitResult:
    started = time.perf_counter()
    # Read here first: a missing file or malformed line is the driver's one-line error, before
    # any trainer reads the same file inside an RPC.
    _, val = load_clicks(cfg.data, cfg.seed)
    job = HybridJob(cfg, world_size)
    checkpoints = Checkpointer(cfg, logger.log_dir, job, logger)
    start = checkpoints.resume()
    if start.step:  # servers and trainers hold the checkpoint's state; trainers take its data position
        check_same_step_size(checkpoints.resumed_layout, job.layout())
        call_all(job.trainers, "resume", start.step, start.loader_state, start.batch)
    val_loader = DataLoader(val, batch_size=max(cfg.trainer.batch_size, 1024), shuffle=False)
    total = cfg.trainer.epochs * job.per_epoch
    total = min(total, cfg.trainer.max_steps) if cfg.trainer.max_steps else total
    final: Dict[str, float] = {}
    progress = Progress(total, initial=start.step, epochs=cfg.trainer.epochs, every_s=cfg.log.progress_s,
                        enabled=cfg.trainer.progress)
    try:
        run_epochs(cfg, job, checkpoints, logger, val_loader, total, final, progress)
    finally:
        progress.close()
    checkpoints.save()  # the final one, unless the last epoch just saved it
    final["time/total_s"] = time.perf_counter() - started
    return final, job.state_dict


def run_epochs(cfg: DictConfig, job: HybridJob, checkpoints: Checkpointer, logger: RunLogger,
               val_loader: DataLoader, total: int, final: Dict[str, float], progress: Progress) -> None:
    """The epochs from the checkpointer's position, advancing it after each; as in ps/driver.py,
    checkpoints are written between epochs only, when no gradient is in flight."""
    position = checkpoints.position
    done = position.step
    for epoch in range(position.epoch, cfg.trainer.epochs):
        skip = position.batch if epoch == position.epoch else 0
        steps = min(job.per_epoch - skip, total - done)
        if steps <= 0:
            break
        final.update(log_windows(logger, run_trainers(job, steps, cfg.runtime.rpc_timeout_s, progress, epoch)))
        before, done = done, done + steps
        progress.update(done, (done - progress.step) * job.samples_per_step, final["train/loss"], epoch)
        # Every trainer's loader draws from an identically seeded generator: trainer 0's serves.
        complete = skip + steps == job.per_epoch
        position.step, position.loader_state = done, job.trainers[0].rpc_sync().loader_state(not complete)
        position.epoch, position.batch = (epoch + 1, 0) if complete else (epoch, skip + steps)
        final.update(server_scalars(job))
        if job.service is not None:
            logger.scalars(done, loader_scalars(job.service, [], 0.0))
        job.model.load_state_dict(job.state_dict())
        final.update(evaluate_clicks(job.model, val_loader))
        logger.scalars(done, {k: v for k, v in final.items() if k.startswith(("val/", "server"))})
        log.info("epoch %d (step %d): val/auc %.4f, val/logloss %.4f, train/loss %.4f", epoch + 1, done,
                 final["val/auc"], final["val/logloss"], final["train/loss"])
        checkpoints.save_if_due(before, done)
