"""The Hugging Face / Optimum decoder-with-past convention, in one place.

    inputs   input_ids [B, T], attention_mask [B, P+T], position_ids [B, T] (optional),
             past_key_values.{i}.key|value [B, heads, P, head_dim]
    outputs  logits [B, T, vocab], present.{i}.key|value [B, heads, P+T, head_dim]

A step's `present.*` outputs are the next step's `past_key_values.*` inputs, name for name.
Validation, model loading (warm-up) and the generation engine all go through `DecoderGraph`,
so the names, the empty cache (in the graph's own dtype and head shape) and the default
mask and positions are written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def present_name(past_name: str) -> str:
    return PRESENT_PREFIX + past_name.removeprefix(PAST_PREFIX)


@dataclass(frozen=True)
class KVInput:
    """One past_key_values input: [batch, heads, past, head_dim] of dtype."""

    name: str
    heads: int
    head_dim: int
    dtype: np.dtype


@dataclass(frozen=True)
class DecoderGraph:
    """What the engine and the validator need to know about one decoder-with-past graph."""

    past: tuple[KVInput, ...]
    has_position_ids: bool
    # GroupQueryAttention graphs (onnxruntime-genai's builder): each row's cache starts at column
    # 0 and its length is read from the attention mask, so rows are right-padded, and past and
    # present can be one buffer of up to `max_length` columns that ONNX Runtime writes in place.
    shared_kv: bool = False
    max_length: int = 0

    @classmethod
    def of(cls, inputs: Mapping[str, tuple[tuple[int, ...], np.dtype]], outputs: Iterable[str]) -> DecoderGraph | None:
        """The convention if the graph follows it, else None. `inputs` maps each input's name to
        its dims without the batch axis (-1: dynamic) and its dtype."""
        out_names = set(outputs)
        past = []
        for name, (dims, dtype) in inputs.items():
            if not name.startswith(PAST_PREFIX):
                continue
            if len(dims) != 3 or present_name(name) not in out_names:
                return None
            # a dynamic head count or head size, which no real export has, is taken as 1
            past.append(KVInput(name, max(dims[0], 1), max(dims[2], 1), np.dtype(dtype)))
        follows = {INPUT_IDS, ATTENTION_MASK} <= set(inputs) and LOGITS in out_names and bool(past)
        return cls(tuple(past), POSITION_IDS in inputs) if follows else None

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.past)

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(present_name(t.name) for t in self.past)

    @property
    def outputs(self) -> list[str]:
        """What a generation step asks for: logits, then the presents in past order."""
        return [LOGITS, *self.present_names]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length cache in the graph's own dtype and head shape."""
        return [np.zeros((batch, t.heads, 0, t.head_dim), t.dtype) for t in self.past]

    def feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence[np.ndarray]) -> dict:
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if self.has_position_ids:
            feeds[POSITION_IDS] = positions
        feeds.update(zip(self.past_names, past))
        return feeds

    def prompt_feeds(self, ids: np.ndarray) -> dict:
        """Feeds for prompts [B, T] with no past: a mask of ones, positions 0..T-1."""
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
        return self.feeds(ids, np.ones((B, T), np.int64), positions, self.empty_past(B))

    def fill_defaults(self, inputs: dict[str, np.ndarray]) -> str | None:
        """Complete a ModelInfer request that left out optional decoder inputs: an empty past,
        a mask of ones over past + new tokens, positions counted from the mask. Returns a
        problem to report, or None."""
        ids = inputs.get(INPUT_IDS)
        if ids is None or ids.ndim != 2:
            return None  # the required-input and rank checks report it
        B, T = ids.shape
        given = [t.name for t in self.past if t.name in inputs]
        if given and len(given) != len(self.past):
            missing = next(t.name for t in self.past if t.name not in inputs)
            return f"input {missing!r} is missing: give every past_key_values input or none"
        if not given:
            inputs.update(zip(self.past_names, self.empty_past(B)))
        first = inputs[self.past[0].name]
        past_len = first.shape[2] if first.ndim == 4 else 0
        if ATTENTION_MASK not in inputs:
            inputs[ATTENTION_MASK] = np.ones((B, past_len + T), np.int64)
        mask = inputs[ATTENTION_MASK]
        if self.has_position_ids and POSITION_IDS not in inputs and mask.ndim == 2:
            inputs[POSITION_IDS] = np.maximum(mask.cumsum(-1) - 1, 0)[:, -T:].astype(np.int64)
        return None

    def check_lengths(self, inputs: dict[str, np.ndarray], max_length: int | None) -> str | None:
        """The convention's shape rules across inputs; returns a problem, or None."""
        ids, mask = inputs[INPUT_IDS], inputs[ATTENTION_MASK]
        B, T = ids.shape
        pasts = [inputs[n] for n in self.past_names]
        past_len = pasts[0].shape[2]
        if any(p.shape != pasts[0].shape for p in pasts):
            return "past_key_values inputs must all have the same shape"
        if mask.shape != (B, past_len + T):
            return (
                f"input 'attention_mask' has shape {list(mask.shape)}; with input_ids {list(ids.shape)} and a past "
                f"of {past_len} it must be [{B}, {past_len + T}]"
            )
        if POSITION_IDS in inputs and inputs[POSITION_IDS].shape != ids.shape:
            return (
                f"input 'position_ids' has shape {list(inputs[POSITION_IDS].shape)}; "
                f"it must match input_ids {list(ids.shape)}"
            )
        if max_length and past_len + T > max_length:
            return (
                f"past ({past_len}) plus input_ids ({T}) is {past_len + T} tokens, above the maximum sequence "
                f"length {max_length}"
            )
        padded_left = (np.diff(mask, axis=1) > 0).any(axis=1) if self.shared_kv and mask.ndim == 2 else None
        if padded_left is not None and padded_left.any():
            row = int(np.argmax(padded_left))
            return (
                f"input 'attention_mask' row {row} has padding before tokens: this model reads each row's length "
                "from its mask, so pad on the right (ones, then zeros)"
            )
        return None
