"""The Open Inference Protocol's messages and service, built from inference.proto on import.

grpcio-tools' protoc compiles the .proto into descriptors in this process, and the message
classes come from a descriptor pool of our own: no generated code can drift from the
protobuf runtime installed, and a process may hold another client's copy of the same
`inference.*` messages (tritonclient's, in the tests) without the clash two definitions cause
in protobuf's default pool. `pb.ModelInferRequest` and the rest are the protocol's names;
`handler(servicer)` serves an object with the protocol's method names, `Stub(channel)` calls them.

A request whose bytes protobuf cannot parse reaches the servicer as an `Undecodable`: gRPC's
own deserializer would log a traceback for each one and answer INTERNAL, but such a request is
the client's fault (INVALID_ARGUMENT), and a flood of them must not flood the log.
"""

import os
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Dict

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_tools import protoc

SERVICE = "inference.GRPCInferenceService"
PROTO = Path(__file__).with_name("inference.proto")


def _compile() -> descriptor_pool.DescriptorPool:
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "inference.desc")
        if protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]) != 0:
            raise RuntimeError(f"protoc could not compile {PROTO}")
        files = descriptor_pb2.FileDescriptorSet.FromString(Path(out).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


_POOL = _compile()
_FILE = _POOL.FindFileByName(PROTO.name)
pb = types.SimpleNamespace(**{name: message_factory.GetMessageClass(d) for name, d in _FILE.message_types_by_name.items()})
METHODS: Dict[str, Any] = {m.name: m for m in _FILE.services_by_name["GRPCInferenceService"].methods}


def _classes(method) -> tuple:
    return message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type)


class Undecodable:
    """A request whose bytes are not its method's message; `message` says so, in one line."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _parser(name: str, request_class) -> Callable[[bytes], Any]:
    """`request_class.FromString`, or an `Undecodable` where it raises DecodeError. On every
    request's path: a try around the same parse, no copy."""
    parse = request_class.FromString

    def parsed(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(f"{name}: protobuf cannot parse the request's {len(data)} bytes as "
                               f"{request_class.DESCRIPTOR.full_name}; send the Open Inference Protocol's messages")

    return parsed


def _refusing_undecodable(answer: Callable, refuse: Callable) -> Callable:
    """A unary method: `answer`, or `refuse` for an `Undecodable` request."""
    def call(request, context):
        if request.__class__ is Undecodable:
            return refuse(request, context)
        return answer(request, context)

    return call


def handler(servicer: Any) -> grpc.GenericRpcHandler:
    """The service's methods, answered by the servicer's methods of the same names. An
    `Undecodable` request goes to `servicer.undecodable(request, context)` instead; a stream
    (ModelStreamInfer) gets its `Undecodable` requests among the others, to answer on the stream."""
    handlers = {}
    for name, method in METHODS.items():
        request, reply = _classes(method)
        if method.client_streaming:
            make, answer = grpc.stream_stream_rpc_method_handler, getattr(servicer, name)
        else:
            make = grpc.unary_unary_rpc_method_handler
            answer = _refusing_undecodable(getattr(servicer, name), servicer.undecodable)
        handlers[name] = make(answer, request_deserializer=_parser(name, request),
                              response_serializer=reply.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class Stub:
    """A client of the service: `Stub(channel).ModelInfer(request, timeout=...)`."""

    def __init__(self, channel: grpc.Channel):
        for name, method in METHODS.items():
            request, reply = _classes(method)
            call = channel.stream_stream if method.client_streaming else channel.unary_unary
            setattr(self, name, call(f"/{SERVICE}/{name}", request_serializer=request.SerializeToString,
                                                    response_deserializer=reply.FromString))
