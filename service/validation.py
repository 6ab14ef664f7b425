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
        raise InvalidInput(f"input {t.name!r} has datatype {_dtname(a.dtype)}, model {spec.name!r} expects {t.datatype}")
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
            f"input {t.name!r} has batch size {a.shape[0]}, above model {spec.name!r}'s max_batch_size {spec.max_batch_size}"
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


def _check_tokens(spec: ModelSpec, name: str, a: np.ndarray) -> None:
    if spec.vocab_size is None or name not in spec.token_inputs or a.size == 0:
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= spec.vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidInput(f"input {name!r} holds token id {bad}, outside model {spec.name!r}'s vocabulary [0, {spec.vocab_size})")


def _fill_decoder_defaults(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> None:
    ids = inputs["input_ids"]
    if ids.ndim != 2:
        return  # the rank check reports it
    B, T = ids.shape
    past_len = 0
    present = [t for t in spec.past_inputs if t.name in inputs]
    if present and inputs[present[0].name].ndim == 4:
        past_len = inputs[present[0].name].shape[2]
    for t in spec.past_inputs:
        if t.name not in inputs:
            if present:
                raise InvalidInput(f"input {t.name!r} is missing: give every past_key_values input or none")
            heads, head_dim = t.dims[0], t.dims[2]
            inputs[t.name] = np.zeros((B, heads, 0, head_dim), np.float32)
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = np.ones((B, past_len + T), np.int64)
    if "position_ids" in {t.name for t in spec.inputs} and "position_ids" not in inputs:
        mask = inputs["attention_mask"]
        if mask.ndim == 2:
            inputs["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)[:, -T:].astype(np.int64)


def _check_decoder_lengths(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> None:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    pasts = [inputs[t.name] for t in spec.past_inputs]
    past_len = pasts[0].shape[2]
    if any(p.shape != pasts[0].shape for p in pasts):
        raise InvalidInput("past_key_values inputs must all have the same shape")
    if mask.shape != (B, past_len + T):
        raise InvalidInput(
            f"input 'attention_mask' has shape {_shape(mask)}; with input_ids {_shape(ids)} and a past of "
            f"{past_len} it must be [{B}, {past_len + T}]"
        )
    if "position_ids" in inputs and inputs["position_ids"].shape != ids.shape:
        raise InvalidInput(f"input 'position_ids' has shape {_shape(inputs['position_ids'])}; it must match input_ids {_shape(ids)}")
    if spec.max_sequence_length and past_len + T > spec.max_sequence_length:
        raise InvalidInput(
            f"past ({past_len}) plus input_ids ({T}) is {past_len + T} tokens, above model {spec.name!r}'s "
            f"maximum sequence length {spec.max_sequence_length}"
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
            raise InvalidInput(f"unknown output {short(name)} requested from model {spec.name!r}; it has {sorted(names)}")

    inputs = dict(request.inputs)
    decoder = spec.is_decoder
    if decoder and "input_ids" in inputs:
        _fill_decoder_defaults(spec, inputs)
    past_names = {t.name for t in spec.past_inputs} if decoder else set()
    for name, a in inputs.items():
        _check_tensor(spec, known[name], a, allow_empty=name in past_names)
        _check_tokens(spec, name, a)
    if decoder:
        _check_decoder_lengths(spec, inputs)

    rows = 1
    if spec.max_batch_size:
        sizes = {name: a.shape[0] for name, a in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sizes}")
        rows = next(iter(sizes.values()))
    length, group = _batching_key(spec, inputs, outputs)
    return Prepared(inputs, rows, length, outputs, group)


def _batching_key(spec: ModelSpec, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[int | None, tuple]:
    """Which requests may share a batch: equal shapes apart from the batch axis and, for the
    inputs the model declares paddable, the sequence axis."""
    if not spec.batching.enabled:
        return None, ()
    pad = spec.padding.pad_values
    paddable = [n for n in (t.name for t in spec.inputs) if n in pad and n in inputs]
    can_pad = bool(paddable) and all(spec.padding.unpads(o) for o in outputs)
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
