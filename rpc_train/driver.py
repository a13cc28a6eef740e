"""The driver (rank 0): data, the training loop, validation, TensorBoard, the final model."""

import json
import logging
import os
from typing import Callable, Dict, Tuple

import torch
from omegaconf import DictConfig

from rpc_train.checkpoint.manager import Checkpointer
from rpc_train.data.datasets import make_loaders
from rpc_train.runtime.devices import check_device
from rpc_train.runtime.liveness import WorkerWatch
from rpc_train.metrics.tensorboard import RunLogger, flat_hparams
from rpc_train.pipeline.engine import PipelineEngine
from rpc_train.runtime.session import worker_name
from rpc_train.pipeline.timeline import TimelineLogger
from rpc_train.training.loop import Trainer

log = logging.getLogger(__name__)

# What a mode's fit returns: the final metrics, and how to gather the trained model's state.
FitResult = Tuple[Dict[str, float], Callable[[], Dict[str, torch.Tensor]]]


def build_engine(cfg: DictConfig, world_size: int):
    return PipelineEngine(cfg, world_size)


def fit_pipeline(cfg: DictConfig, world_size: int, logger: RunLogger) -> FitResult:
    workers = [worker_name(rank) for rank in range(1, world_size)]
    engine = WorkerWatch(build_engine(cfg, world_size), workers, cfg.runtime.rpc_timeout_s)
    train_loader, val_loader = make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed)
    engine.wait_ready()
    checkpoints = Checkpointer(cfg, logger.log_dir, engine, logger)
    start = checkpoints.resume()
    timeline = TimelineLogger(logger, logger.log_dir, cfg.pipeline.timeline_every, cfg.pipeline.trace_step)
    final = Trainer(engine, train_loader, val_loader, cfg.trainer, logger, hooks=[timeline, checkpoints],
                    start=start).fit()
    checkpoints.save()  # the final one, unless the last step just saved it
    return final, engine.state_dict


def drive(cfg: DictConfig, world_size: int, run_dir: str) -> dict:
    """Train to the end and return the final metrics; workers are only reached by RPC."""
    check_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.mode.name == "parameter_server":
        from rpc_train.ps.driver import fit_parameter_server as fit  # the pipeline never loads ps/
    else:
        fit = fit_pipeline
    logger = RunLogger(run_dir)
    try:
        logger.config(cfg)
        final, state_dict = fit(cfg, world_size, logger)
        logger.hparams(flat_hparams(cfg), {k: v for k, v in final.items() if k.startswith(("val/", "throughput/"))})
    finally:
        logger.close()
    if cfg.trainer.save_model:
        path = os.path.join(run_dir, "model.pt")
        torch.save(state_dict(), path)
        log.info("saved the trained model's state_dict to %s", path)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(final, f, indent=1)
    log.info("done: %s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
    return final
