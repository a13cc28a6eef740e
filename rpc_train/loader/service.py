"""Where each consumer's batches come from: its own process, or the data workers.

The driver starts the data service (`start_data_service`: a DataWorker on each data worker
rank, connected into one ring) and hands the resulting `DataService` to every consumer:
itself in pipeline mode, each trainer in parameter-server and hybrid modes. A consumer turns
it into its loaders with `consumer_loaders` / `trainer_loader`; with loader=local those are
today's in-memory loaders, or, for a data set with a per-sample augmentation, the same batches
made in process.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.rpc as rpc
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rpc_train.config.schema import as_dict
from rpc_train.data.clicks import load_clicks
from rpc_train.data.datasets import load_datasets, make_loaders, make_trainer_loader
from rpc_train.data.files import CLICK_DATASETS
from rpc_train.loader.order import id_loaders
from rpc_train.loader.pool import WorkerPool
from rpc_train.loader.stream import BatchLoader, LocalProducer
from rpc_train.loader.worker import DataWorker, build_makers, split_sizes
from rpc_train.runtime.roles import data_worker_names

log = logging.getLogger(__name__)


@dataclass
class DataService:
    """The data workers as a consumer reaches them; picklable, so the driver sends it to trainers."""

    workers: List  # RRefs to each worker's DataWorker
    names: List[str]
    sizes: Dict[str, int]  # samples in each split
    loader: dict  # the loader config group

    def pop_stats(self) -> List[Optional[Dict[str, float]]]:
        """Each worker's figures since the last call (loader/worker.py DataWorker.pop_stats); None
        for a worker that does not answer within loader.timeout_s: figures are not worth waiting
        for a stopped worker, which its consumers already work around."""
        futures = [w.rpc_async(timeout=self.loader["timeout_s"]).pop_stats() for w in self.workers]
        stats = []
        for future in futures:
            try:
                stats.append(future.wait())
            except RuntimeError:
                stats.append(None)
        return stats


def start_data_service(cfg: DictConfig) -> Optional[DataService]:
    """loader=service: a DataWorker on each data worker rank, each told of the others; None otherwise."""
    if cfg.loader.name != "service":
        return None
    names = data_worker_names(cfg)
    workers = [rpc.remote(name, DataWorker, args=(i, name, as_dict(cfg.data), as_dict(cfg.loader), cfg.seed))
               for i, name in enumerate(names)]
    sizes = torch.futures.wait_all([w.rpc_async().connect(dict(zip(names, workers))) for w in workers])[0]
    loader = cfg.loader
    log.info("data service: %d worker(s) on %s, %s routing, %d batch(es) in flight per consumer, timeout %g s, "
             "store %s", len(names), ", ".join(names), loader.routing, loader.prefetch, loader.timeout_s,
             f"{loader.cache_mb:g} MB a worker on a consistent-hash ring" if loader.cache_mb else "off")
    return DataService(workers, names, sizes, as_dict(loader))


def consumer_loaders(cfg: DictConfig, service: Optional[DataService], consumer: str) -> Tuple:
    """(train, validation) loaders of the pipeline driver: the whole batch each step."""
    if service is not None:
        train_ids, val_ids = id_loaders(service.sizes, cfg.trainer.batch_size, cfg.seed)
        return _remote(service, train_ids, val_ids, consumer)
    if _sample_by_sample(cfg.data, cfg.loader):
        makers = build_makers(cfg.data, cfg.loader, cfg.seed)
        train_ids, val_ids = id_loaders(split_sizes(makers), cfg.trainer.batch_size, cfg.seed)
        return _local(makers, train_ids, val_ids, cfg.loader, consumer)
    return make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed)


def trainer_loader(data_cfg: dict, loader_cfg: dict, service: Optional[DataService], batch_size: int,
                   trainer: int, trainers: int, seed: int):
    """Trainer `trainer`'s training loader: its slice of every batch of trainers x batch_size."""
    loader = OmegaConf.create(loader_cfg)
    name = f"trainer{trainer}"
    if service is not None:
        train_ids, val_ids = id_loaders(service.sizes, batch_size, seed, trainer, trainers)
        return _remote(service, train_ids, val_ids, name)[0]
    if _sample_by_sample(OmegaConf.create(data_cfg), loader):
        makers = build_makers(OmegaConf.create(data_cfg), loader, seed)
        train_ids, val_ids = id_loaders(split_sizes(makers), batch_size, seed, trainer, trainers)
        return _local(makers, train_ids, val_ids, loader, name)[0]
    data = OmegaConf.create(data_cfg)
    train, _ = load_clicks(data, seed) if data.name in CLICK_DATASETS else load_datasets(data, seed)
    return make_trainer_loader(train, batch_size, trainer, trainers, seed)


def _remote(service: DataService, train_ids, val_ids, consumer: str) -> Tuple[BatchLoader, BatchLoader]:
    loader = service.loader
    pool = WorkerPool(service.workers, service.names, loader["prefetch"], loader["timeout_s"], loader["routing"],
                      consumer)
    hook = instantiate(loader["batch_hook"]) if loader.get("batch_hook") else None
    return (BatchLoader(train_ids, "train", pool, consumer, hook),
            BatchLoader(val_ids, "val", pool, consumer))


def _local(makers: dict, train_ids, val_ids, loader, consumer: str) -> Tuple[BatchLoader, BatchLoader]:
    producer = LocalProducer(makers)
    hook = instantiate(loader.batch_hook) if loader.get("batch_hook") else None
    return (BatchLoader(train_ids, "train", producer, consumer, hook),
            BatchLoader(val_ids, "val", producer, consumer))


def _sample_by_sample(data, loader) -> bool:
    """loader=local makes batches sample by sample for files (data=imagefolder) or an
    augmentation; the in-memory data sets keep their plain loaders."""
    return (data.name == "imagefolder" or loader.get("transform") is not None
            or loader.get("val_transform") is not None)

