"""What the front end reports: Prometheus metrics, and a TensorBoard/log summary every few seconds.

Metrics live in a registry of their own, served over HTTP on serve.host:serve.metrics_port
(`http_server.start_metrics`, with the protocol's TLS and token when those are set):
requests and errors by status code, latency and queue-time histograms, the batch-size
histogram, rows sent to each replica and rows in flight there, replicas in rotation, cache hits
and misses, and the malformed requests each door could not read (those also get a line in the
log, at most one every MALFORMED_LOG_EVERY_S seconds: a flood of them costs no more).
`window()` turns what happened since its last call into the TensorBoard scalars.
"""

import logging
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rpc_train.serve.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

PREFIX = "rpc_train_serve"
DOORS = ("grpc", "http")
MALFORMED_LOG_EVERY_S = 60.0
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def _p(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


class ServeMetrics:
    def __init__(self, replicas: int, max_batch_size: int, rows_in_flight: Callable[[int], int],
                 in_rotation: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "ModelInfer calls answered, by gRPC status code", ["code"],
                                registry=registry)
        self.latency = Histogram(f"{PREFIX}_latency_seconds", "ModelInfer time in the front end",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram(f"{PREFIX}_queue_seconds", "Time a computed request waited for its batch to leave",
                               buckets=LATENCY_BUCKETS, registry=registry)
        sizes = sorted({2 ** k for k in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch = Histogram(f"{PREFIX}_batch_rows", "Rows per batch sent to a replica", buckets=sizes,
                               registry=registry)
        self.replica_rows = Counter(f"{PREFIX}_replica_rows", "Rows sent to each replica", ["replica"],
                                    registry=registry)
        in_flight = Gauge(f"{PREFIX}_replica_rows_in_flight", "Rows a replica is computing now", ["replica"],
                          registry=registry)
        for r in range(replicas):
            in_flight.labels(replica=str(r)).set_function(lambda r=r: rows_in_flight(r))
        Gauge(f"{PREFIX}_replicas_in_rotation", "Replicas taking batches", registry=registry).set_function(in_rotation)
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Requests answered from the cache", registry=registry)
        self.cache_misses = Counter(f"{PREFIX}_cache_misses", "Cache look-ups that found nothing",
                                    registry=registry)
        self.malformed = Counter(f"{PREFIX}_malformed_requests", "Requests a door could not read as the protocol's "
                                 "message (bytes that do not parse, a body not laid out as the protocol says), "
                                 "by door", ["door"], registry=registry)
        for door in DOORS:
            self.malformed.labels(door=door)
        self._malformed_log = RateLimitedLog(log, MALFORMED_LOG_EVERY_S)
        self._rows_in_flight, self._replicas = rows_in_flight, replicas
        self._lock = threading.Lock()
        self._reset_window()

    def sequences(self, live: Callable[[], int], running: Callable[[], int]) -> None:
        """The text generators' gauges: KV caches the replicas hold, and sequences waiting or decoding."""
        Gauge(f"{PREFIX}_sequences_live", "Sequences whose KV caches the replicas hold (as their last step said)",
              registry=self.registry).set_function(live)
        Gauge(f"{PREFIX}_sequences_running", "Generated sequences waiting or decoding on the front end",
              registry=self.registry).set_function(running)

    def _reset_window(self) -> None:
        self._latency_ms: List[float] = []
        self._queue_ms: List[float] = []
        self._batches: List[int] = []
        self._hits = self._lookups = 0
        self._since = time.monotonic()

    def request(self, code: str, latency_s: float, queue_s: Optional[float]) -> None:
        self.requests.labels(code=code).inc()
        self.latency.observe(latency_s)
        if queue_s is not None:
            self.queue.observe(queue_s)
        with self._lock:
            self._latency_ms.append(1e3 * latency_s)
            if queue_s is not None:
                self._queue_ms.append(1e3 * queue_s)

    def batch_sent(self, replica: int, rows: int) -> None:
        self.batch.observe(rows)
        self.replica_rows.labels(replica=str(replica)).inc(rows)
        with self._lock:
            self._batches.append(rows)

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()
        with self._lock:
            self._hits, self._lookups = self._hits + hit, self._lookups + 1

    def malformed_request(self, door: str, message: str) -> None:
        """A request `door` could not read, refused with `message`: the client's fault, so a count
        and at most one log line every MALFORMED_LOG_EVERY_S seconds, never a traceback."""
        self.malformed.labels(door=door).inc()
        self._malformed_log.log(logging.WARNING, "a malformed request on %s: %s", door, message)

    def window(self) -> Dict[str, float]:
        """The TensorBoard scalars of what happened since the last call."""
        with self._lock:
            latency, queue, batches = self._latency_ms, self._queue_ms, self._batches
            hits, lookups, seconds = self._hits, self._lookups, time.monotonic() - self._since
            self._reset_window()
        scalars = {"serve/requests_per_s": len(latency) / max(seconds, 1e-9)}
        if latency:
            scalars.update({"serve/latency_ms_p50": _p(latency, 50), "serve/latency_ms_p99": _p(latency, 99)})
        if queue:
            scalars["serve/queue_ms_p50"] = _p(queue, 50)
        if batches:
            scalars["serve/batch_size_mean"] = sum(batches) / len(batches)
        if lookups:
            scalars["serve/cache_hit_rate"] = hits / lookups
        for r in range(self._replicas):
            scalars[f"replica{r}/rows_in_flight"] = float(self._rows_in_flight(r))
        return scalars

    def totals(self, seconds: float) -> Dict[str, float]:
        """The whole session's figures, from the Prometheus counters: the HParams metrics."""
        codes = {sample.labels["code"]: sample.value for sample in self.requests.collect()[0].samples
                 if sample.name.endswith("_total")}
        value = self.registry.get_sample_value
        answered, latency_s = value(f"{PREFIX}_latency_seconds_count") or 0.0, value(f"{PREFIX}_latency_seconds_sum")
        batches, rows = value(f"{PREFIX}_batch_rows_count") or 0.0, value(f"{PREFIX}_batch_rows_sum")
        out = {"serve/requests": sum(codes.values()), "serve/requests_ok": codes.get("OK", 0.0),
               "serve/requests_per_s": sum(codes.values()) / max(seconds, 1e-9)}
        if answered:
            out["serve/latency_ms_mean"] = 1e3 * latency_s / answered
        if batches:
            out["serve/batch_size_mean"] = rows / batches
        return out


def summary_line(scalars: Dict[str, float]) -> str:
    parts = [f"{scalars['serve/requests_per_s']:.1f} req/s"]
    if "serve/latency_ms_p50" in scalars:
        parts.append(f"latency p50 {scalars['serve/latency_ms_p50']:.2f} ms, p99 {scalars['serve/latency_ms_p99']:.2f} ms")
    if "serve/queue_ms_p50" in scalars:
        parts.append(f"queue p50 {scalars['serve/queue_ms_p50']:.2f} ms")
    if "serve/batch_size_mean" in scalars:
        parts.append(f"batch {scalars['serve/batch_size_mean']:.1f} rows")
    if "serve/cache_hit_rate" in scalars:
        parts.append(f"cache hits {100 * scalars['serve/cache_hit_rate']:.0f}%")
    return "serving: " + ", ".join(parts)
