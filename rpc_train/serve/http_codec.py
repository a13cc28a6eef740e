"""HTTP's messages to and from the core's: the Open Inference Protocol's JSON body into an
`InferRequest`, an `InferReply` into the reply's body and headers.

A request body is a JSON document, or, with the binary tensor data extension, a JSON header of
`Inference-Header-Content-Length` bytes followed by the inputs' raw bytes, each input naming
its share with the parameter `binary_data_size`. An input's JSON `data` may be nested by row or
flat. A reply's outputs are JSON `data` lists (flat, row-major), or raw bytes after its JSON
header when the request asks: `binary_data_output` for every output, an output's own
`binary_data` for that one (tritonclient.http asks for bytes by default). BYTES go as JSON
strings (UTF-8) or, binary, length-prefixed as on gRPC.

Only what is particular to this encoding is checked here; everything about the model is the
core's (`ModelSpec.rows`), so a request is refused with the same words through either door.
"""

import json
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from rpc_train.serve.spec import InferReply, InferRequest
from rpc_train.serve.tensors import NUMPY_TYPES, Tensor, invalid, unpack_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
NO_DEADLINE_S = 10 ** 6


@dataclass
class HttpInfer:
    """A POST .../infer as the core takes it, and how its reply is to be encoded."""

    request: InferRequest
    binary_outputs: bool = False  # the request's binary_data_output
    binary: Dict[str, bool] = field(default_factory=dict)  # each output's own binary_data, where given

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_outputs)


def request_of(body: bytes, header_length: Optional[str], model: str, version: str = "") -> HttpInfer:
    """The request in `body`; `header_length`: the Inference-Header-Content-Length header, if sent."""
    length = _header_length(header_length, len(body))
    document = _document(body[:length])
    binary, offset = memoryview(body)[length:], 0
    parameters = _object(document.get("parameters"), "parameters")
    inputs = []
    for i, tensor in enumerate(_list(document.get("inputs"), "inputs")):
        tensor = _object(tensor, f"inputs[{i}]")
        name, datatype, shape = tensor.get("name", ""), tensor.get("datatype", ""), tensor.get("shape")
        _string(name, f"inputs[{i}] name")
        _string(datatype, f"input '{name}' datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise invalid(f"input '{name}' shape {shape!r}: expected a list of integers")
        size = _object(tensor.get("parameters"), f"input '{name}' parameters").get("binary_data_size")
        if size is None:
            data = tensor.get("data", [])
            if not isinstance(data, list):
                raise invalid(f"input '{name}' data {data!r}: expected a list of values (nested by row or flat)")
            inputs.append(Tensor(name, datatype, shape, values=data, source="data"))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise invalid(f"input '{name}' binary_data_size={size!r}: the body holds {len(binary) - offset} "
                          "more bytes after the JSON header")
        inputs.append(Tensor(name, datatype, shape, raw=bytes(binary[offset:offset + size]),
                             source="binary data"))
        offset += size
    if offset != len(binary):
        raise invalid(f"the body has {len(binary)} bytes after its JSON header; the inputs' binary_data_size "
                      f"add up to {offset}")
    outputs = [_object(o, f"outputs[{i}]") for i, o in enumerate(_list(document.get("outputs", []), "outputs"))]
    for i, output in enumerate(outputs):
        _string(output.get("name", ""), f"outputs[{i}] name")
    binary_of = {o.get("name", ""): bool(o["parameters"]["binary_data"]) for o in outputs
                 if isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]}
    request = InferRequest(model=model, version=version, inputs=inputs, outputs=[o.get("name", "") for o in outputs],
                           id=str(document.get("id", "")), parameters=parameters,
                           deadline=_deadline(parameters.get("timeout")), size=len(body))
    return HttpInfer(request, bool(parameters.get("binary_data_output", False)), binary_of)


def reply_body(reply: InferReply, call: HttpInfer) -> Tuple[bytes, Dict[str, str]]:
    """(the body, its headers): JSON, or JSON then the binary outputs' bytes."""
    outputs: List[dict] = []
    blobs: List[bytes] = []
    for tensor in reply.outputs:
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if call.wants_binary(tensor.name):
            out["parameters"] = {"binary_data_size": len(tensor.raw)}
            blobs.append(tensor.raw)
        elif tensor.datatype == "BYTES":  # JSON strings; bytes that are not UTF-8 need binary_data
            out["data"] = [e.decode("utf-8", errors="replace") for e in unpack_bytes(tensor.raw)]
        else:
            out["data"] = np.frombuffer(tensor.raw, dtype=NUMPY_TYPES[tensor.datatype]).tolist()
        outputs.append(out)
    document = {"model_name": reply.model, "model_version": reply.version, "outputs": outputs}
    if reply.id:
        document["id"] = reply.id
    if reply.parameters:
        document["parameters"] = reply.parameters
    header = json.dumps(document).encode()
    if not blobs:
        return header, {"Content-Type": JSON_TYPE}
    return header + b"".join(blobs), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


def json_body(body: bytes) -> dict:
    """The JSON object of a request that is only JSON (the repository extension's); empty: {}."""
    return _document(body) if body.strip() else {}


def _header_length(header: Optional[str], total: int) -> int:
    if header is None:
        return total
    try:
        length = int(header)
    except ValueError:
        length = -1
    if not 0 <= length <= total:
        raise invalid(f"{HEADER_LENGTH}: {header!r}: expected the JSON header's length in bytes, 0 to {total}")
    return length


def _document(text: bytes) -> dict:
    try:
        document = json.loads(text)
    except RecursionError as err:
        raise invalid("the request's JSON is nested too deep to read; send the protocol's JSON") from err
    except (UnicodeDecodeError, ValueError) as err:
        raise invalid(f"the request is not JSON ({err}); send the protocol's JSON, with "
                      f"{HEADER_LENGTH} if binary tensor data follows it") from err
    return _object(document, "the request")


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{what}: expected a JSON string, got {type(value).__name__}")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise invalid(f"{what}: expected a JSON list, got {type(value).__name__}")
    return value


def _deadline(timeout_us) -> Optional[float]:
    """The request parameter `timeout` (microseconds, as tritonclient.http sends it) as a deadline;
    none past NO_DEADLINE_S, as on gRPC (a wait that long cannot be timed)."""
    if timeout_us is None:
        return None
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or not 0 < timeout_us < math.inf:
        raise invalid(f"parameter timeout={timeout_us!r}: expected a positive number of microseconds")
    return None if timeout_us / 1e6 > NO_DEADLINE_S else time.monotonic() + timeout_us / 1e6
