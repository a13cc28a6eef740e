"""A consumer's view of the data workers: which one makes each batch, and what to do when one fails.

The consumer keeps up to `loader.prefetch` batch requests in flight (`rpc_async`), each sent
to the worker the routing policy picks (serving's policies, serve/routing.py), and takes the
batches back in index order. A worker that raises or does not answer within
`loader.timeout_s` leaves the rotation (one log line naming it); every batch it still owes
this consumer is asked of another worker, and it is probed until it answers and comes back.
A batch is a pure function of its ids and epoch, so asking again is safe: each batch index is
handed to the consumer once, in order, whichever worker made it.
"""

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from rpc_train.config.errors import RunFailure, first_line
from rpc_train.serve.routing import POLICIES, ReplicaLoad

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # how often a worker out of the rotation is asked whether it answers again


@dataclass
class Pending:
    """One batch this consumer asked for and has not taken yet."""

    index: int
    ids: torch.Tensor
    worker: int = -1
    future: Optional[torch.futures.Future] = None
    attempts: int = 0
    errors: List[str] = field(default_factory=list)


class WorkerPool:
    def __init__(self, workers: List, names: List[str], prefetch: int, timeout_s: float, routing: str,
                 consumer: str):
        """`workers`: RRefs to the DataWorker of each data worker, named `names`."""
        self.workers, self.names, self.consumer = workers, names, consumer
        self.prefetch, self.timeout_s = prefetch, timeout_s
        self.loads = [ReplicaLoad(i) for i in range(len(workers))]
        self.pick = POLICIES[routing]()
        self._probes: Dict[int, Tuple[float, Optional[torch.futures.Future]]] = {}
        self.retries = 0  # batches asked again of another worker

    def stream(self, batches: Iterable[Tuple[int, torch.Tensor]], split: str, epoch: int) -> Iterator:
        """(index, what the worker returned) for each batch (index, ids), in order."""
        window: Deque[Pending] = collections.deque()
        requests = iter(batches)
        for index, ids in requests:
            window.append(self._send(Pending(index, ids), split, epoch))
            if len(window) >= self.prefetch:
                break
        while window:
            made = self._take(window, split, epoch)
            taken = window.popleft().index
            for index, ids in requests:  # one in for the one taken
                window.append(self._send(Pending(index, ids), split, epoch))
                break
            yield taken, made

    def _take(self, window: Deque[Pending], split: str, epoch: int):
        """The front batch's result, asking again elsewhere for as long as workers fail it."""
        pending = window[0]
        while True:
            try:
                made = pending.future.wait()
            except Exception as err:  # raised on the worker, or no answer within loader.timeout_s
                self._leave_rotation(pending.worker, first_line(err), window, split, epoch)
                continue
            self._done(pending, served=True)
            return made

    def _send(self, pending: Pending, split: str, epoch: int) -> Pending:
        if pending.attempts > len(self.workers):
            raise RunFailure(f"batch {pending.index} of the {split} split failed on every data worker "
                             f"({'; '.join(pending.errors)})")
        worker = self._choose()
        load = self.loads[worker]
        load.batches_in_flight += 1
        load.rows_in_flight += len(pending.ids)
        pending.worker, pending.attempts = worker, pending.attempts + 1
        pending.future = self.workers[worker].rpc_async(timeout=self.timeout_s).produce(split, pending.ids, epoch)
        return pending

    def _done(self, pending: Pending, served: bool = False) -> None:
        """`pending` is no longer on its worker's load; `served`: it answered (least_loaded's tie-break)."""
        load = self.loads[pending.worker]
        load.batches_in_flight -= 1
        load.rows_in_flight -= len(pending.ids)
        load.served += served

    def _choose(self) -> int:
        """A worker in the rotation, by the routing policy; while none is, wait for a probe."""
        deadline = time.monotonic() + 2 * self.timeout_s
        while True:
            self._probe()
            ready = [load for load in self.loads if load.in_rotation]
            if ready:
                return self.pick(ready).replica
            if time.monotonic() > deadline:
                raise RunFailure(f"no data worker answers ({', '.join(self.names)}): each left the rotation and "
                                 f"none answered a probe within 2 x loader.timeout_s={self.timeout_s:g} s")
            time.sleep(0.05)

    def _leave_rotation(self, worker: int, reason: str, window: Deque[Pending], split: str, epoch: int) -> None:
        """Take `worker` out and ask another for every batch of the window it owed."""
        owed = [p for p in window if p.worker == worker]
        load = self.loads[worker]
        if load.in_rotation:
            load.in_rotation = False
            self._probes[worker] = (time.monotonic(), None)
            log.warning("%s: data worker %s left the rotation (%s); its %d batch(es) go to another worker",
                        self.consumer, self.names[worker], reason, len(owed))
        for pending in owed:
            self._done(pending)
            pending.errors.append(f"{self.names[worker]}: {reason}")
            self.retries += 1
            self._send(pending, split, epoch)

    def _probe(self) -> None:
        """Ask each worker out of the rotation whether it answers; one that does comes back."""
        now = time.monotonic()
        for worker, (since, probe) in list(self._probes.items()):
            if probe is None:
                if now - since >= PROBE_EVERY_S:
                    self._probes[worker] = (now, self.workers[worker].rpc_async(timeout=self.timeout_s).ping())
            elif probe.done():
                try:
                    probe.wait()
                except Exception:
                    self._probes[worker] = (now, None)
                    continue
                del self._probes[worker]
                self.loads[worker].in_rotation = True
                log.warning("%s: data worker %s answers again and is back in the rotation",
                            self.consumer, self.names[worker])

    def pop_stats(self) -> Dict[str, float]:
        stats = {"retries": float(self.retries), "workers_in_rotation": float(sum(l.in_rotation for l in self.loads))}
        self.retries = 0
        return stats
