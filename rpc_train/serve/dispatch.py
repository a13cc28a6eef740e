"""The front end's request path: queue -> dynamic batch -> a replica by `rpc_async` -> replies.

A handler `submit`s its rows and waits for its `Pending` to be answered. One batching thread
takes whole requests off the queue into batches of at most `max_batch_size` rows, whenever the
routing policy finds a replica with room (fewer than `max_inflight_batches` in flight), and
sends each with `rpc_async`: nothing here blocks on a replica. Replies are split back to their
requests in the future's callback.

Every request is for one (model, version), its key; a batch holds one key's requests only
(one queue per key: the batcher serves the key whose head has waited longest) and goes to a
replica that has that key loaded, so no request is ever computed by two versions. A replica
being reloaded is paused: no batch is sent to it, its in-flight ones finish, and its requests
wait in the queue meanwhile (`pause`/`resume`); `retire` stops taking a key and waits until no
queued or in-flight batch uses it.

A replica that fails or exceeds `replica_timeout_s` leaves the rotation and its requests go
back to the head of their queue (once: a second failure answers UNAVAILABLE), so a retry waits
for room like any batch. A prober sends a real batch through each replica out of rotation and
brings it back when it answers. A batch whose RPC timed out may still be computing there: it
counts against the replica's `max_inflight_batches` until the replica says it ended.
"""

import itertools
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import grpc
import torch
import torch.distributed.rpc as rpc

from rpc_train.config.errors import first_line
from rpc_train.runtime.liveness import timed_out
from rpc_train.serve.admission import arrived
from rpc_train.serve.replica import Key, infer_on_stage, probe
from rpc_train.serve.routing import Policy, ReplicaLoad
from rpc_train.serve.tensors import ServeError

log = logging.getLogger(__name__)

PROBE_EVERY_S = 0.5
_FINISHING = threading.Lock()


class Refused(ServeError):
    """A request not answered with logits: RESOURCE_EXHAUSTED (full), UNAVAILABLE (draining, no
    replica), NOT_FOUND (its version was unloaded), DEADLINE_EXCEEDED, or INTERNAL (a reply that
    does not fit its batch: our bug)."""


@dataclass(eq=False)  # by identity: the dispatcher keeps a set of them
class Pending:
    """One request's rows (a tensor per input), waiting for their logits."""

    key: Key  # (model, version): the only version that may compute it
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
    on_finish: Callable[[], None] = lambda: None  # the dispatcher's bookkeeping
    notify: Callable[[], None] = lambda: None  # then the caller's, e.g. to wake an event loop
    retried: bool = False  # back in the queue once after a replica failed with it

    def finish(self, logits: Optional[torch.Tensor] = None, batch_rows: int = 0,
               error: Optional[Refused] = None, compute_s: Optional[float] = None) -> None:
        """The first answer counts: a late reply after the drain gave up on it changes nothing."""
        with _FINISHING:
            if self.done.is_set():
                return
            self.logits, self.batch_rows, self.error, self.compute_s = logits, batch_rows, error, compute_s
            self.done.set()
        self.on_finish()
        self.notify()

    def __len__(self) -> int:
        return len(self.rows[0])


@dataclass
class Replica(ReplicaLoad):
    workers: Sequence[str] = ()  # its stages' workers, first to last
    loaded: Set[Key] = field(default_factory=set)  # the (model, version)s it can compute
    paused: bool = False  # being reloaded: in rotation, but no batch goes to it
    # Batches whose RPC timed out but which may still run there (id -> (rows, key)); they stay
    # counted in batches_in_flight and rows_in_flight until a probe says they ended.
    lingering: Dict[int, Tuple[int, Key]] = field(default_factory=dict)
    probing: bool = False  # a probe is on its way


@dataclass(frozen=True)
class BatchingLimits:
    max_batch_size: int
    max_inflight_batches: int
    max_queue_delay_s: float
    max_queue_rows: int
    replica_timeout_s: float
    max_waiting_requests: int = 0  # requests waiting at once (serve.threads: each holds a thread); 0: any


class Dispatcher:
    def __init__(self, replicas: List[Replica], policy: Policy, limits: BatchingLimits,
                 on_batch: Callable[[int, int], None] = lambda replica, rows: None,
                 on_computed: Callable[[Key, int, float], None] = lambda key, rows, seconds: None):
        """`on_batch(replica, rows)` is told of every batch sent (for logs and metrics),
        `on_computed((model, version), rows, seconds)` of every batch a replica answered and its time there."""
        self.replicas, self.policy, self.limits, self.on_batch = replicas, policy, limits, on_batch
        self.on_computed = on_computed
        self._cv = threading.Condition()
        self._queues: "OrderedDict[Key, Deque[Pending]]" = OrderedDict()  # one a key
        self._queued_rows = 0
        self._in_flight: Counter = Counter()  # batches out, by key
        self._retired: Set[Key] = set()  # keys no longer taken
        self._open: "weakref.WeakSet[Pending]" = weakref.WeakSet()  # submitted, maybe unanswered
        self._accepting, self._unready, self._stopped = True, False, threading.Event()
        self._batch_ids = itertools.count()
        self._waiting = 0  # submitted, not answered yet
        # One zero row of each key's inputs, from its last batch: what a probe sends.
        self._probe_rows: Dict[Key, Tuple[torch.Tensor, ...]] = {}
        self._threads = [threading.Thread(target=self._batch_forever, name="batcher", daemon=True),
                         threading.Thread(target=self._probe_forever, name="prober", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- the handlers' side
    def ready(self) -> bool:
        return self._accepting and not self._unready and any(r.in_rotation for r in self.replicas)

    def unready(self) -> None:
        """Say not ready from now on, while still taking requests (a drain's grace period)."""
        self._unready = True

    def loaded_everywhere(self, key: Key) -> bool:
        """Every replica in rotation has `key` loaded (the default version must be)."""
        return all(key in r.loaded for r in self.replicas if r.in_rotation)

    def loaded_anywhere(self, key: Key) -> bool:
        return any(key in r.loaded for r in self.replicas if r.in_rotation)

    def submit(self, key: Key, rows: Tuple[torch.Tensor, ...], deadline: Optional[float],
               notify: Callable[[], None] = lambda: None, arrived_at: Optional[float] = None) -> Pending:
        """Queue `rows`; `notify()` is called, on whichever thread answers, once it is answered.
        Its queue time counts from `arrived_at`, by default the call's arrival in gRPC's pool
        (admission.py)."""
        pending = Pending(key, tuple(rows), deadline, enqueued=arrived_at or arrived(), on_finish=self._answered_one,
                          notify=notify)
        with self._cv:
            if not self._accepting:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
            if key in self._retired:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"model '{key[0]}' version '{key[1]}' was unloaded")
            if not any(r.in_rotation for r in self.replicas):
                raise Refused(grpc.StatusCode.UNAVAILABLE, "no replica is in rotation; retry shortly")
            waiting = self.limits.max_waiting_requests
            if waiting and self._waiting >= waiting:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._waiting} requests are waiting already, serve.threads={waiting}; retry later")
            if self._queued_rows + len(pending) > self.limits.max_queue_rows:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the queue holds {self._queued_rows} rows and serve.max_queue_size="
                              f"{self.limits.max_queue_rows}; retry later")
            self._queues.setdefault(key, deque()).append(pending)
            self._open.add(pending)
            self._waiting += 1
            self._queued_rows += len(pending)
            now = self._batch_now(key)
            if now is None:
                self._cv.notify_all()
        if now is not None:
            self._send(*now)
        return pending

    def _batch_now(self, key: Key) -> Optional[Tuple[Replica, List[Pending]]]:
        """(replica, batch) when the batcher would send `key`'s queue at once anyway: no fill wait,
        no other key's request waiting longer, and a replica with room. The caller's thread then
        sends it, sparing a wake-up of the batching thread on the way of every request to an idle
        server (called with the lock held)."""
        if self.limits.max_queue_delay_s > 0 or self._next_key() != key:
            return None
        ready = self._ready_replicas(key)
        batch = self._take_batch(key) if ready else []
        if not batch:
            return None
        replica = self.policy(ready)
        self._count(replica, batch, +1)
        return replica, batch

    def _answered_one(self) -> None:
        with self._cv:
            self._waiting -= 1

    # -- reloading
    def pause(self, replica: Replica, timeout_s: float) -> bool:
        """Stop sending `replica` batches and wait for its in-flight ones; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            replica.paused = True
            while replica.batches_in_flight and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            return not replica.batches_in_flight

    def resume(self, replica: Replica, loaded: Optional[Key] = None) -> None:
        with self._cv:
            if loaded is not None:
                replica.loaded.add(loaded)
            replica.paused = False
            self._cv.notify_all()

    def retire(self, key: Key, timeout_s: float) -> bool:
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
            self._probe_rows.pop(key, None)
            return idle

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, answer every queued and in-flight one, stop; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
            while self._queued_rows or self._awaited():
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    break
            drained = not self._queued_rows and not self._awaited()
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

    def _awaited(self) -> bool:
        """Some batch in flight has requests waiting for it (lingering ones have none)."""
        return any(r.batches_in_flight > len(r.lingering) for r in self.replicas)

    # -- the batching thread
    def _ready_replicas(self, key: Key) -> List[Replica]:
        return [r for r in self.replicas
                if r.can_take(self.limits.max_inflight_batches) and not r.paused and key in r.loaded]

    def _next_key(self) -> Optional[Key]:
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
            self._send(replica, batch)

    def _fill_wait(self, key: Key) -> None:
        """With serve.max_queue_delay_ms > 0, hold the batch until it fills or its oldest request
        has waited that long (called with the lock held)."""
        delay = self.limits.max_queue_delay_s
        while delay > 0 and self._queues.get(key) and sum(map(len, self._queues[key])) < self.limits.max_batch_size:
            left = self._queues[key][0].enqueued + delay - time.monotonic()
            if left <= 0 or self._stopped.is_set():
                return
            self._cv.wait(left)

    def _take_batch(self, key: Key) -> List[Pending]:
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
    def _send(self, replica: Replica, batch: List[Pending]) -> None:
        key = batch[0].key
        inputs = tuple(torch.cat(rows) for rows in zip(*(p.rows for p in batch))) if len(batch) > 1 \
            else batch[0].rows
        self._probe_rows[key] = tuple(torch.zeros_like(x[:1]) for x in inputs)
        now, batch_id = time.monotonic(), next(self._batch_ids)
        for pending in batch:
            pending.sent = pending.sent or now
        self.on_batch(replica.replica, len(inputs[0]))
        try:
            future = rpc.rpc_async(replica.workers[0], infer_on_stage, args=(replica.replica, 0, key, inputs, batch_id),
                                   timeout=self.limits.replica_timeout_s)
        except RuntimeError as err:  # the agent knows the connection is gone
            self._answered(replica, batch, batch_id, now, None, err)
            return
        future.add_done_callback(lambda f: self._answered(replica, batch, batch_id, now, f, None))

    def _answered(self, replica: Replica, batch: List[Pending], batch_id: int, sent: float, future, error) -> None:
        try:
            parts = _split(future.wait(), batch) if error is None else None
        except _BadReply as err:  # the replica answered, with something that does not fit the batch
            self._settle(replica, batch, batch_id, lingers=False, served=True)
            log.error("replica %d answered a batch of %d requests with %s; answering them INTERNAL",
                      replica.replica, len(batch), err)
            for pending in batch:
                pending.finish(error=Refused(grpc.StatusCode.INTERNAL, "the replica's answer did not fit the batch "
                                             "(the server's log says why)"))
            return
        except Exception as err:  # noqa: BLE001 - the replica raised, died or timed out
            error = err
        if error is None:
            seconds, rows = time.monotonic() - sent, sum(map(len, batch))
            self._settle(replica, batch, batch_id, lingers=False, served=True)
            self.on_computed(batch[0].key, rows, seconds)
            for pending, part in parts:
                pending.finish(part, batch_rows=rows, compute_s=seconds)
            return
        with self._cv:
            # Out of rotation and back in the queue in one step: a drain never sees the requests
            # nowhere, and the batcher never hands them to this replica again before a probe.
            was_in = replica.in_rotation
            replica.in_rotation = False
            self._settle(replica, batch, batch_id, lingers=timed_out(error), served=False)
            self._requeue(batch, replica, error)
        if was_in:
            log.warning("replica %d (%s) is out of rotation: %s", replica.replica, ", ".join(replica.workers),
                        first_line(error))

    def _settle(self, replica: Replica, batch: List[Pending], batch_id: int, lingers: bool, served: bool) -> None:
        """The batch is answered (or given up on): free its place, unless it may still be running."""
        with self._cv:
            if lingers:
                replica.lingering[batch_id] = (sum(map(len, batch)), batch[0].key)
            else:
                self._count(replica, batch, -1)
            replica.served += served
            self._cv.notify_all()

    def _requeue(self, batch: List[Pending], failed: Replica, error: BaseException) -> None:
        """A failed batch's requests go back to the head of their queue, once; called with the lock held."""
        key = batch[0].key
        retry = not self._stopped.is_set() and key not in self._retired and any(
            r.in_rotation and key in r.loaded for r in self.replicas)
        now = time.monotonic()
        for pending in reversed(batch):
            if pending.done.is_set():
                continue
            if pending.abandoned or (pending.deadline is not None and pending.deadline <= now):
                pending.finish(error=Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                             "the deadline passed before a replica answered"))
            elif pending.retried or not retry:
                pending.finish(error=Refused(grpc.StatusCode.UNAVAILABLE,
                                             f"replica {failed.replica} failed ({first_line(error)}) and no other "
                                             "could take the request; retry"))
            else:
                pending.retried = True
                self._queues.setdefault(key, deque()).appendleft(pending)
                self._queued_rows += len(pending)
        self._cv.notify_all()

    # -- rotation
    def _probe_forever(self) -> None:
        """Every PROBE_EVERY_S: a real batch through each replica out of rotation (back in when it
        answers), and which of a replica's lingering batches still run."""
        while not self._stopped.wait(PROBE_EVERY_S):
            for replica in self.replicas:
                try:
                    self._probe(replica)
                except Exception as err:  # noqa: BLE001 - the RPC agent refused the call: next round
                    replica.probing = False
                    log.debug("probing replica %d: %s", replica.replica, first_line(err))

    def _probe(self, replica: Replica) -> None:
        with self._cv:
            if replica.probing or (replica.in_rotation and not replica.lingering):
                return
            replica.probing, ids = True, list(replica.lingering)
            batch = None if replica.in_rotation else self._probe_batch(replica)
        future = rpc.rpc_async(replica.workers[0], probe, args=(replica.replica, batch, ids),
                               timeout=self.limits.replica_timeout_s)
        future.add_done_callback(lambda f: self._probed(replica, f))

    def _probe_batch(self, replica: Replica) -> Optional[Tuple[Key, Tuple[torch.Tensor, ...]]]:
        """A real batch for `replica`: a zero row of a version it has loaded and that was served
        before (None: nothing known to send, the probe only asks which batches still run)."""
        key = next((k for k in replica.loaded if k in self._probe_rows), None)
        return None if key is None else (key, self._probe_rows[key])

    def _probed(self, replica: Replica, future) -> None:
        try:
            running = set(future.wait())
        except Exception:  # noqa: BLE001 - still stuck, silent or gone: next round
            replica.probing = False
            return
        with self._cv:
            for batch_id in [i for i in replica.lingering if i not in running]:
                rows, key = replica.lingering.pop(batch_id)
                replica.batches_in_flight -= 1
                replica.rows_in_flight -= rows
                self._in_flight[key] -= 1
            back = not replica.in_rotation and not self._stopped.is_set()
            replica.in_rotation, replica.probing = True, False
            self._cv.notify_all()
        if back:
            log.warning("replica %d (%s) answers again: back in rotation%s", replica.replica,
                        ", ".join(replica.workers),
                        f" ({len(replica.lingering)} timed-out batch(es) still running there)" if replica.lingering
                        else "")


class _BadReply(Exception):
    pass


def _split(logits, batch: List[Pending]) -> list:
    """(request, its rows of the logits) for each request of the batch; _BadReply if they do not fit."""
    sizes = [len(p) for p in batch]
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or len(logits) != sum(sizes):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise _BadReply(f"{shape} for {sum(sizes)} rows")
    return list(zip(batch, logits.split(sizes)))
