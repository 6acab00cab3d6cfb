"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST API) on the wire: inference requests and
responses as JSON tensors or with the binary tensor data extension, and the protocol's error body.

    inference = decode_request(body, header_length)        texts, the outputs asked for, the request id
    content, headers = encode_response(...)                 JSON, or a JSON header then binary tensors

A request body is a JSON header, optionally followed by binary tensor data: the request's
`Inference-Header-Content-Length` gives the header's size in bytes, and an input with
`"parameters": {"binary_data_size": n}` takes the next n bytes instead of `"data"`. BYTES elements are a
4-byte little-endian length followed by that many bytes; FP32 elements are little-endian IEEE 754. An
output is answered in binary when the request asks for it: per output (`"parameters": {"binary_data":
true}`), else for every output (`"parameters": {"binary_data_output": true}` on the request), as Triton
defines it. A malformed body raises BadInput (400) naming what is wrong; nothing here allocates more than
the body's own size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from server.errors import BadInput, ServerError

PREFIX = "/v2"
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"
INPUT = "text"  # the one input of every task: BYTES [-1], UTF-8 texts
LABEL, PROBABILITIES = "label", "probabilities"  # BYTES [-1] and FP32 [-1, C]
OUTPUTS = (LABEL, PROBABILITIES)
LENGTH = struct.Struct("<I")  # a BYTES element's length prefix

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class TensorInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = Field(
        default=None, description="the elements, flat or nested in row-major order; absent for binary data"
    )


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Parameter] | None = None


class InferenceRequest(BaseModel):
    """The JSON part of an inference request."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """The JSON part of an inference response (binary outputs carry `binary_data_size`, no `data`)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOutput]


@dataclass(frozen=True)
class Wanted:
    """An output to answer, and whether as binary tensor data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class Inference:
    id: str | None
    texts: list[str]
    outputs: list[Wanted]


def is_protocol_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body(path: str, error: ServerError) -> dict[str, str]:
    """The error body for a request to `path`: the protocol's `{"error"}` on /v2, the typed one elsewhere."""
    return {"error": error.message} if is_protocol_path(path) else error.body()


def decode_request(body: bytes, header_length: int | None) -> Inference:
    """The texts of `body` (a JSON header of `header_length` bytes, then binary tensor data; the whole
    body is the header when `header_length` is None) and the outputs it asks for."""
    if header_length is None:
        header, binary = body, b""
    elif not 0 < header_length <= len(body):
        raise BadInput(f"{HEADER_LENGTH} is {header_length} but the request body has {len(body)} bytes")
    else:
        header, binary = body[:header_length], body[header_length:]
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise BadInput(f"invalid inference request: {problems}") from None
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = [tensor.name[:64] for tensor in request.inputs]
        raise BadInput(f"the model takes one input, {INPUT!r} (BYTES, shape [-1]); the request sent {names}")
    tensor = request.inputs[0]
    texts = _texts(tensor, binary)
    return Inference(request.id, texts, _wanted(request))


def _texts(tensor: TensorInput, binary: bytes) -> list[str]:
    if tensor.datatype != "BYTES":
        raise BadInput(f"input {INPUT!r} has datatype BYTES, not {tensor.datatype[:32]!r}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise BadInput(f"input {INPUT!r} has shape [-1] (one dimension), not {tensor.shape[:8]}")
    parameters = tensor.parameters or {}
    if "shared_memory_region" in parameters:
        raise BadInput("shared memory is not supported: send the tensor as JSON data or binary data")
    size = parameters.get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise BadInput(f"input {INPUT!r} has neither 'data' nor a 'binary_data_size' parameter")
        if binary:
            raise BadInput(f"{len(binary)} bytes of binary data follow the header but no input declares them")
        elements: list[Any] = []
        _flatten(tensor.data, elements, depth=0)
        for i, element in enumerate(elements):
            if not isinstance(element, str):
                raise BadInput(f"input {INPUT!r} element {i} is {type(element).__name__}, not a string")
        texts: list[str] = elements
    else:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadInput(f"input {INPUT!r}: binary_data_size must be a non-negative integer, not {size!r}")
        if tensor.data is not None:
            raise BadInput(f"input {INPUT!r} has both 'data' and binary data")
        if size != len(binary):
            raise BadInput(
                f"input {INPUT!r} declares {size} bytes of binary data; {len(binary)} follow the header"
            )
        texts = decode_bytes(binary, name=INPUT)
    if len(texts) != tensor.shape[0]:
        raise BadInput(f"input {INPUT!r} has shape {tensor.shape} but {len(texts)} elements")
    return texts


def _flatten(data: list[Any], into: list[Any], depth: int) -> None:
    if depth > 32:
        raise BadInput(f"input {INPUT!r}: data nested too deeply")
    for element in data:
        if isinstance(element, list):
            _flatten(element, into, depth + 1)
        else:
            into.append(element)


def _wanted(request: InferenceRequest) -> list[Wanted]:
    every = _flag(request.parameters, "binary_data_output", "the request")
    if request.outputs is None:
        return [Wanted(name, every) for name in OUTPUTS]
    wanted: list[Wanted] = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise BadInput(f"the model has no output {output.name[:64]!r}; its outputs are {list(OUTPUTS)}")
        if any(w.name == output.name for w in wanted):
            raise BadInput(f"output {output.name!r} is requested twice")
        parameters = output.parameters or {}
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in parameters:
                raise BadInput(f"output {output.name!r}: the {unsupported} parameter is not supported")
        binary = _flag(parameters, "binary_data", f"output {output.name!r}")
        wanted.append(Wanted(output.name, binary if "binary_data" in parameters else every))
    if not wanted:
        raise BadInput("'outputs' is empty: name at least one output, or leave 'outputs' out for all")
    return wanted


def _flag(parameters: dict[str, Any] | None, name: str, where: str) -> bool:
    value = (parameters or {}).get(name, False)
    if not isinstance(value, bool):
        raise BadInput(f"{where}: parameter {name} must be true or false, not {value!r}")
    return value


def decode_bytes(data: bytes, name: str) -> list[str]:
    """A BYTES tensor's elements (each a 4-byte little-endian length, then its bytes) as UTF-8 texts."""
    texts: list[str] = []
    offset = 0
    while offset < len(data):
        if offset + LENGTH.size > len(data):
            raise BadInput(f"input {name!r}: binary data ends inside the length of element {len(texts)}")
        (length,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        if offset + length > len(data):
            raise BadInput(
                f"input {name!r}: element {len(texts)} declares {length} bytes but only "
                f"{len(data) - offset} remain"
            )
        try:
            texts.append(data[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadInput(f"input {name!r}: element {len(texts)} is not UTF-8 text ({exc.reason})") from None
        offset += length
    return texts


def encode_bytes(texts: Sequence[str]) -> bytes:
    return b"".join(LENGTH.pack(len(raw)) + raw for raw in (text.encode("utf-8") for text in texts))


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    labels: Sequence[str],
    probabilities: np.ndarray,
    outputs: Sequence[Wanted],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: `labels` (N) and `probabilities` (N, C) as the outputs asked."""
    rows, classes = probabilities.shape
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows of probabilities")
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        if output.name == LABEL:
            tensor: dict[str, Any] = {"name": LABEL, "datatype": "BYTES", "shape": [rows]}
            raw, data = (encode_bytes(labels), None) if output.binary else (b"", list(labels))
        else:
            tensor = {"name": PROBABILITIES, "datatype": "FP32", "shape": [rows, classes]}
            values = probabilities.astype("<f4", copy=False)
            raw, data = (values.tobytes(), None) if output.binary else (b"", values.ravel().tolist())
        if output.binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    header = json.dumps(response, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    if not any(output.binary for output in outputs):
        return header, {"content-type": JSON_TYPE}
    return header + b"".join(chunks), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}
