"""Pipeline mode on the driver: build the stages, then run the training loop through them."""

from omegaconf import DictConfig

from rpc_train.checkpoint.manager import Checkpointer
from rpc_train.loader.metrics import LoaderMetrics
from rpc_train.loader.service import consumer_loaders, start_data_service
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.metrics.text import validation_extras
from rpc_train.pipeline.engine import PipelineEngine
from rpc_train.pipeline.profile import ProfileHook
from rpc_train.pipeline.timeline import TimelineLogger
from rpc_train.runtime.liveness import WorkerWatch
from rpc_train.runtime.roles import role_rank
from rpc_train.runtime.world import worker_name
from rpc_train.training.loop import Trainer
from rpc_train.training.protocol import FitResult


def fit_pipeline(cfg: DictConfig, world_size: int, logger: RunLogger) -> FitResult:
    # The stages' workers: a data worker that stops is the data service's to handle (loader/pool.py).
    workers = [worker_name(rank) for rank in range(role_rank(cfg, 1), world_size)]
    engine = WorkerWatch(PipelineEngine(cfg, world_size), workers, cfg.runtime.rpc_timeout_s)
    service = start_data_service(cfg)
    train_loader, val_loader = consumer_loaders(cfg, service, "driver")
    engine.wait_ready()
    checkpoints = Checkpointer(cfg, logger.log_dir, engine, logger)
    start = checkpoints.resume()
    timeline = TimelineLogger(logger, logger.log_dir, cfg.pipeline.timeline_every, cfg.pipeline.trace_step)
    loader_metrics = LoaderMetrics(logger, cfg.trainer.log_every, train_loader, service)
    trainer = Trainer(engine, train_loader, val_loader, cfg.trainer, logger,
                      hooks=[timeline, loader_metrics, checkpoints], start=start, progress_s=cfg.log.progress_s,
                      validation_extras=validation_extras(cfg, engine.state_dict, logger))
    # Last, so the trace starts after the other hooks of step N-1 (a checkpoint saved at step
    # N itself is in it).
    trainer.hooks.append(ProfileHook(engine, logger.log_dir, cfg.pipeline.profile_step, trainer.step + 1,
                                     trainer.total_steps()))
    final = trainer.fit()
    checkpoints.save()  # the final one, unless the last step just saved it
    return final, engine.state_dict
