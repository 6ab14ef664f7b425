"""Text in, token ids out, with the folder's tokenizer.json: single texts and pairs (a reranker's
query and passage, an NLI premise and hypothesis, with their token types), checked against the
model's limit, and cut to it only when the request asks (`truncate`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from service.conventions import encoder
from service.errors import InvalidInput

MAX_INPUTS = 2048  # inputs in one request, as OpenAI bounds embeddings
DEFAULT_MAX_LENGTH = 512  # when neither the folder nor the config gives a limit


@dataclass
class Encoded:
    ids: list[int]
    type_ids: list[int] | None = None
    encoding: object | None = None  # the tokenizers Encoding: offsets and tokens, for token labels


@dataclass
class TextInputs:
    """One model's tokenizer, limit and input names."""

    tokenizer: object  # tokenizers.Tokenizer
    max_length: int
    input_names: tuple[str, ...]
    vocab_size: int | None = None
    _truncating: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tokenizer.no_padding()  # a tokenizer.json may carry the settings it was saved with
        self.tokenizer.no_truncation()
        self._truncating = copy.deepcopy(self.tokenizer)  # a second instance, so the first never changes
        self._truncating.enable_truncation(self.max_length)

    def encode(self, items: list, truncate: bool, model: str, where: str = "input") -> list[Encoded]:
        """Each item (a text, a (text, text) pair, or token ids the client made) encoded;
        InvalidInput naming the item when it is empty, too long without truncate, or has ids
        outside the vocabulary."""
        if not items:
            raise InvalidInput(f"{where}: at least one text")
        if len(items) > MAX_INPUTS:
            raise InvalidInput(f"{where}: {len(items)} inputs, above the {MAX_INPUTS} a request may hold")
        tokenizer = self._truncating if truncate else self.tokenizer
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise InvalidInput(f"{where}[{i}] is empty")
                enc = tokenizer.encode(item)
                done = Encoded(enc.ids, enc.type_ids, enc)
            elif isinstance(item, tuple):
                if not item[0] or not item[1]:
                    raise InvalidInput(f"{where}[{i}]: both texts of a pair must be non-empty")
                enc = tokenizer.encode(item[0], item[1])
                done = Encoded(enc.ids, enc.type_ids, enc)
            else:
                ids = list(item)
                if not ids:
                    raise InvalidInput(f"{where}[{i}] has no token ids")
                if truncate:
                    ids = ids[: self.max_length]
                if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in ids):
                    raise InvalidInput(f"{where}[{i}] holds a token id outside the vocabulary [0, {self.vocab_size})")
                done = Encoded(ids)
            if len(done.ids) > self.max_length:
                raise InvalidInput(
                    f"{where}[{i}] is {len(done.ids)} tokens; model {model!r} reads at most {self.max_length} "
                    "(send truncate: true to cut it)"
                )
            out.append(done)
        return out

    def feeds(self, enc: Encoded) -> dict[str, np.ndarray]:
        row = np.array([enc.ids], np.int64)
        feeds = {encoder.INPUT_IDS: row, encoder.ATTENTION_MASK: np.ones_like(row)}
        if encoder.TOKEN_TYPE_IDS in self.input_names:
            types = enc.type_ids if enc.type_ids is not None else [0] * len(enc.ids)
            feeds[encoder.TOKEN_TYPE_IDS] = np.array([types], np.int64)
        return feeds
