"""The Open Inference Protocol's messages and service, built from inference.proto on import.

grpcio-tools' protoc compiles the .proto into descriptors in this process, and the message
classes come from a descriptor pool of our own: no generated code can drift from the
protobuf runtime installed, and a process may hold another client's copy of the same
`inference.*` messages (tritonclient's, in the tests) without the clash two definitions cause
in protobuf's default pool. `pb.ModelInferRequest` and the rest are the protocol's names;
`handler(servicer)` serves an object with the protocol's method names, `Stub(channel)` calls them.
"""

import os
import tempfile
import types
from pathlib import Path
from typing import Any, Dict

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
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


def handler(servicer: Any) -> grpc.GenericRpcHandler:
    """The service's methods, answered by the servicer's methods of the same names."""
    handlers = {}
    for name, method in METHODS.items():
        request, reply = _classes(method)
        make = (grpc.stream_stream_rpc_method_handler if method.client_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[name] = make(getattr(servicer, name), request_deserializer=request.FromString,
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
