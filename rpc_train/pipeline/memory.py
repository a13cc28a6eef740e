"""A stage's peak memory per step: what the 1F1B bound (K-k micro-batches on stage k) limits.

On a GPU, the caching allocator's own peak (`torch.cuda.max_memory_allocated`) since the last
step. On a CPU no allocator keeps one, and the process's peak RSS says little: with
`runtime.hold_freed_memory` freed memory stays resident, so RSS only grows. There the meter
counts the activations themselves, the tensors autograd saves for the backward (parameters
excluded), from each micro-batch's forward until its backward ends on this stage.
"""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator

import torch

MB = 2 ** 20


class ActivationMeter:
    """Saved-for-backward bytes held on this stage; the caller serialises the updates.

    Counted by storage, once however many micro-batches hold it: stage 0's micro-batches are
    views of one batch, and a first layer that saves its input saves that one storage.
    """

    def __init__(self, params: Iterable[torch.Tensor], device: torch.device):
        self.device = device
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._by_seq: Dict[int, Dict[int, int]] = {}  # micro-batch -> {storage: bytes}
        self._holders: Dict[int, int] = {}  # storage -> micro-batches holding it
        self._held = self._peak = 0

    @contextmanager
    def forward(self, seq: int) -> Iterator[None]:
        """Counts what autograd saves inside the block as micro-batch `seq`'s activations."""
        if self.device.type == "cuda":  # the allocator keeps its own peak there
            yield
            return
        saved: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._params:
                saved[storage.data_ptr()] = storage.nbytes()
            # Not `t` itself: a saved output that refers to its own grad_fn would make a cycle.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self._by_seq[seq] = saved

    def held(self, seq: int) -> None:
        """Micro-batch `seq` finished its forward here: its activations are held."""
        for ptr, size in self._by_seq.get(seq, {}).items():
            self._holders[ptr] = self._holders.get(ptr, 0) + 1
            if self._holders[ptr] == 1:
                self._held += size
        self._peak = max(self._peak, self._held)

    def released(self, seq: int) -> None:
        """Its backward ended here: autograd has freed them."""
        for ptr, size in self._by_seq.pop(seq, {}).items():
            self._holders[ptr] -= 1
            if self._holders[ptr] == 0:
                del self._holders[ptr]
                self._held -= size

    def pop_peak_mb(self) -> float:
        """The peak since the last call, in MiB; the next period starts from what is held now."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / MB
        peak, self._peak = self._peak, self._held
        return peak / MB
