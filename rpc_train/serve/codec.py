"""gRPC's messages to and from the core's: a ModelInferRequest into an `InferRequest`, an
`InferReply` into a ModelInferResponse, and the core's JSON documents into their messages.

Only what is particular to gRPC's encoding is checked here (raw against typed contents);
everything about the model is the core's (`ModelSpec.rows`).
"""

from typing import Any, Dict, Optional

from google.protobuf import json_format

from rpc_train.serve.protocol import pb
from rpc_train.serve.spec import InferReply, InferRequest, ModelSpec
from rpc_train.serve.tensors import Tensor, invalid

# Which typed-contents field holds each datatype's values.
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def request_of(message: "pb.ModelInferRequest", deadline: Optional[float] = None) -> InferRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries; expected {len(message.inputs)}, one per input")
    inputs = []
    for i, tensor in enumerate(message.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise invalid(f"input '{tensor.name}' has both raw_input_contents and typed contents; "
                              "send one of them")
            inputs.append(Tensor(tensor.name, tensor.datatype, list(tensor.shape), raw=raw[i],
                                 source="raw_input_contents"))
        else:
            field = CONTENTS.get(tensor.datatype, "fp32_contents")
            inputs.append(Tensor(tensor.name, tensor.datatype, list(tensor.shape),
                                 values=getattr(tensor.contents, field), source=f"contents.{field}"))
    return InferRequest(model=message.model_name, version=message.model_version, inputs=inputs,
                        outputs=[o.name for o in message.outputs], id=message.id,
                        parameters=parameters_of(message.parameters), deadline=deadline, size=message.ByteSize())


def parameters_of(parameters) -> Dict[str, Any]:
    """An InferParameter or ModelRepositoryParameter map as plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items()
            if value.WhichOneof("parameter_choice")}


def reply_message(reply: InferReply) -> "pb.ModelInferResponse":
    message = pb.ModelInferResponse(
        model_name=reply.model, model_version=reply.version, id=reply.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                 for t in reply.outputs],
        raw_output_contents=[t.raw for t in reply.outputs])
    for key, value in reply.parameters.items():
        _set_parameter(message.parameters[key], value)
    return message


def _set_parameter(parameter, value) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def message_of(document: dict, message_class):
    """One of the core's JSON documents as the protocol's gRPC message."""
    return json_format.ParseDict(document, message_class())


# The single-model helpers that tests and the Ray Serve peer use.
def decode(message: "pb.ModelInferRequest", spec: ModelSpec):
    """The rows of a model with one input: one tensor."""
    (rows,) = spec.rows(request_of(message))
    return rows


def encode(message: "pb.ModelInferRequest", spec: ModelSpec, logits, batch_rows: int,
           cached: bool = False) -> "pb.ModelInferResponse":
    request = InferRequest(model=spec.name, inputs=[], id=message.id)
    return reply_message(spec.reply(request, logits, {"cache_hit": True} if cached else {"batch_rows": batch_rows}))
