"""The Optimum seq2seq export convention (T5, BART, Marian, and tserve's own encoder-decoder):
three graphs in one version folder, and what the server needs to know of them.

    encoder_model.onnx            input_ids, attention_mask -> last_hidden_state
    decoder_model.onnx            input_ids, encoder_hidden_states, encoder_attention_mask
                                  -> logits, present.{i}.decoder.key|value, present.{i}.encoder.key|value
    decoder_with_past_model.onnx  input_ids, encoder_attention_mask, past_key_values.{i}.decoder|encoder.key|value
                                  [, decoder_attention_mask] -> logits, present.{i}.decoder.key|value

Or, instead of the two decoders, Optimum's merged one (what it writes by default beside them,
and what many published exports ship alone):

    decoder_model_merged.onnx     both decoders behind an If on `use_cache_branch` [1] bool; every
                                  input of both is required, the unused branch's ignored

The server prefers the two plain graphs when a folder has them, and otherwise drives the merged
graph as two `MergedBranch` views, filling the inputs the other branch owns with empty tensors.

A decoder_with_past graph that takes `decoder_attention_mask` (tserve's own export does) lets
sequences of different target lengths share one decode run; without it, only sequences of the
same target length can. This module imports nothing from the service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENCODER, DECODER, DECODER_WITH_PAST = "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"
USE_CACHE = "use_cache_branch"
_PRESENT = re.compile(r"present\.(\d+)\.(decoder|encoder)\.(key|value)$")


def decoder_files(version_dir: Path) -> tuple[str, ...] | None:
    """The decoder graphs this folder is served with: the two plain ones, else the merged one;
    None when it is not an encoder-decoder export."""
    if not (version_dir / ENCODER).is_file():
        return None
    if all((version_dir / f).is_file() for f in (DECODER, DECODER_WITH_PAST)):
        return DECODER, DECODER_WITH_PAST
    if (version_dir / MERGED).is_file():
        return (MERGED,)
    return None


def is_seq2seq(version_dir: Path) -> bool:
    return decoder_files(version_dir) is not None


class MergedBranch:
    """One branch of decoder_model_merged.onnx, seen as the plain graph it replaces: the same
    inputs and outputs, and a run that adds `use_cache_branch` and empty tensors for the inputs
    only the other branch reads. Wraps anything with graph_inputs/graph_outputs/run_sync/run
    (the server's OrtRuntime); closing is left to the owner of the runtime."""

    def __init__(self, runtime, use_cache: bool) -> None:
        self.runtime = runtime
        self.use_cache = use_cache
        inputs = {a.name: a for a in runtime.graph_inputs}
        if USE_CACHE not in inputs:
            raise ValueError(f"{MERGED} has no {USE_CACHE} input")
        # the first decoder reads the encoder's output and no cache; the other, the cache only
        own = (
            (lambda n: not n.startswith("past_key_values."))
            if not use_cache
            else (lambda n: n != "encoder_hidden_states")
        )
        self._filled = [
            (name, _dtype(a.type), a.shape) for name, a in inputs.items() if name != USE_CACHE and not own(name)
        ]
        self.graph_inputs = [a for name, a in inputs.items() if name != USE_CACHE and own(name)]
        self.graph_outputs = [
            a for a in runtime.graph_outputs if not (use_cache and ".encoder." in a.name)
        ]  # the cache branch repeats no cross presents
        self._flag = np.array([use_cache], dtype=bool)

    def feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(feeds["input_ids"])
        full = dict(feeds)
        full[USE_CACHE] = self._flag
        for name, dtype, shape in self._filled:
            # batch first, an empty sequence axis, the graph's own sizes elsewhere (1 if symbolic)
            dims = [batch] + [d if isinstance(d, int) else 1 for d in shape[1:]]
            dims[2 if len(dims) == 4 else 1] = 0
            full[name] = np.zeros(dims, dtype)
        return full

    def run_sync(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.runtime.run_sync(self.feeds(feeds), outputs)

    async def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return await self.runtime.run(self.feeds(feeds), outputs)

    def run_each(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[list[np.ndarray]]:
        return self.runtime.run_each(self.feeds(feeds), outputs)


def _dtype(ort_type: str) -> np.dtype:
    return {"tensor(float16)": np.dtype(np.float16), "tensor(double)": np.dtype(np.float64)}.get(
        ort_type, np.dtype(np.float32)
    )


@dataclass(frozen=True)
class Seq2SeqGraphs:
    n_layer: int
    self_names: tuple[str, ...]  # present.{i}.decoder.key|value, in the decoder's output order
    cross_names: tuple[str, ...]  # present.{i}.encoder.key|value
    past_inputs: tuple[str, ...]  # decoder_with_past's past_key_values.* inputs, in its order
    decoder_mask: bool  # decoder_with_past takes decoder_attention_mask
    dtype: np.dtype

    @classmethod
    def from_outputs(cls, decoder_outputs: list[str], with_past_inputs: list[str], dtype: np.dtype) -> Seq2SeqGraphs:
        found = [(int(m[1]), m[2], m[3], name) for name in decoder_outputs if (m := _PRESENT.match(name))]
        if not found or "logits" not in decoder_outputs:
            raise ValueError("decoder_model.onnx has no logits and present.{i}.decoder|encoder outputs")
        n_layer = max(i for i, *_ in found) + 1
        names = {(i, kind, kv): name for i, kind, kv, name in found}
        self_names = tuple(names[(i, "decoder", kv)] for i in range(n_layer) for kv in ("key", "value"))
        cross_names = tuple(names[(i, "encoder", kv)] for i in range(n_layer) for kv in ("key", "value"))
        past = tuple(n for n in with_past_inputs if n.startswith("past_key_values."))
        if len(past) != 4 * n_layer:
            raise ValueError(f"decoder_with_past_model.onnx has {len(past)} past inputs for {n_layer} layers")
        return cls(
            n_layer, self_names, cross_names, past, "decoder_attention_mask" in with_past_inputs, np.dtype(dtype)
        )

    def with_past_feeds(
        self,
        ids: np.ndarray,
        encoder_mask: np.ndarray,
        decoder_mask: np.ndarray,
        self_kv: list[np.ndarray],
        cross_kv: list[np.ndarray],
    ) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "encoder_attention_mask": encoder_mask}
        if self.decoder_mask:
            feeds["decoder_attention_mask"] = decoder_mask
        by_name = dict(zip((n.replace("present", "past_key_values") for n in self.self_names), self_kv))
        by_name.update(zip((n.replace("present", "past_key_values") for n in self.cross_names), cross_kv))
        feeds.update((n, by_name[n]) for n in self.past_inputs)
        return feeds
