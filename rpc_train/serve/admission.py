"""How many calls the gRPC front end takes at once, and since when each has waited.

The synchronous gRPC server runs each call on a thread of its pool, and a ModelInfer holds its
thread while its rows wait for a replica. Calls beyond the pool would wait in gRPC's own queue,
unbounded and unseen: serve.max_queue_size would never engage and the wait would show in no
metric. So:

- the pool has serve.threads + SPARE_THREADS threads, and gRPC refuses a call beyond that many at
  once with RESOURCE_EXHAUSTED (`maximum_concurrent_rpcs`): none waits for a thread;
- the dispatcher takes at most serve.threads ModelInfer calls at a time (the rest get
  RESOURCE_EXHAUSTED at once), so the spare threads stay free for the health service,
  ServerLive/ServerReady and metadata under any load;
- the pool notes when gRPC handed it each call (`arrived`): a request's queue time and latency
  count from there.
"""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

SPARE_THREADS = 8

_CALL = threading.local()


class CallPool(ThreadPoolExecutor):
    """gRPC's thread pool: serve.threads + SPARE_THREADS threads, each call's arrival noted."""

    def __init__(self, threads: int):
        super().__init__(max_workers=max_calls(threads), thread_name_prefix="grpc")

    def submit(self, fn, /, *args, **kwargs) -> Future:
        arrived_at = time.monotonic()

        def timed():
            _CALL.arrived = arrived_at
            try:
                return fn(*args, **kwargs)
            finally:
                _CALL.arrived = None

        return super().submit(timed)


def max_calls(threads: int) -> int:
    """Calls gRPC runs at once (`maximum_concurrent_rpcs`); beyond them RESOURCE_EXHAUSTED at once."""
    return threads + SPARE_THREADS


def arrived() -> float:
    """When the call this thread runs reached the pool (time.monotonic()); now outside a call."""
    return getattr(_CALL, "arrived", None) or time.monotonic()
