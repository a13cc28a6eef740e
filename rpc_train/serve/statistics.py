"""The statistics extension: one model version's cumulative counts and times, as ModelStatistics reports them.

The core records every ModelInfer call naming the model (`request`) where it counts the same
call for Prometheus (`ServeMetrics.request`), and the dispatcher every batch a replica computed
(`batch`), so the two cannot disagree: success.count is rpc_train_serve_requests_total{code="OK"},
fail.count the other codes of the calls naming this model (a call naming a model not served
here is no model's), cache_hit/cache_miss the cache counters. Times follow Triton's meanings:
success and fail the whole call, queue the wait for a batch to leave, compute_input the checks
and decoding, compute_infer the batch's time on its replica, compute_output the reply's encoding
(those four of successful calls answered by a replica); inference_count and execution_count are
rows and batches computed by replicas, cache hits not included.
"""

import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
CACHE = ("cache_hit", "cache_miss")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def document(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class RequestTimes:
    """Where one call's time went, in seconds; None: that part did not happen."""

    queue: Optional[float] = None
    compute_input: Optional[float] = None
    compute_infer: Optional[float] = None
    compute_output: Optional[float] = None
    cache_hit: Optional[float] = None
    cache_miss: Optional[float] = None
    statistics: Optional["ModelStatistics"] = None  # the call's model version's, once it was found


class ModelStatistics:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._success, self._fail = Duration(), Duration()
        self._times: Dict[str, Duration] = {part: Duration() for part in PHASES + CACHE}
        self._batches: Dict[int, Duration] = {}
        self._rows = self._executions = self._last_ms = 0

    def request(self, ok: bool, seconds: float, times: RequestTimes) -> None:
        with self._lock:
            (self._success if ok else self._fail).add(seconds)
            self._last_ms = int(time.time() * 1e3)
            for part in (PHASES + CACHE) if ok else CACHE:  # a failed call's cache look-up still happened
                value = getattr(times, part)
                if value is not None:
                    self._times[part].add(value)

    def batch(self, rows: int, seconds: float) -> None:
        """A batch of `rows` came back from its replica after `seconds`."""
        with self._lock:
            self._rows, self._executions = self._rows + rows, self._executions + 1
            self._batches.setdefault(rows, Duration()).add(seconds)

    def document(self) -> dict:
        """This model's entry of ModelStatisticsResponse.model_stats, in the protocol's JSON form."""
        with self._lock:
            stats = {"success": self._success.document(), "fail": self._fail.document(),
                     **{part: d.document() for part, d in self._times.items()}}
            return {"name": self.name, "version": self.version, "last_inference": self._last_ms,
                    "inference_count": self._rows, "execution_count": self._executions, "inference_stats": stats,
                    "batch_stats": [{"batch_size": size, "compute_infer": d.document()}
                                    for size, d in sorted(self._batches.items())]}
