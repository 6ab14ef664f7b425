"""What every front end decodes the same way, whatever the protocol: tensor bytes into arrays
(checked against shape x datatype before anything is allocated from a client-supplied shape),
and the Triton parameters tserve refuses instead of silently ignoring."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from service.errors import InvalidInput, short
from service.types import BYTES, DATATYPE_OF_NUMPY, DATATYPES

# Triton features tserve does not implement: refused with a message, never silently ignored
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory",
    "shared_memory_byte_size": "shared memory",
    "shared_memory_offset": "shared memory",
    "classification": "classification outputs",
    "sequence_id": "stateful sequences",
    "sequence_start": "stateful sequences",
    "sequence_end": "stateful sequences",
}


def refuse_unsupported(parameters: Iterable[str], where: str) -> None:
    for key in parameters:
        if key in UNSUPPORTED_PARAMETERS:
            raise InvalidInput(
                f"parameter {key!r} on {where}: tserve does not support "
                f"{UNSUPPORTED_PARAMETERS[key]}; send the data in the request itself"
            )


MAX_RANK, MAX_DIM, MAX_ELEMENTS = 16, (1 << 31) - 1, 1 << 40


def check_tensor_header(name: str, datatype: str, shape: list[int]) -> np.dtype:
    """The datatype's numpy dtype (little-endian on the wire), after checking datatype and shape."""
    if datatype not in DATATYPES and datatype != BYTES:
        raise InvalidInput(
            f"input {short(name)} has unsupported datatype {short(datatype, 16)}; use one of "
            f"{sorted([*DATATYPES, BYTES])}"
        )
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"input {short(name)} has a negative dimension (or one not an integer) in shape {shape[:8]}")
    # an empty tensor may claim any other dimension; one no array can have is refused here
    if len(shape) > MAX_RANK or any(d > MAX_DIM for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInput(
            f"input {short(name)} has shape {shape[:8]}: at most {MAX_RANK} dimensions of at most {MAX_DIM} each, "
            f"{MAX_ELEMENTS} elements in all (counting empty dimensions as 1)"
        )
    if datatype == BYTES:
        return np.dtype(np.object_)
    return DATATYPES[datatype].newbyteorder("<")


def array_from_bytes(name: str, datatype: str, shape: list[int], data: bytes | memoryview, source: str) -> np.ndarray:
    """A zero-copy view of `data` as the tensor; `source` names where the bytes came from."""
    dtype = check_tensor_header(name, datatype, shape)
    if datatype == BYTES:
        return strings_from_bytes(name, shape, data, source)
    need = math.prod(shape) * dtype.itemsize
    if len(data) != need:
        raise InvalidInput(
            f"input {short(name)}: {source} holds {len(data)} bytes; shape {shape[:8]} of {datatype} needs {need}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(DATATYPES[datatype], copy=False)


def strings_from_bytes(name: str, shape: list[int], data: bytes | memoryview, source: str) -> np.ndarray:
    """A BYTES tensor in Triton's encoding: each element a 4-byte little-endian length, then
    that many bytes; an object array of bytes."""
    count, view, items, at = math.prod(shape), memoryview(data), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise InvalidInput(f"input {short(name)}: {source} ends inside a BYTES element's 4-byte length")
        n = int.from_bytes(view[at : at + 4], "little")
        if at + 4 + n > len(view):
            raise InvalidInput(f"input {short(name)}: {source} has a BYTES element of {n} bytes past its end")
        items.append(bytes(view[at + 4 : at + 4 + n]))
        at += 4 + n
        if len(items) > count:
            break
    if len(items) != count:
        raise InvalidInput(
            f"input {short(name)}: {source} holds {len(items)} BYTES elements; shape {shape[:8]} needs {count}"
        )
    return strings(items, shape)


def strings(items: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def strings_to_bytes(array: np.ndarray) -> bytes:
    """An object array of bytes (or str) in Triton's BYTES encoding."""
    parts = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += [len(data).to_bytes(4, "little"), data]
    return b"".join(parts)


def datatype_of(array: np.ndarray) -> str:
    return BYTES if array.dtype == np.object_ else DATATYPE_OF_NUMPY[array.dtype]
