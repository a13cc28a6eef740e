"""Text generation on the front end: the scheduler that drives a GPT's decode steps on the replicas.

Next to the batch Dispatcher (one request, one batch, one answer), a generated sequence is many
steps. A request becomes a `Sequence` in the waiting queue; each replica has a thread that
loops over decode steps: one RPC to its first stage (`kv_cache.decode_on_stage`) carries every
running sequence's new tokens, the replica's stages keep each sequence's KV cache, and the
last-position logits come back. The front end draws each sequence's next byte with the
sequence's own seeded generator (batch composition never changes a draw) and hands it to the
caller at once (a stream sends it as its own response).

Continuous batching (`serve.continuous_batching`, default): a waiting sequence joins a replica's
running batch at its next step, up to serve.max_batch_size sequences. Off: a replica takes new
sequences only once its running batch has ended. A sequence ends at its max_tokens, when its
caller cancels (a stream closed, a client gone), or at its deadline; its caches are freed on
every stage with the next step (or a step of its own when none follows).
"""

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional

import grpc
import torch
import torch.distributed.rpc as rpc

from rpc_train.config.errors import first_line
from rpc_train.generation.sampling import Sampling, next_token, step_input
from rpc_train.serve.dispatch import Refused, Replica
from rpc_train.serve.kv_cache import decode_on_stage
from rpc_train.serve.replica import Key

log = logging.getLogger(__name__)

_END = object()
IDLE_WAIT_S = 0.5


@dataclass(eq=False)
class Sequence:
    id: int
    key: Key
    tokens: List[int]  # the prompt, then every byte drawn
    sampling: Sampling
    context: int
    deadline: Optional[float]
    generator: torch.Generator = None
    made: int = 0
    cached: int = 0  # positions in its caches on the replica (0: none yet)
    cancelled: bool = False
    out: "queue.Queue" = field(default_factory=queue.Queue)  # bytes (int), then _END or a ServeError
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.generator = self.sampling.generator()


class TokenStream:
    """One sequence's bytes, as they are drawn; `cancel()` ends it (its caller left)."""

    def __init__(self, scheduler: "GenerationScheduler", sequence: Sequence):
        self.scheduler, self.sequence = scheduler, sequence

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self.sequence.out.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self) -> None:
        self.scheduler.cancel(self.sequence)


class GenerationScheduler:
    def __init__(self, replicas: List[Replica], max_batch: int, max_waiting: int, continuous: bool,
                 timeout_s: float, on_step: Callable[[Key, int, float], None] = lambda key, rows, seconds: None,
                 send: Optional[Callable] = None):
        """`on_step((model, version), sequences, seconds)` is told of every decode step a replica
        answered; `send(replica, key, steps, ended)` sends one (default: `decode_on_stage` by RPC)."""
        self.send = send or self._rpc
        self.replicas, self.max_batch, self.max_waiting = replicas, max_batch, max_waiting
        self.continuous, self.timeout_s, self.on_step = continuous, timeout_s, on_step
        self._cv = threading.Condition()
        self._waiting: Deque[Sequence] = deque()
        self._running: Dict[int, List[Sequence]] = {r.replica: [] for r in replicas}
        self._live: Dict[int, int] = {r.replica: 0 for r in replicas}  # caches each replica last reported
        self._ids = itertools.count()
        self._accepting, self._stopped = True, threading.Event()
        self._threads = [threading.Thread(target=self._decode_forever, args=(r,), name=f"decode{r.replica}",
                                          daemon=True) for r in replicas]
        for thread in self._threads:
            thread.start()

    # -- the callers' side
    def submit(self, key: Key, prompt: bytes, sampling: Sampling, context: int,
               deadline: Optional[float]) -> TokenStream:
        sequence = Sequence(next(self._ids), key, list(prompt), sampling, context, deadline)
        with self._cv:
            if not self._accepting:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
            if not any(r.in_rotation and key in r.loaded for r in self.replicas):
                raise Refused(grpc.StatusCode.UNAVAILABLE, "no replica in rotation has the model; retry shortly")
            if len(self._waiting) >= self.max_waiting:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(self._waiting)} sequences wait already, serve.max_queue_size="
                              f"{self.max_waiting}; retry later")
            self._waiting.append(sequence)
            self._cv.notify_all()
        return TokenStream(self, sequence)

    def cancel(self, sequence: Sequence) -> None:
        with self._cv:
            if sequence in self._waiting:
                self._waiting.remove(sequence)
            sequence.cancelled = True
            sequence.out.put(_END)  # a caller blocked on its next byte returns
            self._cv.notify_all()

    def live_caches(self) -> int:
        """Sequences whose KV caches the replicas hold, as their last step reported."""
        with self._cv:
            return sum(self._live.values())

    def running(self) -> int:
        with self._cv:
            return len(self._waiting) + sum(map(len, self._running.values()))

    def drain(self, timeout_s: float) -> bool:
        """Take no new sequence, let the running and waiting ones end, stop; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._accepting = False
            while (self._waiting or any(self._running.values())) and time.monotonic() < deadline:
                self._cv.wait(min(IDLE_WAIT_S, max(0.0, deadline - time.monotonic())))
            left = list(self._waiting) + [s for seqs in self._running.values() for s in seqs]
        for sequence in left:
            sequence.out.put(Refused(grpc.StatusCode.UNAVAILABLE, "the server stopped before the sequence ended"))
        self._stopped.set()
        with self._cv:
            self._cv.notify_all()
        return not left

    # -- a replica's decode loop
    def _decode_forever(self, replica: Replica) -> None:
        running, ended = self._running[replica.replica], []  # ended: ids whose caches to free
        while not self._stopped.is_set():
            with self._cv:
                while not self._stopped.is_set() and not running and not ended and not self._takeable(replica):
                    self._cv.wait(IDLE_WAIT_S)
                if self._stopped.is_set():
                    return
                if self.continuous or not running:
                    while len(running) < self.max_batch and self._takeable(replica):
                        running.append(self._take(replica))
                ended += self._end_finished(running)
            try:
                ended = self._step(replica, running, ended)
            except Exception as err:  # noqa: BLE001 - the replica failed or timed out: its sequences end
                log.warning("replica %d failed a decode step: %s", replica.replica, first_line(err))
                with self._cv:
                    for sequence in running:
                        sequence.out.put(Refused(grpc.StatusCode.UNAVAILABLE, f"replica {replica.replica} failed "
                                                 f"while generating ({first_line(err)}); retry"))
                    running.clear()
                    self._cv.notify_all()
                ended = []  # its caches: dropped there after serve.sequence_idle_s

    def _takeable(self, replica: Replica) -> bool:
        return (replica.in_rotation and not replica.paused
                and any(s.key in replica.loaded for s in self._waiting))

    def _take(self, replica: Replica) -> Sequence:
        sequence = next(s for s in self._waiting if s.key in replica.loaded)
        self._waiting.remove(sequence)
        return sequence

    def _end_finished(self, running: List[Sequence]) -> List[int]:
        """Drop cancelled and expired sequences (called with the lock held); the ids whose caches to free."""
        now, ended = time.monotonic(), []
        for sequence in [s for s in running if s.cancelled or (s.deadline is not None and s.deadline <= now)]:
            running.remove(sequence)
            if not sequence.cancelled:
                sequence.out.put(Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while generating"))
            ended.append(sequence.id)
        if ended:
            self._cv.notify_all()
        return ended

    def _step(self, replica: Replica, running: List[Sequence], ended: List[int]) -> List[int]:
        """One decode step of every running sequence (one RPC per (model, version) among them),
        freeing the caches of `ended`; the ids of the sequences it finished."""
        began, calls = time.monotonic(), []
        keys = list(dict.fromkeys(s.key for s in running))
        if not keys:  # only caches to free: a step without sequences, to any model's module
            keys = [next(iter(replica.loaded), ("", ""))]
        for i, key in enumerate(keys):
            batch, steps = [s for s in running if s.key == key], []
            for sequence in batch:
                feed, start = step_input(sequence.tokens, sequence.cached, sequence.context)
                steps.append((sequence.id, torch.tensor([feed]), start))
                sequence.cached = start + len(feed)
            calls.append((key, batch, self.send(replica, key, steps, ended if i == 0 else [])))
        finished, live = [], 0
        for key, batch, call in calls:
            logits, counts = call.wait()
            live = max(counts)
            if batch:
                self.on_step(key, len(batch), time.monotonic() - began)
            finished += self._draw(batch, logits)
        with self._cv:
            for sequence in [s for s in running if s.id in finished]:
                running.remove(sequence)
            self._live[replica.replica] = live
            self._cv.notify_all()
        return finished

    def _rpc(self, replica: Replica, key: Key, steps: list, ended: List[int]) -> torch.futures.Future:
        return rpc.rpc_async(replica.workers[0], decode_on_stage, args=(replica.replica, 0, key, steps, ended),
                             timeout=self.timeout_s)

    @staticmethod
    def _draw(batch: List[Sequence], logits: torch.Tensor) -> List[int]:
        """Each sequence's next byte, handed to its caller; the ids of those at their max_tokens."""
        finished = []
        for sequence, row in zip(batch, logits):
            token = next_token(row, sequence.sampling, sequence.generator)
            sequence.tokens.append(token)
            sequence.made += 1
            sequence.out.put(token)
            if sequence.made >= sequence.sampling.max_tokens:
                sequence.out.put(_END)
                finished.append(sequence.id)
        return finished
