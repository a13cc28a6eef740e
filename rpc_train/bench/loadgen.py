"""Load for a serving job from real gRPC clients in processes of their own.

Closed loop: each client sends a one-row request, waits for the answer, sends the next.
Open loop: requests leave at Poisson-distributed times at a set total rate, whether or not
earlier ones have been answered (what a crowd of users does), each client process its share.
Every answer's latency and the batch it rode in (the reply's `batch_rows`) are kept, and each
client's CPU time over its run: what the generator itself takes of the machine.
"""

import multiprocessing as mp
import random
import resource
import time
from queue import Empty
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

WARMUP_S = 1.0  # answers in the first second are not counted: connections and caches warm up


@dataclass
class LoadResult:
    latencies_ms: List[float] = field(default_factory=list)
    batch_rows: List[int] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0  # measured seconds of load
    answered: int = 0  # requests answered OK; len(latencies_ms) where every latency is kept
    cpu_s: float = 0.0  # the generator's own CPU time (all its processes) over ...
    wall_s: float = 0.0  # ... this many seconds
    percentiles_ms: Optional[List[float]] = None  # p50, p90, p99 where the generator gives them, not latencies

    def merge(self, other: "LoadResult") -> None:
        self.latencies_ms += other.latencies_ms
        self.batch_rows += other.batch_rows
        self.errors += other.errors
        self.answered += other.answered
        self.cpu_s += other.cpu_s
        self.seconds = max(self.seconds, other.seconds)
        self.wall_s = max(self.wall_s, other.wall_s)

    def generator_cores(self) -> float:
        """The generator's CPU over its measured time, in cores."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


def _client(url: str, model: str, shape: List[int], duration_s: float, rate: Optional[float], seed: int,
            results, ready, go, metadata: Tuple[Tuple[str, str], ...] = ()) -> None:
    import grpc

    from rpc_train.serve.client import infer_request
    from rpc_train.serve.protocol import Stub

    stub = Stub(grpc.insecure_channel(url))
    request = infer_request(model, np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32))
    out, rng = LoadResult(), random.Random(seed)
    ready.put(seed)
    if not go.wait(timeout=300):  # every client imported and connected: the load starts at once
        return  # the parent gave up on the start
    start = time.monotonic()
    counted_from, end = start + WARMUP_S, start + WARMUP_S + duration_s

    def record(sent: float, reply=None, failed: bool = False) -> None:
        if sent < counted_from:
            return
        if failed:
            out.errors += 1
            return
        out.latencies_ms.append(1e3 * (time.monotonic() - sent))
        out.answered += 1
        out.batch_rows.append(reply.parameters["batch_rows"].int64_param)

    cpu_from = _cpu_s()  # the warm-up second counted in both the CPU time and the wall time
    if rate is None:
        while time.monotonic() < end:
            sent = time.monotonic()
            try:
                record(sent, stub.ModelInfer(request, timeout=30, metadata=metadata))
            except grpc.RpcError:
                record(sent, failed=True)
    else:
        pending, next_at = [], start
        while next_at < end:
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.monotonic()))
            sent = time.monotonic()
            future = stub.ModelInfer.future(request, timeout=30, metadata=metadata)
            future.add_done_callback(lambda f, sent=sent: record(sent, f.result()) if f.code() == grpc.StatusCode.OK
                                     else record(sent, failed=True))
            pending.append(future)
        for future in pending:
            try:
                future.result()
            except grpc.RpcError:
                pass
    out.seconds, out.cpu_s, out.wall_s = duration_s, _cpu_s() - cpu_from, time.monotonic() - start
    results.put(out)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process (gRPC's too)
    return usage.ru_utime + usage.ru_stime


def run_load(url: str, model: str, shape: List[int], clients: int, duration_s: float,
             rate: Optional[float] = None, metadata: Tuple[Tuple[str, str], ...] = (),
             started: Callable[[], None] = lambda: None) -> LoadResult:
    """`clients` processes for `duration_s` (after a warm-up second); closed loop, or open loop at
    `rate` requests/s in all. `metadata` goes with every request (Ray Serve's `application`).
    `started()` is called as the load starts, once every client process is up."""
    ctx = mp.get_context("spawn")
    results, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    share = None if rate is None else rate / clients
    procs = [ctx.Process(target=_client, args=(url, model, shape, duration_s, share, seed, results, ready, go,
                                               metadata), daemon=True)
             for seed in range(clients)]
    try:
        for p in procs:
            p.start()
        _collect(ready, procs, 300, "while starting")
        go.set()
        started()
        total = LoadResult()
        for result in _collect(results, procs, duration_s + 120, "during the load"):
            total.merge(result)
        for p in procs:
            p.join(10)
        return total
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()


def _collect(queue, procs, timeout_s: float, when: str) -> list:
    """One item from each client process; a RuntimeError as soon as one has died, and at the timeout."""
    items, deadline = [], time.monotonic() + timeout_s
    while len(items) < len(procs):
        try:
            items.append(queue.get(timeout=0.5))
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load client process exited with {dead[0]} {when} (its traceback is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(procs) - len(items)} of {len(procs)} load clients gave nothing in "
                                   f"{timeout_s:.0f} s {when}")
    return items
