"""Tensors as the Open Inference Protocol carries them, whichever door they came through.

A door (gRPC or HTTP) only says what a tensor is called, its datatype and shape, and where its
values are: raw little-endian bytes (gRPC's raw_input_contents, HTTP's binary extension) or a
list of values (gRPC's typed contents, HTTP's JSON `data`). The core checks name, datatype and
shape against the model first and decodes the values after, so that a request with a wrong
datatype is told so, not that its bytes do not add up.

BYTES (strings of bytes) are carried as Triton does: raw, each element as a 4-byte
little-endian length and then its bytes; typed, gRPC's `bytes_contents` and HTTP JSON strings
(UTF-8). They decode to a numpy array of Python `bytes` objects.
"""

import math
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence

import grpc
import numpy as np


MESSAGE_CHARS = 1000  # gRPC clients refuse a status message over 16 KiB; ours quote the client's values


class ServeError(Exception):
    """A request that gets a status other than OK; `code` keeps gRPC's meaning, and each door
    maps it to its own status (HTTP: 400, 404, 429, 503, ...). The message is one line, cut at
    MESSAGE_CHARS: it quotes what the client sent, which may be long or hold line breaks."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        if len(message) > MESSAGE_CHARS:
            message = f"{message[:MESSAGE_CHARS]}... ({len(message) - MESSAGE_CHARS} more characters)"
        super().__init__(message)
        self.code, self.message = code, message


class BadRequest(ServeError):
    """The request itself is wrong: INVALID_ARGUMENT, or NOT_FOUND for what is not served here."""


def invalid(message: str) -> BadRequest:
    return BadRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


# The protocol's datatypes that map to a fixed-size little-endian numpy type.
NUMPY_TYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
               "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass
class Tensor:
    """One input or output: its values are in `raw` (bytes) or `values` (a flat sequence)."""

    name: str
    datatype: str
    shape: List[int]
    raw: Optional[bytes] = None
    values: Optional[Sequence] = None
    source: str = "data"  # what the door calls where the values came from, for error messages

    def array(self) -> np.ndarray:
        """The values as a writable numpy array of `shape`; BadRequest when they do not fit it."""
        if self.datatype == "BYTES":
            return self._bytes_array()
        dtype = np.dtype(NUMPY_TYPES[self.datatype])
        count = math.prod(self.shape)
        if self.raw is not None:
            if len(self.raw) != dtype.itemsize * count:
                raise invalid(f"input '{self.name}' {self.source} holds {len(self.raw)} bytes; shape {self.shape} "
                              f"of {self.datatype} needs {dtype.itemsize * count}")
            return np.frombuffer(self.raw, dtype=dtype).reshape(self.shape).copy()
        values = [] if self.values is None else self.values
        flat = _flatten(values, len(self.shape))
        if len(flat) != count:
            raise invalid(f"input '{self.name}' {self.source} holds {len(flat)} values; shape {self.shape} needs "
                          f"{count}")
        try:
            return np.asarray(flat, dtype=dtype).reshape(self.shape)
        except (TypeError, ValueError, OverflowError) as err:
            raise invalid(f"input '{self.name}' {self.source}: values that are not {self.datatype} ({err})") from err


    def _bytes_array(self) -> np.ndarray:
        count = math.prod(self.shape)
        if self.raw is not None:
            flat = unpack_bytes(self.raw, self.name, self.source)
        else:
            flat = [v.encode() if isinstance(v, str) else v
                    for v in _flatten([] if self.values is None else self.values, len(self.shape))]
            if not all(isinstance(v, bytes) for v in flat):
                raise invalid(f"input '{self.name}' {self.source}: values that are not BYTES (strings)")
        if len(flat) != count:
            raise invalid(f"input '{self.name}' {self.source} holds {len(flat)} elements; shape {self.shape} needs "
                          f"{count}")
        out = np.empty(count, dtype=object)
        out[:] = flat
        return out.reshape(self.shape)


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as raw contents: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unpack_bytes(raw: bytes, name: str = "", source: str = "raw") -> List[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise invalid(f"input '{name}' {source}: {len(raw) - at} bytes left where a 4-byte length was expected")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise invalid(f"input '{name}' {source}: an element of {length} bytes, but only {len(raw) - at - 4} follow")
        out.append(bytes(raw[at + 4:at + 4 + length]))
        at += 4 + length
    return out


def _flatten(values: Sequence, depth: int) -> list:
    """JSON may nest the values by row ([[1, 2], [3, 4]]) or give them flat; both are the protocol's.
    Nested deeper than the shape's `depth` dimensions, the lists below are left as values (which
    then fail the count or the datatype): a hostile nesting costs no deeper recursion."""
    if depth > 1 and values and isinstance(values[0], (list, tuple)):
        return [v for row in values for v in _flatten(row, depth - 1)]
    return list(values)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: its name, datatype, and one row's shape."""

    name: str
    datatype: str
    dims: List[int]

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}

    def config(self) -> dict:
        # ModelConfig's enum names BYTES TYPE_STRING, as Triton's model_config.proto does.
        kind = "STRING" if self.datatype == "BYTES" else self.datatype
        return {"name": self.name, "data_type": f"TYPE_{kind}", "dims": list(self.dims)}


def output_tensor(spec: TensorSpec, array: np.ndarray) -> Tensor:
    """A reply's tensor: raw little-endian bytes of the datatype the model gives (BYTES: length-prefixed)."""
    if spec.datatype == "BYTES":
        array = np.asarray(array, dtype=object)
        return Tensor(spec.name, spec.datatype, list(array.shape), raw=pack_bytes(list(array.flatten())))
    out = np.ascontiguousarray(array, dtype=np.dtype(NUMPY_TYPES[spec.datatype]))
    return Tensor(spec.name, spec.datatype, list(out.shape), raw=out.tobytes())
