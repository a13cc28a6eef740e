"""Malformed and hostile requests for a served digits model ('mlp', input [rows, 1, 8, 8] FP32, at
most 32 rows), through either door, each with the status it must get.

`malformed` says whether the door cannot read it as the protocol lays a request out (bytes that
are not the method's protobuf message, a body that is not the protocol's JSON): such a request
is counted in rpc_train_serve_malformed_requests_total. The others are the protocol's messages
asking for something the model refuses (a shape, a datatype, another model); the core answers
and counts those as it counts every ModelInfer.
"""

import json
import random
from dataclasses import dataclass, field
from typing import Dict, List, Union

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
ROW = [1, 8, 8]


@dataclass
class Case:
    what: str
    body: bytes
    status: Union[grpc.StatusCode, int]
    malformed: bool
    method: str = "ModelInfer"  # gRPC: the method; HTTP: the path
    headers: Dict[str, str] = field(default_factory=dict)


def junk(rng: random.Random, valid: bytes, parses, count: int) -> List[bytes]:
    """`count` byte strings that `parses` refuses: random bytes, and cuts and bit flips of `valid`."""
    found = []
    while len(found) < count:
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 80))
        elif kind == 1:
            data = valid[:rng.randrange(1, len(valid))]
        else:
            data = bytearray(valid)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(data)
        try:
            parses(data)
        except (DecodeError, ValueError):
            found.append(data)
    return found


def _grpc_request(shape=(4, *ROW), model="mlp", name="input", datatype="FP32", raw=None, raws=1, typed=False):
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if typed:
        tensor.contents.fp32_contents.extend([0.5] * 10)
    for _ in range(raws):
        request.raw_input_contents.append(b"\0" * (4 * 4 * 64) if raw is None else raw)
    return request


def grpc_cases(seed: int, undecodable: int = 150) -> List[Case]:
    rng = random.Random(seed)
    valid = _grpc_request().SerializeToString()
    cases = [Case(f"undecodable {i}", data, INVALID, True)
             for i, data in enumerate(junk(rng, valid, service_pb2.ModelInferRequest.FromString, undecodable))]
    metadata = service_pb2.ModelMetadataRequest(name="mlp").SerializeToString()
    for method, request_class in (("ModelMetadata", service_pb2.ModelMetadataRequest),
                                  ("ModelReady", service_pb2.ModelReadyRequest),
                                  ("ModelConfig", service_pb2.ModelConfigRequest)):
        cases += [Case(f"{method} undecodable {i}", data, INVALID, True, method)
                  for i, data in enumerate(junk(rng, metadata, request_class.FromString, 10))]
    # The protocol's messages, hostile.
    hostile = {
        "a huge declared shape": (_grpc_request(shape=(2 ** 62, *ROW)), INVALID, False),
        "negative dims": (_grpc_request(shape=(-4, 1, -8, 8)), INVALID, False),
        "10000 dims": (_grpc_request(shape=[1] * 10_000), INVALID, False),
        "raw of the wrong size": (_grpc_request(raw=b"\0" * 100), INVALID, False),
        "contents for another shape": (_grpc_request(typed=True, raws=0), INVALID, False),
        "a datatype that is none": (_grpc_request(datatype="FP128"), INVALID, False),
        "the wrong datatype": (_grpc_request(datatype="INT64"), INVALID, False),
        "another model": (_grpc_request(model="resnet"), NOT_FOUND, False),
        "a model name of 20 kB": (_grpc_request(model="m" * 20_000), NOT_FOUND, False),
        "an input name of 20 kB": (_grpc_request(name="n" * 20_000), INVALID, False),
        "an input name with a line break": (_grpc_request(name="in\nput"), INVALID, False),
        "two raw contents for one input": (_grpc_request(raws=2), INVALID, True),
        "raw and typed contents": (_grpc_request(typed=True), INVALID, True),
    }
    cases += [Case(what, message.SerializeToString(), status, malformed)
              for what, (message, status, malformed) in hostile.items()]
    cases.append(Case("ModelMetadata of another model", service_pb2.ModelMetadataRequest(
        name="x" * 20_000, version="-1").SerializeToString(), NOT_FOUND, False, "ModelMetadata"))
    rng.shuffle(cases)
    return cases


def http_valid(rows: int = 2) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, *ROW], "data": [0.5] * (64 * rows)}]}


def _with_input(**changes) -> bytes:
    document = http_valid()
    document["inputs"][0].update(changes)
    return json.dumps(document).encode()


def _binary(size, extra: int = 0) -> tuple:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *ROW],
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header + b"\0" * (256 + extra), {"Inference-Header-Content-Length": str(len(header))}


def http_cases(seed: int, undecodable: int = 100) -> List[Case]:
    rng = random.Random(seed)
    infer = "/v2/models/mlp/infer"
    valid = json.dumps(http_valid()).encode()
    cases = [Case(f"not JSON {i}", data, 400, True, infer)
             for i, data in enumerate(junk(rng, valid, json.loads, undecodable))]
    length = "Inference-Header-Content-Length"
    for header in ("abc", "-1", str(len(valid) + 1), "9" * 60, "", "1e3", "0x10"):
        cases.append(Case(f"{length}: {header!r}", valid, 400, True, infer, {length: header}))
    shapes = {
        "a list": b"[]", "a number": b"1", "null": b"null", "a string": b'"x"',
        "inputs as an object": b'{"inputs": {}}', "inputs as a string": b'{"inputs": "x"}',
        "an input that is a number": b'{"inputs": [1]}',
        "a shape that is a string": _with_input(shape="4"),
        "a shape of strings": _with_input(shape=["a", 1, 8, 8]),
        "a shape of floats": _with_input(shape=[2.0, 1.0, 8.0, 8.0]),
        "a name that is a list": _with_input(name=["input"]),
        "a name that is an object": _with_input(name={"a": 1}),
        "a datatype that is a list": _with_input(datatype=["FP32"]),
        "data that is a string": _with_input(data="abc"),
        "data that is an object": _with_input(data={"a": 1}),
        "input parameters that are a list": _with_input(parameters=[]),
        "parameters that are a list": json.dumps({**http_valid(), "parameters": [1]}).encode(),
        "outputs as an object": json.dumps({**http_valid(), "outputs": {}}).encode(),
        "an output that is a string": json.dumps({**http_valid(), "outputs": ["logits"]}).encode(),
        "an output name that is a list": json.dumps({**http_valid(), "outputs": [{"name": ["x"]}]}).encode(),
        "two names that do not compare": json.dumps({"inputs": [{**http_valid()["inputs"][0], "name": [1]},
                                                                {**http_valid()["inputs"][0], "name": "x"}]}).encode(),
        "JSON nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
        "timeout a string": json.dumps({**http_valid(), "parameters": {"timeout": "x"}}).encode(),
        "timeout negative": json.dumps({**http_valid(), "parameters": {"timeout": -1}}).encode(),
        "timeout Infinity": json.dumps({**http_valid(), "parameters": {"timeout": float("inf")}}).encode(),
        "timeout NaN": json.dumps({**http_valid(), "parameters": {"timeout": float("nan")}}).encode(),
        "an integer of 5000 digits": b'{"id": ' + b"7" * 5000 + b"}",
    }
    cases += [Case(what, body, 400, True, infer) for what, body in shapes.items()]
    for what, size, extra in (("binary_data_size negative", -1, 0), ("binary_data_size past the body", 10 ** 9, 0),
                              ("binary_data_size a string", "256", 0), ("binary_data_size a float", 1.5, 0),
                              ("bytes after the binary data", 256, 8)):
        body, headers = _binary(size, extra)
        cases.append(Case(what, body, 400, True, infer, headers))
    cases.append(Case("repository index of a list", b"[1]", 400, True, "/v2/repository/index"))
    # The protocol's JSON, hostile: the core refuses it, as through gRPC.
    hostile = {
        "a huge declared shape": (_with_input(shape=[2 ** 62, *ROW]), 400),
        "negative dims": (_with_input(shape=[-2, 1, -8, 8]), 400),
        "data for another shape": (_with_input(data=[0.5] * 10), 400),
        "the wrong datatype": (_with_input(datatype="INT64"), 400),
        "values that are not numbers": (_with_input(data=["a"] * 128), 400),
        "an input name of 20 kB": (_with_input(name="n" * 20_000), 400),
        "an input name with a line break": (_with_input(name="in\nput"), 400),
        "data nested 900 deep": (_with_input(data=json.loads("[" * 900 + "]" * 900)), 400),
    }
    cases += [Case(what, body, status, False, infer) for what, (body, status) in hostile.items()]
    cases.append(Case("another model", valid, 404, False, "/v2/models/resnet/infer"))
    rng.shuffle(cases)
    return cases
