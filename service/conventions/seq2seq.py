"""The Optimum seq2seq export convention (T5, BART, Marian, and tserve's own encoder-decoder):
three graphs in one version folder, and what the server needs to know of them.

    encoder_model.onnx            input_ids, attention_mask -> last_hidden_state
    decoder_model.onnx            input_ids, encoder_hidden_states, encoder_attention_mask
                                  -> logits, present.{i}.decoder.key|value, present.{i}.encoder.key|value
    decoder_with_past_model.onnx  input_ids, encoder_attention_mask, past_key_values.{i}.decoder|encoder.key|value
                                  [, decoder_attention_mask] -> logits, present.{i}.decoder.key|value

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
_PRESENT = re.compile(r"present\.(\d+)\.(decoder|encoder)\.(key|value)$")


def is_seq2seq(version_dir: Path) -> bool:
    return all((version_dir / f).is_file() for f in (ENCODER, DECODER, DECODER_WITH_PAST))


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
        return cls(n_layer, self_names, cross_names, past, "decoder_attention_mask" in with_past_inputs,
                   np.dtype(dtype))

    def with_past_feeds(self, ids: np.ndarray, encoder_mask: np.ndarray, decoder_mask: np.ndarray,
                        self_kv: list[np.ndarray], cross_kv: list[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "encoder_attention_mask": encoder_mask}
        if self.decoder_mask:
            feeds["decoder_attention_mask"] = decoder_mask
        by_name = dict(zip((n.replace("present", "past_key_values") for n in self.self_names), self_kv))
        by_name.update(zip((n.replace("present", "past_key_values") for n in self.cross_names), cross_kv))
        feeds.update((n, by_name[n]) for n in self.past_inputs)
        return feeds
