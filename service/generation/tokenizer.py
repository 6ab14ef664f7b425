"""Tokenizers the server can rebuild from a model's manifest, without the training code.

Only the byte-level tokenizer exists today (tserve's own models); a model whose manifest
names no tokenizer the server knows takes and returns token ids only.
"""

from __future__ import annotations

import codecs
from typing import Protocol


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes; ids above are special tokens that produce no text."""

    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> "ByteStreamDecoder":
        return ByteStreamDecoder()


class ByteStreamDecoder:
    """Holds back a multi-byte character until it is complete; invalid bytes become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def from_manifest(entry: dict | None) -> ByteTokenizer | None:
    if entry and entry.get("type") == "byte":
        return ByteTokenizer(int(entry.get("vocab_size", 257)), entry.get("eos_token_id"))
    return None
