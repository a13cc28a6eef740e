"""The front end's request path: queue -> dynamic batch -> a replica by `rpc_async` -> replies.

A gRPC handler `submit`s its rows and waits for its `Pending` to be answered. One batching
thread takes whole requests off the queue into batches of at most `max_batch_size` rows,
whenever the routing policy finds a replica with room (fewer than `max_inflight_batches` in
flight), and sends each with `rpc_async`: nothing here blocks on a replica. Replies are split
back to their requests in the future's callback. A replica that fails or exceeds
`replica_timeout_s` leaves the rotation (its batch goes once to another) and a prober brings
it back when it answers again.

Every request is for one (model, version), its key; a batch holds one key's requests only
(one queue per key: the batcher serves the key whose head has waited longest) and goes to a
replica that has that key loaded, so no request is ever computed by two versions. A replica
being reloaded is paused: no batch is sent to it, its in-flight ones finish, and its requests
wait in the queue meanwhile (`pause`/`resume`); `retire` stops taking a key and waits until no
queued or in-flight batch uses it.
"""

import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Set, Tuple

import grpc
import torch
import torch.distributed.rpc as rpc

from rpc_train.config.errors import first_line
from rpc_train.serve.replica import answer, infer_on_stage
from rpc_train.serve.routing import Policy, ReplicaLoad
from rpc_train.serve.tensors import ServeError

log = logging.getLogger(__name__)

PROBE_EVERY_S = 0.5
_FINISHING = threading.Lock()


class Refused(ServeError):
    """A request the queue cannot take: RESOURCE_EXHAUSTED (full) or UNAVAILABLE (draining, no replica)."""


@dataclass(eq=False)  # by identity: the dispatcher keeps a set of them
class Pending:
    """One request's rows (a tensor per input), waiting for their logits."""

    key: Tuple[str, str]  # (model, version): the only version that may compute it
    rows: Tuple[torch.Tensor, ...]
    deadline: Optional[float]  # time.monotonic() after which nobody waits for it
    enqueued: float = field(default_factory=time.monotonic)
    sent: Optional[float] = None  # when its batch first left for a replica
    done: threading.Event = field(default_factory=threading.Event)
    logits: Optional[torch.Tensor] = None
    batch_rows: int = 0
    compute_s: Optional[float] = None  # its batch's time on the replica that answered
    error: Optional[Refused] = None
    abandoned: bool = False  # its caller stopped waiting: never compute it

    def finish(self, logits: Optional[torch.Tensor] = None, batch_rows: int = 0,
               error: Optional[Refused] = None, compute_s: Optional[float] = None) -> None:
        """The first answer counts: a late reply after the drain gave up on it changes nothing."""
        with _FINISHING:
            if self.done.is_set():
                return
            self.logits, self.batch_rows, self.error, self.compute_s = logits, batch_rows, error, compute_s
            self.done.set()

    def __len__(self) -> int:
        return len(self.rows[0])


@dataclass
class Replica(ReplicaLoad):
    workers: Sequence[str] = ()  # its stages' workers, first to last
    loaded: Set[Tuple[str, str]] = field(default_factory=set)  # the (model, version)s it can compute
    paused: bool = False  # being reloaded: in rotation, but no batch goes to it


@dataclass(frozen=True)
class BatchingLimits:
    max_batch_size: int
    max_inflight_batches: int
    max_queue_delay_s: float
    max_queue_rows: int
    replica_timeout_s: float


class Dispatcher:
    def __init__(self, replicas: List[Replica], policy: Policy, limits: BatchingLimits,
                 on_batch: Callable[[int, int], None] = lambda replica, rows: None,
                 on_computed: Callable[[Tuple[str, str], int, float], None] = lambda key, rows, seconds: None):
        """`on_batch(replica, rows)` is told of every batch sent (for logs and metrics),
        `on_computed((model, version), rows, seconds)` of every batch a replica answered and its time there."""
        self.replicas, self.policy, self.limits, self.on_batch = replicas, policy, limits, on_batch
        self.on_computed = on_computed
        self._cv = threading.Condition()
        self._queues: "OrderedDict[Tuple[str, str], Deque[Pending]]" = OrderedDict()  # one a key
        self._queued_rows = 0
        self._in_flight: Counter = Counter()  # batches out, by key
        self._retired: Set[Tuple[str, str]] = set()  # keys no longer taken
        self._open: "weakref.WeakSet[Pending]" = weakref.WeakSet()  # submitted, maybe unanswered
        self._accepting, self._stopped = True, threading.Event()
        self._threads = [threading.Thread(target=self._batch_forever, name="batcher", daemon=True),
                         threading.Thread(target=self._probe_forever, name="prober", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- the handlers' side
    def ready(self) -> bool:
        return self._accepting and any(r.in_rotation for r in self.replicas)

    def loaded_everywhere(self, key: Tuple[str, str]) -> bool:
        """Every replica in rotation has `key` loaded (the default version must be)."""
        return all(key in r.loaded for r in self.replicas if r.in_rotation)

    def loaded_anywhere(self, key: Tuple[str, str]) -> bool:
        return any(key in r.loaded for r in self.replicas if r.in_rotation)

    def submit(self, key: Tuple[str, str], rows: Tuple[torch.Tensor, ...], deadline: Optional[float]) -> Pending:
        pending = Pending(key, tuple(rows), deadline)
        with self._cv:
            if not self._accepting:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
            if key in self._retired:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"model '{key[0]}' version '{key[1]}' was unloaded")
            if not any(r.in_rotation for r in self.replicas):
                raise Refused(grpc.StatusCode.UNAVAILABLE, "no replica is in rotation; retry shortly")
            if self._queued_rows + len(pending) > self.limits.max_queue_rows:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the queue holds {self._queued_rows} rows and serve.max_queue_size="
                              f"{self.limits.max_queue_rows}; retry later")
            self._queues.setdefault(key, deque()).append(pending)
            self._open.add(pending)
            self._queued_rows += len(pending)
            self._cv.notify_all()
        return pending

    # -- reloading
    def pause(self, replica: Replica, timeout_s: float) -> bool:
        """Stop sending `replica` batches and wait for its in-flight ones; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            replica.paused = True
            while replica.batches_in_flight and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            return not replica.batches_in_flight

    def resume(self, replica: Replica, loaded: Optional[Tuple[str, str]] = None) -> None:
        with self._cv:
            if loaded is not None:
                replica.loaded.add(loaded)
            replica.paused = False
            self._cv.notify_all()

    def retire(self, key: Tuple[str, str], timeout_s: float) -> bool:
        """Take no more requests for `key`, wait until none is queued or in flight, then forget it
        on every replica (the caller frees the modules); False if some were still busy at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._retired.add(key)
            while (self._queues.get(key) or self._in_flight[key]) and time.monotonic() < deadline:
                self._cv.wait(min(PROBE_EVERY_S, max(0.0, deadline - time.monotonic())))
            idle = not self._queues.get(key) and not self._in_flight[key]
            for replica in self.replicas:
                replica.loaded.discard(key)
            return idle

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, answer every queued and in-flight one, stop; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
            while self._queued_rows or any(r.batches_in_flight for r in self.replicas):
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    break
            drained = not self._queued_rows and not any(r.batches_in_flight for r in self.replicas)
            left, self._queued_rows = list(self._open), 0
            self._queues.clear()
        # What the drain could not answer (a replica died with the batch) is answered now, so
        # that no caller waits on through the server's shutdown.
        for pending in left:
            pending.finish(error=Refused(grpc.StatusCode.UNAVAILABLE, "the server stopped before answering; retry"))
        self._stopped.set()
        with self._cv:
            self._cv.notify_all()
        return drained

    # -- the batching thread
    def _ready_replicas(self, key: Tuple[str, str]) -> List[Replica]:
        return [r for r in self.replicas
                if r.can_take(self.limits.max_inflight_batches) and not r.paused and key in r.loaded]

    def _next_key(self) -> Optional[Tuple[str, str]]:
        """The key whose oldest request has waited longest among those a replica can take now."""
        heads = [(queue[0].enqueued, key) for key, queue in self._queues.items()
                 if queue and self._ready_replicas(key)]
        return min(heads)[1] if heads else None

    def _batch_forever(self) -> None:
        while not self._stopped.is_set():
            with self._cv:
                while self._next_key() is None and not self._stopped.is_set():
                    self._cv.wait(PROBE_EVERY_S)
                if self._stopped.is_set():
                    return
                key = self._next_key()
                self._fill_wait(key)
                ready = self._ready_replicas(key)  # again: the wait for a fuller batch let go of the lock
                batch = self._take_batch(key) if ready else []
                if not batch:
                    continue
                replica = self.policy(ready)
                self._count(replica, batch, +1)
            self._send(replica, batch, retried=False)

    def _fill_wait(self, key: Tuple[str, str]) -> None:
        """With serve.max_queue_delay_ms > 0, hold the batch until it fills or its oldest request
        has waited that long (called with the lock held)."""
        delay = self.limits.max_queue_delay_s
        while delay > 0 and self._queues.get(key) and sum(map(len, self._queues[key])) < self.limits.max_batch_size:
            left = self._queues[key][0].enqueued + delay - time.monotonic()
            if left <= 0 or self._stopped.is_set():
                return
            self._cv.wait(left)

    def _take_batch(self, key: Tuple[str, str]) -> List[Pending]:
        """Whole requests from the head of `key`'s queue, up to max_batch_size rows; expired ones
        are dropped with DEADLINE_EXCEEDED, never computed (called with the lock held)."""
        batch, rows, now = [], 0, time.monotonic()
        queue = self._queues.get(key, deque())
        while queue and rows + len(queue[0]) <= self.limits.max_batch_size:
            pending = queue.popleft()
            self._queued_rows -= len(pending)
            if pending.abandoned or (pending.deadline is not None and pending.deadline <= now):
                pending.finish(error=Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                             "the deadline passed while the request was queued"))
                continue
            batch.append(pending)
            rows += len(pending)
        if not queue:
            self._queues.pop(key, None)
        return batch

    def _count(self, replica: Replica, batch: List[Pending], sign: int) -> None:
        replica.batches_in_flight += sign
        replica.rows_in_flight += sign * sum(map(len, batch))
        self._in_flight[batch[0].key] += sign

    # -- a batch on a replica
    def _send(self, replica: Replica, batch: List[Pending], retried: bool) -> None:
        inputs = tuple(torch.cat(rows) for rows in zip(*(p.rows for p in batch))) if len(batch) > 1 \
            else batch[0].rows
        now = time.monotonic()
        for pending in batch:
            pending.sent = pending.sent or now
        self.on_batch(replica.replica, len(inputs[0]))
        try:
            future = rpc.rpc_async(replica.workers[0], infer_on_stage,
                                   args=(replica.replica, 0, batch[0].key, *inputs),
                                   timeout=self.limits.replica_timeout_s)
        except RuntimeError as err:  # the agent knows the connection is gone
            self._answered(replica, batch, retried, None, err)
            return
        future.add_done_callback(lambda f: self._answered(replica, batch, retried, f, None, now))

    def _answered(self, replica: Replica, batch: List[Pending], retried: bool, future, error,
                  sent: float = 0.0) -> None:
        try:
            logits = future.wait() if error is None else None
        except Exception as err:  # noqa: BLE001 - the replica raised, died or timed out
            error = err
        with self._cv:
            self._count(replica, batch, -1)
            if error is None:
                replica.served += 1
            self._cv.notify_all()
        if error is None:
            seconds = time.monotonic() - sent
            self.on_computed(batch[0].key, len(logits), seconds)
            for pending, part in zip(batch, logits.split([len(p) for p in batch])):
                pending.finish(part, batch_rows=len(logits), compute_s=seconds)
            return
        self._take_out(replica, error)
        other = None if retried else self._another(replica, batch)
        if other is not None:
            self._send(other, batch, retried=True)
            return
        for pending in batch:
            pending.finish(error=Refused(grpc.StatusCode.UNAVAILABLE,
                                         f"replica {replica.replica} failed ({first_line(error)}) and no other "
                                         "could take the batch; retry"))

    def _another(self, failed: Replica, batch: List[Pending]) -> Optional[Replica]:
        with self._cv:
            others = [r for r in self.replicas
                      if r.in_rotation and not r.paused and batch[0].key in r.loaded and r is not failed]
            if not others:
                return None
            choice = self.policy(others)
            self._count(choice, batch, +1)
            return choice

    # -- rotation
    def _take_out(self, replica: Replica, error: BaseException) -> None:
        with self._cv:
            if not replica.in_rotation:
                return
            replica.in_rotation = False
        log.warning("replica %d (%s) is out of rotation: %s", replica.replica, ", ".join(replica.workers),
                    first_line(error))

    def _probe_forever(self) -> None:
        while not self._stopped.wait(PROBE_EVERY_S):
            for replica in [r for r in self.replicas if not r.in_rotation]:
                if self._answers(replica):
                    with self._cv:
                        replica.in_rotation = True
                        self._cv.notify_all()
                    log.warning("replica %d (%s) answers again: back in rotation", replica.replica,
                                ", ".join(replica.workers))

    def _answers(self, replica: Replica) -> bool:
        probes = [rpc.rpc_async(w, answer, timeout=min(2.0, self.limits.replica_timeout_s)) for w in replica.workers]
        try:
            torch.futures.wait_all(probes)
            return True
        except Exception:  # noqa: BLE001 - still silent or gone: try again later
            return False
