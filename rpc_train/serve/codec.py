"""Requests in, replies out: a ModelInferRequest checked and turned into rows, logits into a reply.

Every check names the bad value and what would be valid; `BadRequest` carries the gRPC status
(INVALID_ARGUMENT, or NOT_FOUND for a model that is not served here).
"""

import math
from dataclasses import dataclass
from typing import List

import grpc
import numpy as np
import torch

from rpc_train.serve.protocol import pb

INPUT, OUTPUT, DATATYPE, VERSION = "input", "logits", "FP32", "1"


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ModelSpec:
    """What the served model takes and gives, as ModelMetadata lists it."""

    name: str
    shape: List[int]  # one input row
    num_classes: int
    max_batch_size: int

    def metadata(self) -> "pb.ModelMetadataResponse":
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name, versions=[VERSION], platform="pytorch",
            inputs=[tensor(name=INPUT, datatype=DATATYPE, shape=[-1, *self.shape])],
            outputs=[tensor(name=OUTPUT, datatype=DATATYPE, shape=[-1, self.num_classes])])


def check_model(spec: ModelSpec, name: str, version: str) -> None:
    if name != spec.name:
        raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not served here; the model is '{spec.name}'")
    if version not in ("", VERSION):
        raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}'; its version is "
                                                    f"'{VERSION}' (or leave it empty)")


def _invalid(message: str) -> BadRequest:
    return BadRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode(request: "pb.ModelInferRequest", spec: ModelSpec) -> torch.Tensor:
    """The request's rows as a float32 tensor [n, *shape]; BadRequest for anything else."""
    check_model(spec, request.model_name, request.model_version)
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = [i.name for i in request.inputs]
        raise _invalid(f"inputs {names}: model '{spec.name}' takes one input named '{INPUT}'")
    wanted = [o.name for o in request.outputs]
    if any(name != OUTPUT for name in wanted):
        raise _invalid(f"outputs {wanted}: model '{spec.name}' gives one output, '{OUTPUT}'")
    tensor = request.inputs[0]
    if tensor.datatype != DATATYPE:
        raise _invalid(f"input '{INPUT}' datatype {tensor.datatype or '(none)'}: expected {DATATYPE}")
    shape = list(tensor.shape)
    if len(shape) != 1 + len(spec.shape) or shape[1:] != spec.shape or shape[0] < 0:
        raise _invalid(f"input '{INPUT}' shape {shape}: expected [rows, {', '.join(map(str, spec.shape))}]")
    rows = shape[0]
    if rows == 0:
        raise _invalid(f"input '{INPUT}' shape {shape}: an empty batch; send at least one row")
    if rows > spec.max_batch_size:
        raise _invalid(f"input '{INPUT}' has {rows} rows, more than serve.max_batch_size={spec.max_batch_size}; "
                       "split it into smaller requests")
    values = _values(request, tensor, shape)
    x = torch.from_numpy(values.reshape(shape))
    bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise _invalid(f"input '{INPUT}' rows {bad[:8]} hold NaN or infinite values; send finite numbers")
    return x


def _values(request: "pb.ModelInferRequest", tensor, shape: List[int]) -> np.ndarray:
    count = math.prod(shape)
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise _invalid(f"input '{INPUT}' has both raw_input_contents and typed contents; send one of them")
        if len(request.raw_input_contents) != 1:
            raise _invalid(f"raw_input_contents has {len(request.raw_input_contents)} entries; expected 1, "
                           f"one per input")
        raw = request.raw_input_contents[0]
        if len(raw) != 4 * count:
            raise _invalid(f"input '{INPUT}' raw_input_contents holds {len(raw)} bytes; shape {shape} of "
                           f"{DATATYPE} needs {4 * count}")
        return np.frombuffer(raw, dtype="<f4").copy()  # a writable copy, little-endian as the protocol says
    typed = tensor.contents.fp32_contents
    if len(typed) != count:
        raise _invalid(f"input '{INPUT}' contents.fp32_contents holds {len(typed)} values; shape {shape} needs "
                       f"{count}")
    return np.asarray(typed, dtype=np.float32)


def encode(request: "pb.ModelInferRequest", spec: ModelSpec, logits: torch.Tensor,
           batch_rows: int, cached: bool = False) -> "pb.ModelInferResponse":
    """The reply: `logits` as raw little-endian FP32; its parameters say how many rows the batch
    it rode in had (`batch_rows`), or that the cache answered (`cache_hit`)."""
    out = logits.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
    reply = pb.ModelInferResponse(
        model_name=spec.name, model_version=VERSION, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype=DATATYPE, shape=list(out.shape))],
        raw_output_contents=[out.tobytes()])
    if cached:
        reply.parameters["cache_hit"].bool_param = True
    else:
        reply.parameters["batch_rows"].int64_param = batch_rows
    return reply
