"""The gRPC door: the Open Inference Protocol's GRPCInferenceService and grpc.health.v1.

Each method translates its message for the core (`core.py`) and the core's answer or
`ServeError` back: the status codes keep gRPC's meanings (INVALID_ARGUMENT for a bad request,
NOT_FOUND for another model, RESOURCE_EXHAUSTED for a full queue, UNAVAILABLE while not ready
or draining, DEADLINE_EXCEEDED; INTERNAL only for our own bugs).
"""

import logging
import time
from typing import Iterator, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpc_train.serve.admission import CallPool, max_calls
from rpc_train.serve.codec import message_of, reply_message, parameters_of, request_of
from rpc_train.serve.core import ServingCore
from rpc_train.serve.protocol import SERVICE, handler, pb
from rpc_train.serve.security import TokenAuth, server_credentials
from rpc_train.serve.tensors import ServeError

log = logging.getLogger(__name__)

NO_DEADLINE_S = 10 ** 6


class InferenceService:
    """The protocol's methods (protocol.METHODS), by their names, answered by the core."""

    def __init__(self, core: ServingCore):
        self.core = core

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.core.live())

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready())

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=_answer(context, self.core.model_ready, request.name, request.version))

    def ServerMetadata(self, request, context):
        return message_of(self.core.server_metadata(), pb.ServerMetadataResponse)

    def ModelMetadata(self, request, context):
        document = _answer(context, self.core.model_metadata, request.name, request.version)
        return message_of(document, pb.ModelMetadataResponse)

    def ModelInfer(self, request, context):
        return reply_message(_answer(context, self.core.infer, request_of_call(request, context)))

    def ModelStreamInfer(self, requests, context) -> Iterator:
        """Each request on the stream is answered on it, in order; an error is that request's
        `error_message` and the stream goes on."""
        for request in requests:
            try:
                reply = self.core.infer(request_of(request, _deadline(context)))
            except ServeError as err:
                yield pb.ModelStreamInferResponse(error_message=err.message)
                continue
            yield pb.ModelStreamInferResponse(infer_response=reply_message(reply))

    def ModelConfig(self, request, context):
        document = _answer(context, self.core.model_config, request.name, request.version)
        return message_of(document, pb.ModelConfigResponse)

    def ModelStatistics(self, request, context):
        document = _answer(context, self.core.model_statistics, request.name, request.version)
        return message_of(document, pb.ModelStatisticsResponse)

    def RepositoryIndex(self, request, context):
        models = _answer(context, self.core.repository_index, request.ready)
        return message_of({"models": models}, pb.RepositoryIndexResponse)

    def RepositoryModelLoad(self, request, context):
        _answer(context, self.core.load, request.model_name, parameters_of(request.parameters))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        _answer(context, self.core.unload, request.model_name, parameters_of(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def request_of_call(message, context):
    """The core's request, with the client's deadline; a malformed message is the client's error."""
    try:
        return request_of(message, _deadline(context))
    except ServeError as err:
        context.abort(err.code, err.message)


def _answer(context, method, *args):
    """`method(*args)`, or the call aborted with the status its ServeError names."""
    try:
        return method(*args)
    except ServeError as err:
        context.abort(err.code, err.message)


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
    limit = 4 * service.core.max_message_bytes
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
