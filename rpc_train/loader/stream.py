"""One split's batches for one consumer: the seeded order of ids, made into batches elsewhere.

`BatchLoader` stands where a consumer's DataLoader stood (the pipeline driver, each
parameter-server or hybrid trainer): `len()`, `.generator` (what a checkpoint saves), plain
iteration (validation) and `batches(epoch, skip)`, which training calls so that a resumed
epoch asks for no batch it already trained on. The ids come from a loader over ids
(loader/order.py); the samples from a producer: the data workers (loader/pool.py) or this
process (`LocalProducer`, for loader=local with a per-sample augmentation).
"""

import itertools
import logging
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from rpc_train.config.errors import RunFailure
from rpc_train.loader.sources import SampleError

log = logging.getLogger(__name__)


class LocalProducer:
    """Batches made in this process, as a data worker makes them."""

    def __init__(self, makers: dict):
        self.makers = makers

    def stream(self, batches: Iterable[Tuple[int, torch.Tensor]], split: str, epoch: int) -> Iterator:
        for index, ids in batches:
            try:
                yield index, (self.makers[split].make(ids.tolist(), epoch)[0], None)
            except SampleError as err:
                yield index, (None, str(err))

    def pop_stats(self) -> dict:
        return {}


class BatchLoader:
    def __init__(self, ids: DataLoader, split: str, producer, consumer: str,
                 on_batch: Optional[Callable] = None):
        """`on_batch`: called as on_batch(consumer, epoch, batch_index, sample_ids) for each batch
        handed over (the `loader.batch_hook` setting)."""
        self.ids, self.split, self.producer, self.consumer, self.on_batch = ids, split, producer, consumer, on_batch
        self.waited_s = 0.0  # time the consumer spent waiting for its next batch
        self.skipped = 0  # samples left out for failing to decode (loader.on_error=skip)

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self.ids.generator

    @property
    def dataset(self):
        """The split's sample ids (its len() is the split's size, as a DataLoader's dataset's is)."""
        return self.ids.dataset

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator:
        return self.batches(0)

    def batches(self, epoch: int, skip: int = 0) -> Iterator:
        """(inputs, labels) of batches skip, skip+1, ... of `epoch`, in order."""
        numbered = enumerate(itertools.islice(self.ids, skip, None), start=skip)
        made = self.producer.stream(numbered, self.split, epoch)
        while True:
            started = time.perf_counter()
            try:
                index, (batch, error) = next(made)
            except StopIteration:
                return
            finally:
                self.waited_s += time.perf_counter() - started
            if error is not None:
                raise RunFailure(error)
            for what in batch.skipped:
                log.warning("%s: skipped a sample of the %s split (loader.on_error=skip): %s", self.consumer,
                            self.split, what)
            self.skipped += len(batch.skipped)
            if self.on_batch is not None:
                self.on_batch(self.consumer, epoch, index, batch.ids)
            # A sample of several tensors (click data: dense, sparse) comes out as they do.
            yield (*batch.x, batch.y) if isinstance(batch.x, (tuple, list)) else (batch.x, batch.y)

    def pop_stats(self) -> dict:
        stats = {"waited_s": self.waited_s, "skipped": float(self.skipped), **self.producer.pop_stats()}
        self.waited_s, self.skipped = 0.0, 0
        return stats


def batches_from(loader, epoch: int, skip: int) -> Iterable:
    """An epoch's batches from `skip` on, from a BatchLoader or a plain DataLoader (whose
    skipped batches are read and dropped: in memory they cost nothing)."""
    if isinstance(loader, BatchLoader):
        return loader.batches(epoch, skip)
    return itertools.islice(loader, skip, None) if skip else loader
