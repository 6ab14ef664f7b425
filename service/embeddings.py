"""Text embedding as a product: texts in, one vector each out.

A model is an embedder when its graph follows the encoder convention (input_ids,
attention_mask[, token_type_ids] -> last_hidden_state) and its folder carries a tokenizer.json:
an Optimum feature-extraction export, or a sentence-transformers snapshot (its pooling read by
conventions/sentence_transformers.py). The data plane turns each text into its own
ModelInfer-shaped request, so the batcher packs the texts of many requests together (a
request of many texts is never refused for a row cap), then pools each text's token states
here, normalises (TEI's default; `normalize: false` keeps the raw vectors) and, for Matryoshka
models, cuts to the `dimensions` asked for and normalises again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from service.conventions import encoder
from service.conventions.sentence_transformers import Pooling
from service.errors import InvalidInput

MAX_INPUTS = 2048  # texts in one request, as OpenAI bounds it
DEFAULT_EMBED_LENGTH = 512  # when neither the folder nor the config gives a limit


@dataclass
class EmbedRequest:
    model: str
    inputs: list[str] | list[list[int]]  # texts, or token ids the client tokenized
    request_id: str = ""
    model_version: str = ""
    truncate: bool = False  # cut a text past the model's limit instead of refusing it
    normalize: bool = True
    dimensions: int | None = None  # keep the first d components (Matryoshka), normalised again


@dataclass
class EmbedResult:
    vectors: list[np.ndarray]
    tokens: int  # every input's, counted as the model saw them


@dataclass
class Embedder:
    """One model's tokenizer, limits and pooling."""

    tokenizer: object  # generation/tokenizer.HFTokenizer
    pooling: Pooling
    max_length: int
    hidden_size: int | None
    input_names: tuple[str, ...]
    vocab_size: int | None = None
    _truncating: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        raw = self.tokenizer._tokenizer  # a second instance that truncates, so the first never changes
        self._truncating = copy.deepcopy(raw)
        self._truncating.enable_truncation(self.max_length)

    def token_ids(self, request: EmbedRequest) -> list[list[int]]:
        """Each input's ids; InvalidInput naming the input and the limit when one is too long
        and the request does not ask to truncate, or is empty."""
        if not request.inputs:
            raise InvalidInput("input: at least one text")
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidInput(f"input: {len(request.inputs)} texts, above the {MAX_INPUTS} a request may hold")
        out = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                if not item:
                    raise InvalidInput(f"input[{i}] is empty")
                ids = (self._truncating if request.truncate else self.tokenizer._tokenizer).encode(item).ids
            else:
                ids = list(item)
                if not ids:
                    raise InvalidInput(f"input[{i}] has no token ids")
                if request.truncate:
                    ids = ids[: self.max_length]
                if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in ids):
                    raise InvalidInput(f"input[{i}] holds a token id outside the vocabulary [0, {self.vocab_size})")
            if len(ids) > self.max_length:
                raise InvalidInput(
                    f"input[{i}] is {len(ids)} tokens; model {request.model!r} reads at most {self.max_length} "
                    "(send truncate: true to cut it)"
                )
            out.append(ids)
        return out

    def inputs(self, ids: list[int]) -> dict[str, np.ndarray]:
        row = np.array([ids], np.int64)
        feeds = {encoder.INPUT_IDS: row, encoder.ATTENTION_MASK: np.ones_like(row)}
        if encoder.TOKEN_TYPE_IDS in self.input_names:
            feeds[encoder.TOKEN_TYPE_IDS] = np.zeros_like(row)
        return feeds

    def pool(self, hidden: np.ndarray) -> np.ndarray:
        """One text's token states [1, T, H] (its own tokens only: the batcher cut the padding) -> [H]."""
        states = hidden[0].astype(np.float32)
        mode = self.pooling.mode
        if mode == "cls":
            return states[0].copy()
        if mode == "last_token":
            return states[-1].copy()
        if mode == "max":
            return states.max(0)
        return states.mean(0)

    def finish(self, vector: np.ndarray, request: EmbedRequest) -> np.ndarray:
        if request.dimensions is not None:
            if not 1 <= request.dimensions <= vector.shape[0]:
                raise InvalidInput(f"dimensions must be between 1 and {vector.shape[0]} (got {request.dimensions})")
            vector = vector[: request.dimensions]
        if request.normalize or request.dimensions is not None or self.pooling.normalize:
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else vector
        return vector
