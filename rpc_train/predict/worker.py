"""A prediction worker: decodes a split's files and runs the trained model on them, on a data worker rank.

Every file under `data.root` is one sample, numbered in ImageFolder's order. Each gets the
validation transform (deterministic: the same prediction whichever worker computes it) and
the served run's model, loaded as mode=serve loads it (serve/source.py).
"""

import logging
import os
import threading
from typing import Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf

from rpc_train.loader.maker import BatchMaker
from rpc_train.loader.sources import ImageFolderSource, SampleError
from rpc_train.loader.transforms import build_transform
from rpc_train.serve.source import ServedModel, build_served

log = logging.getLogger(__name__)


def every_file(data) -> ImageFolderSource:
    """All of data.root's images, in ImageFolder's order (no train/validation split)."""
    from rpc_train.data.imagefolder import scan

    _, samples = scan(os.path.abspath(os.path.expanduser(data.root)))
    return ImageFolderSource("imagefolder", samples)


class Predictor:
    def __init__(self, index: int, data_cfg: dict, loader_cfg: dict, seed: int, served: ServedModel,
                 batch_size: int):
        data, loader = OmegaConf.create(data_cfg), OmegaConf.create(loader_cfg)
        self.source = every_file(data)
        self.maker = BatchMaker(self.source, build_transform(loader.val_transform, "loader.val_transform"), seed,
                                loader.on_error)
        self.model = build_served(served)
        self.batch_size = batch_size
        self._busy = threading.Lock()  # one split at a time: the worker's cores are the model's
        log.info("prediction worker %d (pid %d): %d files, model %s from %s", index, os.getpid(), len(self.source),
                 served.name, served.run_dir)

    def size(self) -> int:
        return len(self.source)

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def produce(self, split: str, ids: torch.Tensor, epoch: int) -> Tuple[Optional[Dict], Optional[str]]:
        """(the split's columns, None), or (None, a one-line error) for a file that does not
        decode (loader.on_error=raise). The same call as a data worker's, so the consumer's
        pool (loader/pool.py) sends and re-sends splits as it does batches."""
        columns: Dict[str, list] = {"sample": [], "path": [], "label": [], "predicted": [], "probabilities": []}
        with self._busy:
            for start in range(0, len(ids), self.batch_size):
                try:
                    batch, _ = self.maker.make(ids[start:start + self.batch_size].tolist(), epoch)
                except SampleError as err:
                    return None, str(err)
                probabilities = torch.softmax(self.model(batch.x), dim=1)
                columns["sample"] += batch.ids.tolist()
                columns["path"] += [self.source.describe(i) for i in batch.ids.tolist()]
                columns["label"] += batch.y.tolist()
                columns["predicted"] += probabilities.argmax(dim=1).tolist()
                columns["probabilities"].append(probabilities)
        columns["probabilities"] = torch.cat(columns["probabilities"]) if columns["probabilities"] else []
        return columns, None
