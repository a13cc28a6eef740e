"""A data worker's share of the sample cache: decoded samples (before augmentation) in an LRU
bounded by bytes, so `loader.cache_mb` is a real memory limit and not a count of samples."""

import threading
from collections import OrderedDict
from typing import Dict, Hashable, Iterable, Mapping

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes the tensor's elements take: what a compact copy of it costs."""
    return t.element_size() * t.nelement()


class SampleStore:
    """A thread-safe LRU of tensors holding at most `capacity_bytes`; 0 turns it off.

    RPC handlers of several consumers call it at once, hence one lock around every change.
    Tensors are kept as given (no copy, unless a view, see `put_many`) and returned as kept, so
    neither side may modify them in place: augment a copy.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be 0 (off) or more, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._rejected = 0
        self._window_hits = self._window_misses = 0

    def get_many(self, keys: Iterable[Hashable]) -> Dict[Hashable, torch.Tensor]:
        """The cached samples among `keys` (hits only); each hit becomes the most recent."""
        found: Dict[Hashable, torch.Tensor] = {}
        hits = misses = 0  # per key asked, so a key asked twice counts twice
        with self._lock:
            for key in keys:
                t = self._items.get(key)
                if t is None:
                    misses += 1
                    continue
                hits += 1
                self._items.move_to_end(key)
                found[key] = t
            self._hits += hits
            self._window_hits += hits
            self._misses += misses
            self._window_misses += misses
        return found

    def put_many(self, items: Mapping[Hashable, torch.Tensor]) -> None:
        """Store `items` as the most recent, evicting the least recent until within capacity.

        A tensor larger than the whole capacity is not stored (counted as rejected): it would
        evict everything and then not fit. A re-put key is replaced, its old bytes given back
        (and dropped if the new tensor is rejected: the old one is no longer what was put).
        """
        if self.capacity_bytes == 0:
            return
        # A view (one row of a decoded batch, a crop) keeps its whole base storage alive: store a
        # compact copy so the bytes counted are the bytes held. Copied outside the lock.
        compact = {key: self._compact(t) for key, t in items.items()}
        with self._lock:
            for key, t in compact.items():
                self._discard(key)
                size = tensor_bytes(t)
                if size > self.capacity_bytes:
                    self._rejected += 1
                    continue
                self._items[key] = t
                self._bytes += size
                while self._bytes > self.capacity_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= tensor_bytes(old)
                    self._evictions += 1

    def stats(self) -> dict:
        """Totals since the store was made, for the worker's metrics."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "bytes": self._bytes,
                    "items": len(self._items), "evictions": self._evictions,
                    "rejected": self._rejected, "capacity_bytes": self.capacity_bytes}

    def pop_window(self) -> dict:
        """Hits and misses since the last call (then zeroed): the hit rate of one log window."""
        with self._lock:
            window = {"hits": self._window_hits, "misses": self._window_misses}
            self._window_hits = self._window_misses = 0
        return window

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _discard(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= tensor_bytes(old)

    @staticmethod
    def _compact(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.untyped_storage().nbytes() > tensor_bytes(t):
            t = t.clone(memory_format=torch.contiguous_format)
        return t
