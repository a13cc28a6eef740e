"""The driver (rank 0): runs the job's mode, logs to TensorBoard, writes the final model and metrics.

Each mode's `fit(cfg, world_size, logger)` (pipeline/driver.py, ps/driver.py, hybrid/driver.py) builds its workers,
trains and returns the final metrics with a function that gathers the trained state.
"""

import json
import logging
import os

import torch
from omegaconf import DictConfig

from rpc_train.checkpoint.store import save_file
from rpc_train.metrics.tensorboard import RunLogger, flat_hparams

log = logging.getLogger(__name__)


def drive(cfg: DictConfig, world_size: int, run_dir: str) -> dict:
    """Train to the end and return the final metrics; workers are only reached by RPC."""
    torch.manual_seed(cfg.seed)
    # Imported by mode: a pipeline job never loads ps/, nor a parameter-server job pipeline/.
    if cfg.mode.name == "parameter_server":
        from rpc_train.ps.driver import fit_parameter_server as fit
    elif cfg.mode.name == "hybrid":
        from rpc_train.hybrid.driver import fit_hybrid as fit
    else:
        from rpc_train.pipeline.driver import fit_pipeline as fit
    logger = RunLogger(run_dir)
    try:
        logger.config(cfg)
        final, state_dict = fit(cfg, world_size, logger)
        logger.hparams(flat_hparams(cfg), {k: v for k, v in final.items() if k.startswith(("val/", "throughput/"))})
    finally:
        logger.close()
    if cfg.trainer.save_model:
        path = save_model(run_dir, state_dict())
        log.info("saved the trained model's state_dict to %s", path)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(final, f, indent=1)
    log.info("done: %s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
    return final


def save_model(run_dir: str, state_dict: dict) -> str:
    """model.pt, written under a temporary name in the run dir and renamed: a server looking for
    the newest run never finds a file still being written."""
    path = os.path.join(run_dir, "model.pt")
    save_file(path, state_dict)
    return path
