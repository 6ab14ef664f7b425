"""What every front end decodes the same way, whatever the protocol: tensor bytes into arrays
(checked against shape x datatype before anything is allocated from a client-supplied shape),
and the Triton parameters tserve refuses instead of silently ignoring."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from service.errors import InvalidInput, short
from service.types import DATATYPES

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


def check_tensor_header(name: str, datatype: str, shape: list[int]) -> np.dtype:
    """The datatype's numpy dtype (little-endian on the wire), after checking datatype and shape."""
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {short(name)} has unsupported datatype {short(datatype, 16)}; use one of {sorted(DATATYPES)}"
        )
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"input {short(name)} has a negative dimension (or one not an integer) in shape {shape[:8]}")
    return DATATYPES[datatype].newbyteorder("<")


def array_from_bytes(name: str, datatype: str, shape: list[int], data: bytes | memoryview, source: str) -> np.ndarray:
    """A zero-copy view of `data` as the tensor; `source` names where the bytes came from."""
    dtype = check_tensor_header(name, datatype, shape)
    need = math.prod(shape) * dtype.itemsize
    if len(data) != need:
        raise InvalidInput(
            f"input {short(name)}: {source} holds {len(data)} bytes; shape {shape[:8]} of {datatype} needs {need}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(DATATYPES[datatype], copy=False)
