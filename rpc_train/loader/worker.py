"""A data worker: makes the batches consumers ask for, and keeps its share of the decoded samples.

The driver builds one `DataWorker` on each data worker rank (ranks 1..loader.workers) and
hands the RRefs to every consumer. A request names a split, the sample ids and the epoch; the
batch is a pure function of those and the seed (loader/maker.py), so any worker makes the same
one and nothing about a consumer's position lives here.

With `loader.cache_mb > 0`, each decoded sample (before augmentation) is kept by exactly one
worker, its owner on a consistent-hash ring over the workers (loader/ring.py). Making a batch,
a worker takes its own samples from its store, asks each other owner for theirs in one RPC,
decodes only the misses, and sends what it decoded to their owners. An owner that does not
answer leaves this worker's ring (its keys, and only its keys, move to the others) until it
answers again.
"""

import logging
import os
import resource
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from rpc_train.config.errors import first_line
from rpc_train.loader.maker import Batch, BatchMaker
from rpc_train.loader.ring import HashRing
from rpc_train.loader.sources import SampleError, build_sources
from rpc_train.loader.store import SampleStore
from rpc_train.loader.transforms import build_transform

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 5.0  # an owner slower than this to hand over cached samples is treated as gone
REJOIN_AFTER_S = 5.0  # an owner left out of the ring is tried again after this long


class DataWorker:
    def __init__(self, index: int, name: str, data_cfg: dict, loader_cfg: dict, seed: int):
        data, loader = OmegaConf.create(data_cfg), OmegaConf.create(loader_cfg)
        self.index, self.name = index, name
        self.makers = build_makers(data, loader, seed)
        train, val = (self.makers[split].source for split in ("train", "val"))
        self.store = SampleStore(int(loader.cache_mb * 2 ** 20))
        self.peers: Dict[str, object] = {}  # worker name -> RRef of its DataWorker
        self.ring: Optional[HashRing] = None
        self._left: Dict[str, float] = {}  # owners out of this worker's ring, since when
        # One batch at a time: decoding is CPU-bound, and the worker's cores are its threads.
        self._busy = threading.Lock()
        self._lock = threading.Lock()  # the counters below
        self._queued = self._max_queued = 0
        self._window = self._fresh_window()
        log.info("data worker %d (pid %d): %d training and %d validation samples of %s, store %s", index,
                 os.getpid(), len(train), len(val), data.name,
                 f"{loader.cache_mb:g} MB" if self.store.capacity_bytes else "off")

    # Set up by the driver once every worker exists.
    def connect(self, peers: Dict[str, object]) -> Dict[str, int]:
        """The other workers (RRefs by name) and the ring over all of them; the split sizes."""
        self.peers = peers
        self.ring = HashRing(sorted(peers))
        return self.sizes()

    def sizes(self) -> Dict[str, int]:
        return split_sizes(self.makers)

    def ping(self) -> bool:
        """Answered by an RPC thread: the pool's probe that this worker answers again."""
        return True

    def produce(self, split: str, ids: torch.Tensor, epoch: int) -> Tuple[Optional[Batch], Optional[str]]:
        """(the batch, None), or (None, a one-line error) for a sample that cannot be decoded
        with loader.on_error=raise: the data's fault, not the worker's, so no other worker is asked."""
        with self._lock:
            self._queued += 1
            self._max_queued = max(self._max_queued, self._queued)
        try:
            with self._busy:
                started, cpu = time.perf_counter(), time.process_time()
                try:
                    batch = self._make(split, ids.tolist(), epoch)
                except SampleError as err:
                    return None, str(err)
                self._count(len(batch.ids), len(batch.skipped), time.perf_counter() - started,
                            time.process_time() - cpu)
                return batch, None
        finally:
            with self._lock:
                self._queued -= 1

    def _make(self, split: str, ids: List[int], epoch: int) -> Batch:
        maker = self.makers[split]
        if not self.store.capacity_bytes:
            batch, decoded = maker.make(ids, epoch)
        else:
            raws = self._cached(split, ids)
            batch, decoded = maker.make(ids, epoch, raws)
            self._keep(split, decoded)
        with self._lock:
            self._window["decoded"] += len(decoded)
        return batch

    # The store: each sample on its owner.
    def _ring_now(self) -> HashRing:
        """The ring without the owners that stopped answering, with those due another try."""
        now, ring = time.monotonic(), self.ring
        for name, since in list(self._left.items()):
            if now - since >= REJOIN_AFTER_S:
                del self._left[name]
        for name in self._left:
            if name in ring.nodes and len(ring.nodes) > 1:
                ring = ring.without(name)
        return ring

    def _cached(self, split: str, ids: List[int]) -> Dict[int, torch.Tensor]:
        found: Dict[int, torch.Tensor] = {}
        asked = {}
        for owner, keys in self._ring_now().owners([_key(split, i) for i in ids]).items():
            wanted = [_id(k) for k in keys]
            if owner == self.name:
                found.update(self.store_get(split, wanted))
            else:
                asked[owner] = self.peers[owner].rpc_async(timeout=PEER_TIMEOUT_S).store_get(split, wanted)
        for owner, future in asked.items():
            try:
                found.update(future.wait())
            except Exception as err:
                self._lose(owner, err)
        return found

    def _keep(self, split: str, decoded: Dict[int, torch.Tensor]) -> None:
        if not decoded:
            return
        sent = {}
        for owner, keys in self._ring_now().owners([_key(split, i) for i in decoded]).items():
            items = {_id(k): decoded[_id(k)] for k in keys}
            if owner == self.name:
                self.store_put(split, items)
            else:
                sent[owner] = self.peers[owner].rpc_async(timeout=PEER_TIMEOUT_S).store_put(split, items)
        for owner, future in sent.items():
            try:
                future.wait()
            except Exception as err:
                self._lose(owner, err)

    def _lose(self, owner: str, err: Exception) -> None:
        if owner not in self._left:
            log.warning("data worker %s: %s did not answer the store (%s); its share of the samples moves to the "
                        "others for %g s", self.name, owner, first_line(err), REJOIN_AFTER_S)
        self._left[owner] = time.monotonic()

    def store_get(self, split: str, ids: List[int]) -> Dict[int, torch.Tensor]:
        return {_id(k): v for k, v in self.store.get_many([_key(split, i) for i in ids]).items()}

    def store_put(self, split: str, items: Dict[int, torch.Tensor]) -> None:
        self.store.put_many({_key(split, i): v for i, v in items.items()})

    # Metrics, for the driver's TensorBoard.
    @staticmethod
    def _fresh_window() -> dict:
        return {"since": time.monotonic(), "batches": 0, "samples": 0, "skipped": 0, "busy_s": 0.0, "cpu_s": 0.0,
                "decoded": 0}

    def _count(self, samples: int, skipped: int, busy_s: float, cpu_s: float) -> None:
        with self._lock:
            w = self._window
            w["batches"], w["samples"], w["skipped"] = w["batches"] + 1, w["samples"] + samples, w["skipped"] + skipped
            w["busy_s"], w["cpu_s"] = w["busy_s"] + busy_s, w["cpu_s"] + cpu_s

    def pop_stats(self) -> Dict[str, float]:
        """This worker's figures since the last call (rates per second of wall time)."""
        with self._lock:
            w, self._window = self._window, self._fresh_window()
            max_queued, self._max_queued = self._max_queued, self._queued
        seconds = max(time.monotonic() - w["since"], 1e-9)
        store, hits = self.store.stats(), self.store.pop_window()
        looked_up = hits["hits"] + hits["misses"]
        out = {"batches_per_s": w["batches"] / seconds, "samples_per_s": w["samples"] / seconds,
               "busy_fraction": w["busy_s"] / seconds, "queue_depth_max": float(max_queued),
               "decoded": float(w["decoded"]), "skipped": float(w["skipped"]),
               "cpu_s_per_sample": w["cpu_s"] / w["samples"] if w["samples"] else 0.0,
               "store_mb": store["bytes"] / 2 ** 20, "peak_rss_mb": _peak_rss_mb()}
        if looked_up:
            out["cache_hit_rate"] = hits["hits"] / looked_up
        return out


def _key(split: str, i: int) -> str:
    """A sample's key on the ring and in the stores ("train/17"): the same on every worker."""
    return f"{split}/{i}"


def _id(key: str) -> int:
    return int(key.split("/")[1])


def split_sizes(makers: Dict[str, BatchMaker]) -> Dict[str, int]:
    return {split: len(maker.source) for split, maker in makers.items()}


def build_makers(data, loader, seed: int) -> Dict[str, BatchMaker]:
    """The train and validation splits' batch makers, each with its augmentation; the same on
    every data worker and in a loader=local consumer."""
    train, val = build_sources(data, seed)
    return {"train": BatchMaker(train, build_transform(loader.transform, "loader.transform"), seed, loader.on_error),
            "val": BatchMaker(val, build_transform(loader.val_transform, "loader.val_transform"), seed,
                              loader.on_error)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
