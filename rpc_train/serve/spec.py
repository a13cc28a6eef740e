"""What a served model takes and gives, and the protocol-neutral request and reply around it.

`ModelSpec.rows` checks an `InferRequest` against one version of a model (its inputs,
datatypes, shapes, the batch limit, finite values, indices within their tables) and turns it
into the rows a replica computes: one tensor per input, in the model's order;
`ModelSpec.reply` turns the replica's logits back into an `InferReply` naming the version.
Every check names the bad value and what would be valid.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import grpc
import torch

from rpc_train.serve.tensors import BadRequest, Tensor, TensorSpec, invalid, output_tensor

VERSION = "1"


@dataclass
class InferRequest:
    """A ModelInfer call as either door received it."""

    model: str
    inputs: List[Tensor]
    version: str = ""  # empty: the server picks
    outputs: List[str] = field(default_factory=list)  # the outputs asked for by name; empty: all
    id: str = ""
    parameters: Dict[str, Any] = field(default_factory=dict)
    deadline: Optional[float] = None  # time.monotonic() after which nobody waits for the answer
    size: int = 0  # the request's bytes on the wire, for serve.max_message_mb


@dataclass
class InferReply:
    model: str
    version: str
    id: str
    outputs: List[Tensor]
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One served model as ModelMetadata lists it."""

    name: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    max_batch_size: int
    version: str = VERSION
    # Integer inputs that index tables: each column's table size (values in [0, size)).
    index_limits: Dict[str, List[int]] = field(default_factory=dict)

    @classmethod
    def classifier(cls, name: str, shape: List[int], num_classes: int, max_batch_size: int,
                   version: str = VERSION) -> "ModelSpec":
        """An image or digits model: one FP32 input of `shape` a row, FP32 logits out."""
        return cls(name, [TensorSpec("input", "FP32", list(shape))], [TensorSpec("logits", "FP32", [num_classes])],
                   max_batch_size, version)

    @classmethod
    def dlrm(cls, name: str, num_dense: int, table_rows: List[int], max_batch_size: int,
             version: str = VERSION) -> "ModelSpec":
        """A click model: FP32 dense features and INT64 indices (one a table) in, the click logit out."""
        return cls(name, [TensorSpec("dense", "FP32", [num_dense]), TensorSpec("sparse", "INT64", [len(table_rows)])],
                   [TensorSpec("logits", "FP32", [1])], max_batch_size, version, {"sparse": list(table_rows)})

    def metadata(self, versions: Optional[List[str]] = None) -> dict:
        return {"name": self.name, "versions": versions or [self.version], "platform": "pytorch",
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}

    def check(self, name: str, version: str) -> None:
        if name != self.name:
            raise BadRequest(grpc.StatusCode.NOT_FOUND,
                             f"model '{name}' is not served here; the model is '{self.name}'")
        if version not in ("", self.version):
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}'; its version "
                                                        f"is '{self.version}' (or leave it empty)")

    def rows(self, request: InferRequest) -> Tuple[torch.Tensor, ...]:
        """The request's rows, checked: one tensor [n, *dims] per input, in the model's order."""
        self.check(request.model, request.version)
        given = [t.name for t in request.inputs]
        if sorted(given) != sorted(t.name for t in self.inputs):
            expected = ", ".join(f"'{t.name}'" for t in self.inputs)
            raise invalid(f"inputs {given}: model '{self.name}' takes "
                          + (f"one input named {expected}" if len(self.inputs) == 1 else f"inputs {expected}"))
        known = [t.name for t in self.outputs]
        if any(name not in known for name in request.outputs):
            raise invalid(f"outputs {request.outputs}: model '{self.name}' gives "
                          + ", ".join(f"'{name}'" for name in known))
        by_name = {t.name: t for t in request.inputs}
        rows = tuple(self._checked(spec, by_name[spec.name]) for spec in self.inputs)
        if len({len(x) for x in rows}) > 1:
            raise invalid("inputs " + ", ".join(f"'{s.name}' {len(x)} rows" for s, x in zip(self.inputs, rows))
                          + ": every input needs the same number of rows")
        return rows

    def _checked(self, spec: TensorSpec, tensor: Tensor) -> torch.Tensor:
        name = spec.name
        if tensor.datatype != spec.datatype:
            raise invalid(f"input '{name}' datatype {tensor.datatype or '(none)'}: expected {spec.datatype}")
        shape = list(tensor.shape)
        if len(shape) != 1 + len(spec.dims) or shape[1:] != spec.dims or shape[0] < 0:
            raise invalid(f"input '{name}' shape {shape}: expected [rows, {', '.join(map(str, spec.dims))}]")
        if shape[0] == 0:
            raise invalid(f"input '{name}' shape {shape}: an empty batch; send at least one row")
        if shape[0] > self.max_batch_size:
            raise invalid(f"input '{name}' has {shape[0]} rows, more than serve.max_batch_size="
                          f"{self.max_batch_size}; split it into smaller requests")
        x = torch.from_numpy(tensor.array())
        if x.is_floating_point():
            bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise invalid(f"input '{name}' rows {bad[:8]} hold NaN or infinite values; send finite numbers")
        if name in self.index_limits:
            self._check_indices(name, x, self.index_limits[name])
        return x

    @staticmethod
    def _check_indices(name: str, x: torch.Tensor, limits: List[int]) -> None:
        sizes = torch.tensor(limits, dtype=x.dtype)
        outside = (x < 0) | (x >= sizes)
        if outside.any():
            row, column = (int(i) for i in outside.nonzero()[0])
            raise invalid(f"input '{name}' column {column} holds {int(x[row, column])} (row {row}); its table has "
                          f"{limits[column]} rows: send indices in [0, {limits[column]})")

    def reply(self, request: InferRequest, logits: torch.Tensor, parameters: Dict[str, Any]) -> InferReply:
        (spec,) = self.outputs
        array = logits.detach().to(torch.float32).contiguous().numpy()
        return InferReply(self.name, self.version, request.id, [output_tensor(spec, array)], parameters)

