"""KServe v2 inference bodies over HTTP <-> domain objects: JSON tensors, and Triton's binary
tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then each binary
tensor's bytes in order, sized by its `binary_data_size` parameter).

Checks match the gRPC converters' (service/wire.py does the shared part), so a bad request gets
the same message over either protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInput, short
from service.tasks.tensors import TASK_PARAMETERS
from service.types import BYTES, InferRequest, InferResponse
from service.wire import (
    array_from_bytes,
    check_tensor_header,
    datatype_of,
    refuse_unsupported,
    strings,
    strings_to_bytes,
)

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class DecodedInfer:
    request: InferRequest
    binary_outputs: dict[str, bool]  # requested outputs: answer as binary data?
    binary_default: bool  # outputs not named in the request
    timeout_us: int | None = None  # Triton's `timeout` request parameter


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _parameters(entry: dict, where: str) -> dict:
    params = _object(entry.get("parameters") or {}, f"parameters of {where}")
    refuse_unsupported(params, where)
    return params


MAX_JSON_DEPTH = 64  # a tensor has at most a few dimensions; deeper nesting is refused, not recursed into


def _flat(data: Any, depth: int = 0) -> list:
    """Nested JSON lists (row-major, as KServe allows) flattened."""
    if not isinstance(data, list):
        return [data]
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"tensor data is nested deeper than {MAX_JSON_DEPTH} levels")
    if data and isinstance(data[0], list):
        return [v for row in data for v in _flat(row, depth + 1)]
    return data


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    dtype = check_tensor_header(name, datatype, shape)
    values = _flat(data)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input {short(name)}: data holds {len(values)} values; shape {shape[:8]} needs {count}")
    if datatype == BYTES:
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"input {short(name)}: BYTES data must be strings")
        return strings([v.encode() for v in values], shape)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise InvalidInput(f"input {short(name)}: BOOL data must be true or false")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InvalidInput(f"input {short(name)}: {datatype} data must be numbers")
    try:
        array = np.array(values, dtype=dtype.newbyteorder("="))
    except (OverflowError, ValueError) as e:
        raise InvalidInput(f"input {short(name)}: a value does not fit {datatype}: {e}") from None
    if dtype.kind in "iu" and any(isinstance(v, float) for v in values):
        raise InvalidInput(f"input {short(name)}: {datatype} data must be integers")
    return array.reshape(shape)


def decode_infer(body: bytes, header_length: str | None, model: str, version: str) -> DecodedInfer:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {short(header_length)}") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body holds {len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput("the request body's JSON is nested too deeply") from None
    doc = _object(doc, "the request body")
    params = _parameters(doc, "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput("the request body needs an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for entry in raw_inputs:
        entry = _object(entry, "each input")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each input needs a 'name' string")
        if name in inputs:
            raise InvalidInput(f"input {short(name)} appears twice")
        datatype, shape = entry.get("datatype"), entry.get("shape")
        if not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidInput(f"input {short(name)} needs 'datatype' (a string) and 'shape' (a list)")
        size = _parameters(entry, f"input {short(name)}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {short(name)}: binary_data_size {short(size)} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            inputs[name] = array_from_bytes(name, datatype, shape, binary[offset : offset + size], "binary data")
            offset += size
        elif "data" in entry:
            inputs[name] = _json_tensor(name, datatype, shape, entry["data"])
        else:
            raise InvalidInput(f"input {short(name)} has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary data no input claims")
    binary_default = bool(params.get("binary_data_output", False))
    outputs: dict[str, bool] = {}
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        raise InvalidInput("the request's 'outputs' must be a list of objects")
    for entry in requested:
        entry = _object(entry, "each output")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each output needs a 'name' string")
        outputs[name] = bool(_parameters(entry, f"output {short(name)}").get("binary_data", binary_default))
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)):
        raise InvalidInput(f"parameter 'timeout' must be an integer (microseconds), got {short(timeout)}")
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=inputs,
        requested_outputs=tuple(outputs),
        parameters={k: v for k, v in params.items() if k in TASK_PARAMETERS},
    )
    return DecodedInfer(request, outputs, binary_default, timeout)


def encode_infer(res: InferResponse, decoded: DecodedInfer) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    outputs, chunks = [], []
    for name in decoded.request.requested_outputs or tuple(res.outputs):
        array = np.ascontiguousarray(res.outputs[name])
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if decoded.binary_outputs.get(name, decoded.binary_default):
            if datatype == BYTES:
                data = strings_to_bytes(array)
            else:
                data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif datatype == BYTES:
            entry["data"] = [v.decode("utf-8", "replace") for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    doc = {"model_name": res.model_name, "model_version": res.model_version, "outputs": outputs}
    if res.id:
        doc["id"] = res.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
