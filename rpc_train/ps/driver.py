"""The parameter-server driver (rank 0): builds servers and trainers, runs epochs, validates.

Each epoch the driver starts every live trainer's `run_epoch` by RPC and watches their
reports until all are done (`ProgressMonitor`); then it fetches the servers' shards into its
own model copy and validates. Ending every epoch together costs one round trip per epoch
(and, in async mode, fast trainers wait once per epoch for slow ones) and makes validation
see the model exactly at the epoch boundary, in both modes.
"""

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rpc_train.checkpoint.manager import Checkpointer
from rpc_train.config.schema import as_dict
from rpc_train.loader.service import DataService, consumer_loaders, start_data_service
from rpc_train.config.errors import ConfigError, RunFailure
from rpc_train.training.local import LocalEngine
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.metrics.text import validation_extras
from rpc_train.metrics.progress import Progress
from rpc_train.ps.progress import ProgressMonitor, collapse_warning
from rpc_train.ps.server import ParameterServer
from rpc_train.ps.sharding import shard_by_size, tensor_sizes
from rpc_train.ps.worker import TrainerWorker
from rpc_train.runtime.remote import call_all, gather_state
from rpc_train.runtime.roles import ParameterServerRoles, ps_roles
from rpc_train.training.loop import validate_and_log
from rpc_train.training.protocol import FitResult, StepResult
from rpc_train.training.staleness import AsyncUpdateRule, compensated_momentum, implicit_momentum, remedy

log = logging.getLogger(__name__)


def server_update(cfg: DictConfig, trainers: int) -> Tuple[dict, AsyncUpdateRule]:
    """The servers' optimizer config and update rule (training/staleness.py). In async mode
    the momentum is lowered by asynchrony's own (ps.momentum_compensation), and said so."""
    optim, ps = as_dict(cfg.optim), cfg.ps
    rule = AsyncUpdateRule(scale_by_staleness=not ps.sync and ps.staleness_lr, clip_grad_norm=ps.clip_grad_norm)
    if not ps.sync and ps.momentum_compensation and optim.get("momentum"):
        lowered = compensated_momentum(optim["momentum"], trainers)
        log.info("async with %d trainers: the servers' momentum is %.3g, optim.momentum=%.3g less the %.3g "
                 "that asynchrony adds (ps.momentum_compensation)", trainers, lowered, optim["momentum"],
                 implicit_momentum(trainers))
        optim = {**optim, "momentum": lowered}
    return optim, rule


def build_servers(cfg: DictConfig, roles: ParameterServerRoles, shards: List[List[str]]) -> list:
    trainers = len(roles.trainers)
    optim, rule = server_update(cfg, trainers)
    return [rpc.remote(worker, ParameterServer, args=(
                j, shards[j], as_dict(cfg.model), optim, as_dict(cfg.scheduler) or None,
                cfg.seed, trainers, cfg.ps.sync, cfg.ps.max_staleness, rule))
            for j, worker in enumerate(roles.servers)]


def build_trainers(cfg: DictConfig, roles: ParameterServerRoles, shards: List[List[str]],
                   total_steps: int, service: Optional[DataService]) -> list:
    where = list(zip(roles.servers, shards))
    heartbeat_s = cfg.runtime.rpc_timeout_s / 4  # well inside the driver's stall limit
    return [rpc.remote(worker, TrainerWorker, args=(
                i, len(roles.trainers), where, as_dict(cfg.model), as_dict(cfg.data),
                cfg.trainer.batch_size, cfg.seed, total_steps, cfg.trainer.log_every, heartbeat_s,
                as_dict(cfg.ps.step_hook), divergence_remedy(cfg), as_dict(cfg.loader), service))
            for i, worker in enumerate(roles.trainers)]


def divergence_remedy(cfg: DictConfig) -> str:
    return remedy(cfg.ps.sync, cfg.ps.momentum_compensation, cfg.ps.clip_grad_norm)


def plan_steps(cfg: DictConfig, train_size: int, trainers: int) -> tuple:
    """(steps per epoch, total steps): each step takes trainers x batch_size samples."""
    per_step = trainers * cfg.trainer.batch_size
    if per_step > train_size:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} x {trainers} trainers = {per_step} samples "
            f"a step, more than the {train_size} training samples of data={cfg.data.name}; "
            f"use trainer.batch_size<={train_size // trainers}")
    per_epoch = train_size // per_step
    total = cfg.trainer.epochs * per_epoch
    return per_epoch, min(total, cfg.trainer.max_steps) if cfg.trainer.max_steps else total


def reset_server_clocks(servers: list) -> None:
    call_all(servers, "pop_stats")


@dataclass
class ParameterServerJob:
    """Everything the driver built: its model copy, the servers and trainers, the plan."""

    roles: ParameterServerRoles
    reference: LocalEngine  # the driver's own model copy, for validation only
    servers: list  # RRefs to ParameterServer, by server id
    trainers: list  # RRefs to TrainerWorker, by trainer id
    val_loader: DataLoader
    per_epoch: int
    total: int
    service: Optional[DataService] = None


def start_job(cfg: DictConfig, world_size: int) -> ParameterServerJob:
    """Shard the model, build the servers then the trainers, and wait until all are ready."""
    roles = ps_roles(cfg, world_size)
    reference = LocalEngine(cfg)
    shards = shard_by_size(tensor_sizes(reference.model), len(roles.servers))
    servers = build_servers(cfg, roles, shards)
    # Loaded while the servers build; the train loader is only counted, the trainers own theirs.
    service = start_data_service(cfg)
    train_loader, val_loader = consumer_loaders(cfg, service, "driver")
    per_epoch, total = plan_steps(cfg, len(train_loader.dataset), len(roles.trainers))
    # Trainers fetch from the servers by id, not through the RRefs, so no trainer may start
    # before every server exists: a call through an RRef waits for its object, a plain one not.
    reset_server_clocks(servers)
    trainers = build_trainers(cfg, roles, shards, total, service)
    call_all(trainers, "steps_per_epoch")
    reset_server_clocks(servers)  # updates/s counts from the first step, not from start-up
    log.info("parameter server (%s): %d server(s) on %s holding %s tensors, %d trainer(s) on %s",
             "sync" if cfg.ps.sync else f"async, max staleness {cfg.ps.max_staleness}",
             len(servers), ", ".join(roles.servers), [len(s) for s in shards],
             len(trainers), ", ".join(roles.trainers))
    return ParameterServerJob(roles, reference, servers, trainers, val_loader, per_epoch, total, service)


class ServerEngine:
    """The servers as the driver sees them: an `Evaluator` and `Checkpointable` engine
    (training/protocol.py). Its trainers run their own steps, so it has no train_step.

    `pull()` copies the servers' current state into the driver's own model, which
    `eval_step` then runs; checkpoints are written and read by each server, its own shard.
    Checkpoint calls keep the RPC timeout (runtime.rpc_timeout_s): nothing else watches the
    servers while the driver waits on them.
    """

    def __init__(self, job: ParameterServerJob):
        self.job = job

    def pull(self) -> None:
        self.job.reference.model.load_state_dict(self.state_dict())

    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        return self.job.reference.eval_step(x, y)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return gather_state(self.job.servers)

    def save_checkpoint(self, directory: str) -> list:
        return call_all(self.job.servers, "save_checkpoint", directory)

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        call_all(self.job.servers, "load_checkpoint", directory, index)

    def layout(self) -> dict:
        return {"servers": len(self.job.servers), "trainers": len(self.job.trainers)}


def fit_parameter_server(cfg: DictConfig, world_size: int, logger: RunLogger) -> FitResult:
    """Train to the end; (final metrics, a function that gathers the trained state)."""
    started = time.perf_counter()
    job = start_job(cfg, world_size)
    engine = ServerEngine(job)
    checkpoints = Checkpointer(cfg, logger.log_dir, engine, logger)
    start = checkpoints.resume()
    if start.step:  # the servers hold the checkpoint's state now: trainers re-fetch it
        call_all(job.trainers, "resume", start.step, start.loader_state, start.batch)
    # A resumed run starts at its checkpoint's step: the steps before it were trained (and logged) before.
    progress = Progress(job.total, initial=start.step, epochs=cfg.trainer.epochs, every_s=cfg.log.progress_s,
                        enabled=cfg.trainer.progress)
    monitor = ProgressMonitor(logger, job.roles.trainers, job.servers, cfg.ps.sync, cfg.runtime.rpc_timeout_s,
                              progress, job.service)
    try:
        run_epochs(cfg, engine, monitor, logger, checkpoints)
    finally:
        monitor.close()
    stuck = monitor.stuck_trainers()
    if stuck:
        raise RunFailure(f"{', '.join(stuck)} stopped reporting and never finished; the other trainers "
                         f"finished the run (validation is in TensorBoard), but a stuck process cannot "
                         f"join the shutdown, so the job stops without saving model.pt")
    checkpoints.save()  # the final one, unless the last epoch just saved it
    monitor.final["time/total_s"] = time.perf_counter() - started
    return monitor.final, engine.state_dict


def run_epochs(cfg: DictConfig, engine: ServerEngine, monitor: ProgressMonitor, logger: RunLogger,
               checkpoints: Checkpointer) -> None:
    """Run the epochs from the checkpointer's position, advancing it after each one.

    Checkpoints are written between epochs only, when no gradient is in flight: at the end of
    an epoch in which the step count reached a multiple of checkpoint.every_steps (the
    checkpointer saves the end of training too, possibly in the middle of an epoch).
    """
    job, position = engine.job, checkpoints.position
    done, best = position.step, None
    extras = validation_extras(cfg, job.reference.state_dict, logger)  # pulled just before each validation
    for epoch in range(position.epoch, cfg.trainer.epochs):
        skip = position.batch if epoch == position.epoch else 0
        steps = min(job.per_epoch - skip, job.total - done)
        if steps <= 0:
            break
        # timeout=0: an epoch may take longer than any one RPC; the monitor bounds silence.
        monitor.watch({i: job.trainers[i].rpc_async(timeout=0).run_epoch(epoch, steps)
                       for i in sorted(monitor.live)})
        before, done = done, done + steps
        # Every trainer's loader draws from an identically seeded generator: any live one's state serves.
        complete = skip + steps == job.per_epoch
        state = job.trainers[min(monitor.live)].rpc_sync().loader_state(not complete)
        position.step, position.loader_state = done, state
        position.epoch, position.batch = (epoch + 1, 0) if complete else (epoch, skip + steps)
        engine.pull()
        validate_and_log(engine, job.val_loader, logger, monitor.final, epoch, done, extras)
        accuracy = monitor.final["val/accuracy"]
        warning = collapse_warning(best, accuracy, done, monitor.pop_stalest(), divergence_remedy(cfg))
        if warning:
            log.warning(warning)
        best = accuracy if best is None else max(best, accuracy)
        checkpoints.save_if_due(before, done)
