"""The KV caches of the sequences a replica generates, held on its stages' workers.

Each stage keeps a `SequenceCaches`: one `KVCache` per sequence id, holding the keys and values
of the stage's own blocks only. A decode step (`decode_on_stage`) is one RPC to the replica's
first stage carrying, for every sequence of the batch, its id, its new tokens and the position
of the first; each stage runs its layers' `decode` on each sequence with that sequence's cache
and passes the new positions' hidden states on, and the last stage answers the last position's
logits of every sequence, one row each. Start 0 means a new cache (a new sequence, or one that
slid past the model's context). A step also names the sequences that ended (their caches are
freed on every stage after the step); a cache no step touched for `serve.sequence_idle_s` is
dropped too, so a front end that lost track of a sequence leaks nothing for long.

Sequences of one step are decoded one after another inside the stage, each at its own
length, not padded into one batched call: a sequence's logits then never depend on what else is
in the batch (docs/serving.md says what padding would buy).
"""

import threading
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed.rpc as rpc

from models.gpt import KVCache

Step = Tuple[int, torch.Tensor, int]  # (sequence id, its new tokens [1, t] or hidden states [1, t, dim], start)
WARM_UP = -1  # the sequence id of a load's warm-up step


class SequenceCaches:
    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._caches: Dict[int, Tuple[tuple, KVCache, float]] = {}  # id -> ((model, version), cache, last used)
        self._lock = threading.Lock()

    def for_step(self, key: tuple, sequence: int, start: int) -> KVCache:
        with self._lock:
            if start == 0:
                cache = KVCache()
            elif sequence in self._caches:
                cache = self._caches[sequence][1]
            else:
                raise KeyError(f"sequence {sequence} has no KV cache here (freed, or idle over "
                               f"serve.sequence_idle_s={self.idle_s:g} s)")
            self._caches[sequence] = (key, cache, time.monotonic())
            return cache

    def free(self, sequences: Sequence[int]) -> None:
        with self._lock:
            for sequence in sequences:
                self._caches.pop(sequence, None)

    def free_model(self, key: tuple) -> None:
        """A version unloaded: its sequences' caches go with it."""
        with self._lock:
            for sequence in [s for s, (k, _, _) in self._caches.items() if k == key]:
                del self._caches[sequence]

    def drop_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        with self._lock:
            for sequence in [s for s, (_, _, used) in self._caches.items() if used < cutoff]:
                del self._caches[sequence]

    def __len__(self) -> int:
        with self._lock:
            return len(self._caches)


@rpc.functions.async_execution
def decode_on_stage(replica: int, stage: int, key: tuple, steps: List[Step],
                    ended: Sequence[int] = ()) -> torch.futures.Future:
    """One decode step of `steps` through this stage and the ones after it: (last-position
    logits [len(steps), vocab], each stage's count of live caches)."""
    from rpc_train.serve.replica import _LOCAL  # the stages hosted here

    here = _LOCAL[(replica, stage)]
    caches, outputs = here.sequences, []
    caches.drop_idle()
    module = here.modules[key] if steps else None
    with torch.no_grad():
        for sequence, x, start in steps:
            cache = caches.for_step(key, sequence, start)
            x = x.to(here.device)
            for layer in module:
                x = layer.decode(x, cache, start)
            outputs.append(x.cpu())
    caches.free(ended)
    live = len(caches)
    if here.next_worker is None:
        done = torch.futures.Future()
        done.set_result((torch.stack([x[0, -1] for x in outputs]) if outputs else torch.empty(0), [live]))
        return done
    passed = [(sequence, x, start) for (sequence, _, start), x in zip(steps, outputs)]
    after = rpc.rpc_async(here.next_worker, decode_on_stage, args=(replica, stage + 1, key, passed, ended))
    return after.then(lambda f: (f.value()[0], [live] + f.value()[1]))
