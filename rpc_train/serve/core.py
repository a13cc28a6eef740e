"""The one request path behind both doors: every protocol method, protocol-neutral.

gRPC (`frontend.py`) and HTTP (`http_server.py`) translate their messages into the calls
here and map `ServeError`'s code to their own status; neither decides anything. Answers that
the protocol defines as documents (metadata, config, statistics, the repository index) are
returned as dicts in the protocol's JSON form: HTTP sends them as they are, gRPC parses them
into its messages (`json_format.ParseDict`), so the two cannot disagree.

A ModelInfer: size check -> the version that answers (`Repository.resolve`) -> rows checked
against it (`ModelSpec.rows`) -> the cache -> the dispatcher's queue of that (model, version)
and batcher -> a replica -> the reply, naming the version.
"""

import logging
import threading
import time
from dataclasses import replace
from typing import Optional

import grpc

import rpc_train
from rpc_train.serve.admission import arrived
from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.dispatch import Dispatcher, Refused
from rpc_train.serve.observe import ServeMetrics
from rpc_train.serve.repository import Repository, Version
from rpc_train.serve.rollout import Rollout
from rpc_train.serve.spec import InferReply, InferRequest
from rpc_train.serve.statistics import RequestTimes
from rpc_train.serve.tensors import BadRequest, ServeError

log = logging.getLogger(__name__)

EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "model_repository"]


class ServingCore:
    def __init__(self, repository: Repository, dispatcher: Dispatcher, metrics: ServeMetrics, max_message_mb: float,
                 cache: Optional[ResponseCache] = None, rollout: Optional[Rollout] = None,
                 instance_kind: str = "KIND_CPU"):
        """`instance_kind`: where the replicas compute, as ModelConfig's instance_group says it
        (KIND_CPU, KIND_GPU)."""
        self.repository, self.dispatcher, self.metrics, self.cache = repository, dispatcher, metrics, cache
        self.rollout, self.instance_kind = rollout, instance_kind
        self.max_message_mb, self.max_message_bytes = max_message_mb, message_bytes(max_message_mb)
        self.loaded = False  # every model of the start-up answered its warm-up (the driver says so)
        self.draining = False
        self._active, self._active_lock = 0, threading.Lock()  # ModelInfer calls being answered

    # -- health and metadata
    def live(self) -> bool:
        return True  # never depends on a model: a process that answers is alive

    def ready(self) -> bool:
        return self.loaded and not self.draining and self.dispatcher.ready()

    def version_of(self, name: str, version: str = "") -> Version:
        """The version that answers (name, version): NOT_FOUND for a model or version not loaded."""
        return self.repository.resolve(name, version, self.dispatcher.loaded_everywhere,
                                       self.dispatcher.loaded_anywhere)

    def model_ready(self, name: str, version: str = "") -> bool:
        self.version_of(name, version)
        return self.ready()

    def server_metadata(self) -> dict:
        return {"name": "rpc_train", "version": rpc_train.__version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict:
        return self.version_of(name, version).spec.metadata(self.repository.ready_versions(name))

    def model_config(self, name: str, version: str = "") -> dict:
        """ModelConfig in Triton's schema (its JSON form: {"config": {...}}, proto field names)."""
        spec, limits = self.version_of(name, version).spec, self.dispatcher.limits
        return {"config": {
            "name": spec.name, "platform": "pytorch", "backend": "pytorch",
            "version_policy": {"latest": {"num_versions": self.repository.keep_versions}},
            "max_batch_size": spec.max_batch_size,
            "input": [t.config() for t in spec.inputs], "output": [t.config() for t in spec.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": round(limits.max_queue_delay_s * 1e6),
                                 "preferred_batch_size": []},
            "instance_group": [{"count": len(self.dispatcher.replicas), "kind": self.instance_kind}],
            "response_cache": {"enable": self.cache is not None}}}

    def model_statistics(self, name: str = "", version: str = "") -> dict:
        """ModelStatistics in the protocol's JSON form: {"model_stats": [...]}, one entry a version
        loaded (or once loaded): every model's for an empty name, every version's for an empty version."""
        if name and version:
            versions = [self.version_of(name, version)]
        else:
            versions = self.repository.versions(name)
        return {"model_stats": [v.statistics.document() for v in versions]}

    # -- the model repository extension
    def repository_index(self, ready_only: bool = False) -> list:
        """[{"name", "version", "state", "reason"}] of every model (version) known."""
        return self.repository.index(ready_only)

    def load(self, name: str, parameters: dict) -> None:
        """A new version of `name` from the run dir in the parameter `run` (without it: the run
        its newest version came from), rolled out one replica at a time."""
        if self.rollout is None:
            raise _unsupported("RepositoryModelLoad")
        run = parameters.get("run")
        if run is not None and not isinstance(run, str):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"parameter 'run' is {type(run).__name__}; give the "
                                                               "run directory as a string")
        self.rollout.load(name, run)

    def unload(self, name: str, parameters: dict) -> None:
        if self.rollout is None:
            raise _unsupported("RepositoryModelUnload")
        self.rollout.unload(name)

    # -- inference
    def infer(self, request: InferRequest) -> InferReply:
        """The reply, or ServeError with the status the caller gets; every call is counted."""
        started, times = arrived(), RequestTimes()  # a wait for a gRPC thread counts too
        with self._active_lock:
            self._active += 1
        try:
            reply = self._infer(request, times)
        except ServeError as err:
            self._count(err.code.name, started, times)
            raise
        except Exception as err:  # noqa: BLE001 - our own bug: say so, keep serving the others
            log.exception("ModelInfer failed")
            self._count(grpc.StatusCode.INTERNAL.name, started, times)
            raise ServeError(grpc.StatusCode.INTERNAL, "the server failed on this request (its log says why)") \
                from err
        finally:
            with self._active_lock:
                self._active -= 1
        self._count("OK", started, times)
        return reply

    def _count(self, code: str, started: float, times: RequestTimes) -> None:
        """The call in the Prometheus counters and, once it found its model's version, in that
        version's statistics."""
        seconds = time.monotonic() - started
        self.metrics.request(code, seconds, times.queue if code == "OK" else None)
        if times.statistics is not None:
            times.statistics.request(code == "OK", seconds, times)

    def idle(self) -> bool:
        with self._active_lock:
            return self._active == 0

    def _infer(self, request: InferRequest, times: RequestTimes) -> InferReply:
        """The reply; `times` says where the time went as it goes (queue: None from the cache)."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        asked = request
        version = self.version_of(request.model, request.version)
        times.statistics = version.statistics
        if request.size > self.max_message_bytes:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request is {request.size} bytes, over serve.max_message_mb="
                             f"{self.max_message_mb:g} MiB; send fewer rows per request")
        request, spec = replace(request, version=version.version), version.spec
        began = time.monotonic()
        rows = spec.rows(request)
        times.compute_input = time.monotonic() - began
        key = self.cache.key(version.digest, rows) if self.cache is not None else None
        if key is not None:
            began = time.monotonic()
            answer = self.cache.get(key)
            self.metrics.cache_lookup(answer is not None)
            if answer is not None:
                times.cache_hit = time.monotonic() - began
                return spec.reply(request, answer, {"cache_hit": True})
            times.cache_miss = time.monotonic() - began
        try:
            pending = self.dispatcher.submit(version.key, rows, request.deadline)
        except Refused as err:
            if asked.version or err.code != grpc.StatusCode.NOT_FOUND:
                raise
            # The default version was unloaded between its choice and the queue: a newer one is the default now.
            return self._infer(asked, times)
        deadline = request.deadline
        if not pending.done.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            pending.abandoned = True  # the batcher drops it if it is still queued
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer")
        if pending.error is not None:
            raise pending.error
        if key is not None:
            began = time.monotonic()
            self.cache.put(key, pending.logits)
            times.cache_miss += time.monotonic() - began
        times.queue, times.compute_infer = pending.sent - pending.enqueued, pending.compute_s
        began = time.monotonic()
        reply = spec.reply(request, pending.logits, {"batch_rows": pending.batch_rows})
        times.compute_output = time.monotonic() - began
        return reply


def _unsupported(method: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by rpc_train")


def message_bytes(mb: float) -> int:
    return int(mb * 2 ** 20)
