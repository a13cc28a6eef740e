"""mode=predict on the driver: split the files, have the workers predict each split, write each as it comes.

    NPROC=3 ./launch.sh mode=predict serve.run=<run> data=imagefolder data.root=<dir> predict.out=<dir>

Every rank but the driver is a prediction worker. Split k holds samples
[k * predict.split_size, (k+1) * predict.split_size) and becomes `part-0000k.parquet` in
predict.out, written atomically (predict/writer.py); a rerun of the same command, after a
crash or a kill, predicts and writes only the splits whose file is missing, so the result holds
every sample exactly once. Splits travel like the data service's batches (loader/pool.py):
least loaded first, asked again of another worker when one fails or stops answering.
"""

import logging
import math
import os
import time

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig

from rpc_train.config.errors import ConfigError, RunFailure
from rpc_train.config.schema import as_dict
from rpc_train.loader.pool import WorkerPool
from rpc_train.predict.worker import Predictor
from rpc_train.predict.writer import missing_splits, split_path, write_split
from rpc_train.runtime.world import worker_name
from rpc_train.serve.source import served_model

log = logging.getLogger(__name__)


def predict(cfg: DictConfig, world_size: int, run_dir: str) -> dict:
    served = served_model(cfg.serve.run, cfg.serve.model_name)
    if served.is_dlrm:
        raise ConfigError(f"serve.run={served.run_dir}: a mode=hybrid run (a DLRM); mode=predict takes image "
                          "models; serve it with mode=serve instead")
    if list(cfg.data.shape) != served.shape:
        raise ConfigError(f"data.shape={list(cfg.data.shape)} but the model of {served.run_dir} takes {served.shape}; "
                          f"set data.image_size={served.shape[-1]} (the size it was trained on)")
    names = [worker_name(rank) for rank in range(1, world_size)]
    workers = [rpc.remote(name, Predictor, args=(i, as_dict(cfg.data), as_dict(cfg.loader), cfg.seed, served,
                                                 cfg.trainer.batch_size))
               for i, name in enumerate(names)]
    size = torch.futures.wait_all([w.rpc_async().size() for w in workers])[0]
    out, split_size = os.path.abspath(os.path.expanduser(cfg.predict.out)), cfg.predict.split_size
    splits = math.ceil(size / split_size)
    todo = missing_splits(out, splits)
    os.makedirs(out, exist_ok=True)
    log.info("predicting %d files with %s in %d split(s) of %d on %s: %d to write to %s (%d there already)", size,
             served.name, splits, split_size, ", ".join(names), len(todo), out, splits - len(todo))
    pool = WorkerPool(workers, names, cfg.loader.prefetch, cfg.loader.timeout_s, cfg.loader.routing, "driver")
    requests = ((k, torch.arange(k * split_size, min(size, (k + 1) * split_size))) for k in todo)
    started, samples = time.perf_counter(), 0
    for k, (columns, error) in pool.stream(requests, "all", 0):
        if error is not None:
            raise RunFailure(error)
        write_split(out, k, columns)
        samples += len(columns["sample"])
        log.info("wrote %s (%d samples)", split_path(out, k), len(columns["sample"]))
    seconds = time.perf_counter() - started
    log.info("predicted %d samples in %.1f s; %s holds all %d splits", samples, seconds, out, splits)
    return {"predict/samples": float(samples), "predict/splits_written": float(len(todo)),
            "predict/samples_per_s": samples / seconds if seconds > 0 else 0.0}
