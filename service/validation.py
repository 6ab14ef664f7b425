"""Validate a decoded request against its model and prepare it for batching.

Everything a bad request could do to a batch is caught here, before it joins one: names,
datatypes, ranks, shapes, batch and sequence limits, zero-size dimensions, token ids outside
the vocabulary, and the decoder convention's length rules. Optional decoder inputs the client
left out are filled in (mask of ones, positions from the mask, an empty KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput, short
from service.types import DATATYPE_OF_NUMPY, InferRequest, ModelSpec, TensorSpec


@dataclass(eq=False)
class Prepared:
    inputs: dict[str, np.ndarray]  # with the batch axis first when the model batches
    rows: int
    length: int | None  # the primary padded input's sequence length (None: no padding)
    outputs: tuple[str, ...]
    group: tuple  # requests with equal groups may share a batch


def _shape(a: np.ndarray) -> list[int]:
    return list(a.shape)


def _check_tensor(spec: ModelSpec, t: TensorSpec, a: np.ndarray, allow_empty: bool) -> None:
    if a.dtype != t.dtype:
        raise InvalidInput(
            f"input {t.name!r} has datatype {_dtname(a.dtype)}, model {spec.name!r} expects {t.datatype}"
        )
    expected = ([-1] if spec.max_batch_size else []) + list(t.dims)
    if a.ndim != len(expected):
        raise InvalidInput(
            f"input {t.name!r} has shape {_shape(a)} (rank {a.ndim}); model {spec.name!r} expects rank "
            f"{len(expected)}: {expected}{' with the batch dimension first' if spec.max_batch_size else ''}"
        )
    for axis, (got, want) in enumerate(zip(a.shape, expected)):
        if want != -1 and got != want:
            raise InvalidInput(f"input {t.name!r} has shape {_shape(a)}; dimension {axis} must be {want}")
        if got == 0 and not (allow_empty and axis == 2):
            raise InvalidInput(f"input {t.name!r} has shape {_shape(a)}: dimension {axis} is zero-size")
    if spec.max_batch_size and a.shape[0] > spec.max_batch_size:
        raise InvalidInput(
            f"input {t.name!r} has batch size {a.shape[0]}, above model {spec.name!r}'s max_batch_size "
            f"{spec.max_batch_size}"
        )
    if spec.max_sequence_length:
        first = 1 if spec.max_batch_size else 0
        for axis in range(first, a.ndim):
            if (axis - first) < len(t.dims) and t.dims[axis - first] == -1 and a.shape[axis] > spec.max_sequence_length:
                raise InvalidInput(
                    f"input {t.name!r} has length {a.shape[axis]} on axis {axis}, above model {spec.name!r}'s "
                    f"maximum sequence length {spec.max_sequence_length}"
                )


def _dtname(dtype: np.dtype) -> str:
    return DATATYPE_OF_NUMPY.get(dtype, str(dtype))


def _check_positions(spec: ModelSpec, name: str, a: np.ndarray) -> None:
    """Position ids index the position table found in the graph: [0, rows) (a negative one would
    wrap around inside ONNX Runtime's Gather and silently read another row). Only that table's
    bound: a RoBERTa-family export's positions start past its pad id, above its length limit."""
    if not spec.position_table or "position" not in name or a.size == 0 or a.dtype.kind not in "iu":
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= spec.position_table:
        raise InvalidInput(
            f"input {name!r} holds position {lo if lo < 0 else hi}, outside model {spec.name!r}'s positions "
            f"[0, {spec.position_table})"
        )


def _check_tokens(spec: ModelSpec, name: str, a: np.ndarray) -> None:
    if spec.vocab_size is None or name not in spec.token_inputs or a.size == 0:
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= spec.vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidInput(
            f"input {name!r} holds token id {bad}, outside model {spec.name!r}'s vocabulary [0, {spec.vocab_size})"
        )


def prepare(spec: ModelSpec, request: InferRequest) -> Prepared:
    known = {t.name: t for t in spec.inputs}
    for name in request.inputs:
        if name not in known:
            raise InvalidInput(f"unknown input {short(name)} for model {spec.name!r}; it takes {sorted(known)}")
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in request.inputs]
    if missing:
        raise InvalidInput(f"model {spec.name!r} requires input(s) {missing}, which the request does not carry")
    outputs = request.requested_outputs or tuple(t.name for t in spec.outputs)
    names = {t.name for t in spec.outputs}
    for name in outputs:
        if name not in names:
            raise InvalidInput(
                f"unknown output {short(name)} requested from model {spec.name!r}; it has {sorted(names)}"
            )

    inputs = dict(request.inputs)
    decoder = spec.decoder
    if decoder is not None and (problem := decoder.fill_defaults(inputs)):
        raise InvalidInput(f"model {spec.name!r}: {problem}")
    past_names = set(decoder.past_names) if decoder else set()
    for name, a in inputs.items():
        _check_tensor(spec, known[name], a, allow_empty=name in past_names)
        _check_tokens(spec, name, a)
        _check_positions(spec, name, a)
    if decoder is not None and (problem := decoder.check_lengths(inputs, spec.max_sequence_length)):
        raise InvalidInput(f"model {spec.name!r}: {problem}")

    rows = 1
    if spec.max_batch_size:
        sizes = {name: a.shape[0] for name, a in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sizes}")
        rows = next(iter(sizes.values()))
    length, group = _batching_key(spec, inputs, outputs)
    return Prepared(inputs, rows, length, outputs, group)


def _per_row(spec: ModelSpec, output: str) -> bool:
    t = spec.output(output)
    return t is not None and t.variable_axis is None


def _batching_key(spec: ModelSpec, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[int | None, tuple]:
    """Which requests may share a batch: equal shapes apart from the batch axis and, for the
    inputs the model declares paddable, the sequence axis."""
    if not spec.batching.enabled:
        return None, ()
    pad = spec.padding.pad_values
    paddable = [n for n in (t.name for t in spec.inputs) if n in pad and n in inputs]
    # every output is cut back to the caller's length, or has no sequence axis (one value per row)
    can_pad = bool(paddable) and all(spec.padding.unpads(o) or _per_row(spec, o) for o in outputs)
    primary = paddable[0] if can_pad else None
    primary_len = inputs[primary].shape[spec.input(primary).variable_axis] if primary else None
    key: list = [outputs]
    for name in sorted(inputs):
        shape = list(inputs[name].shape[1:])
        if can_pad and name in pad:
            axis = spec.input(name).variable_axis - 1
            # every padded input must get the same amount of padding: keep their offsets equal
            shape[axis] = ("pad", shape[axis] - primary_len)
        key.append((name, tuple(shape)))
    return primary_len, tuple(key)
