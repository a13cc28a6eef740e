"""The gRPC front end: the Open Inference Protocol's GRPCInferenceService and grpc.health.v1.

Handlers check a request (`codec.decode`), queue its rows (`Dispatcher.submit`) and wait for
them, at most until the client's deadline. Status codes keep gRPC's meanings: INVALID_ARGUMENT
for a bad request, NOT_FOUND for another model, RESOURCE_EXHAUSTED for a full queue,
UNAVAILABLE while not ready or draining, DEADLINE_EXCEEDED; INTERNAL only for our own bugs.
"""

import logging
import threading
import time
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import rpc_train
from rpc_train.serve.admission import CallPool, arrived, max_calls
from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.codec import BadRequest, ModelSpec, check_model, decode, encode
from rpc_train.serve.dispatch import Dispatcher, Refused
from rpc_train.serve.observe import ServeMetrics
from rpc_train.serve.protocol import SERVICE, handler, pb
from rpc_train.serve.security import TokenAuth, server_credentials

log = logging.getLogger(__name__)

NO_DEADLINE_S = 10 ** 6


class InferenceService:
    """The protocol's methods (protocol.METHODS), by their names."""

    def __init__(self, spec: ModelSpec, dispatcher: Dispatcher, max_message_mb: float, metrics: ServeMetrics,
                 cache: Optional[ResponseCache] = None):
        self.spec, self.dispatcher, self.metrics, self.cache = spec, dispatcher, metrics, cache
        self.max_message_mb, self.max_message_bytes = max_message_mb, message_bytes(max_message_mb)
        self.draining = False
        self._active, self._active_lock = 0, threading.Lock()  # ModelInfer calls being handled

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready())

    def ModelReady(self, request, context):
        self._check_model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.ready())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="rpc_train", version=rpc_train.__version__, extensions=[])

    def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version, context)
        return self.spec.metadata()

    def ModelInfer(self, request, context):
        with self._active_lock:
            self._active += 1
        try:
            return self._answer(request, context)
        finally:
            with self._active_lock:
                self._active -= 1

    def idle(self) -> bool:
        with self._active_lock:
            return self._active == 0

    def _answer(self, request, context):
        started = arrived()  # when gRPC handed the call to its pool: a wait for a thread counts
        try:
            reply, queued_s = self._infer(request, _deadline(context))
        except (BadRequest, Refused) as err:
            self.metrics.request(err.code.name, time.monotonic() - started, None)
            context.abort(err.code, err.message)
        except Exception:  # noqa: BLE001 - our own bug: say so, keep serving the others
            log.exception("ModelInfer failed")
            self.metrics.request(grpc.StatusCode.INTERNAL.name, time.monotonic() - started, None)
            context.abort(grpc.StatusCode.INTERNAL, "the server failed on this request (its log says why)")
        self.metrics.request("OK", time.monotonic() - started, queued_s)
        return reply

    def _infer(self, request, deadline: Optional[float]) -> tuple:
        """(the reply, seconds its rows waited to leave for a replica, None from the cache)."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request is {size} bytes, over serve.max_message_mb={self.max_message_mb:g} MiB; "
                             "send fewer rows per request")
        rows = decode(request, self.spec)
        key = self.cache.key(rows) if self.cache is not None else None
        if key is not None:
            answer = self.cache.get(key)
            self.metrics.cache_lookup(answer is not None)
            if answer is not None:
                return encode(request, self.spec, answer, 0, cached=True), None
        pending = self.dispatcher.submit(rows, deadline)
        if not pending.done.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            pending.abandoned = True  # the batcher drops it if it is still queued
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer")
        if pending.error is not None:
            raise pending.error
        if key is not None:
            self.cache.put(key, pending.logits)
        return encode(request, self.spec, pending.logits, pending.batch_rows), pending.sent - pending.enqueued

    def ready(self) -> bool:
        return not self.draining and self.dispatcher.ready()

    def _check_model(self, name: str, version: str, context) -> None:
        try:
            check_model(self.spec, name, version)
        except BadRequest as err:
            context.abort(err.code, err.message)


def message_bytes(mb: float) -> int:
    return int(mb * 2 ** 20)


def _deadline(context) -> Optional[float]:
    """The client's deadline on time.monotonic()'s clock; None for a call without one (gRPC then
    reports centuries left, more than a wait can take)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else time.monotonic() + left


class HealthReporter:
    """grpc.health.v1 for the whole server ("") and the inference service, from readiness."""

    def __init__(self):
        self.servicer = health.HealthServicer()
        self.update(False)

    def update(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.servicer.set(name, status)


def start_server(service: InferenceService, reporter: HealthReporter, conf) -> grpc.Server:
    """Listen on serve.host:serve.port, with TLS and a token when serve.* asks for them; a port
    that cannot be bound raises RuntimeError."""
    # gRPC's own limit sits well above ours, so that a request over ours still reaches the handler
    # and gets INVALID_ARGUMENT naming the limit; past gRPC's, gRPC answers RESOURCE_EXHAUSTED.
    limit = 4 * service.max_message_bytes
    server = grpc.server(CallPool(conf.threads), maximum_concurrent_rpcs=max_calls(conf.threads),  # admission.py
                         interceptors=[TokenAuth(conf.auth_token_file)] if conf.auth_token_file else [],
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit),
                                  ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([handler(service)])
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    address, credentials = f"{conf.host}:{conf.port}", server_credentials(conf.tls)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    return server
