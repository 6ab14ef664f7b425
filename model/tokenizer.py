"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, 256 is <|endoftext|>.

Any text round-trips exactly. Decoding generated ids may meet invalid UTF-8 (the model can
emit any byte); those bytes become U+FFFD rather than an exception.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

EOT_ID = 256
VOCAB_SIZE = 257


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns ids into text one at a time, holding back a multi-byte character until complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id])) if token_id < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def manifest_entry() -> dict:
    """How a server rebuilds this tokenizer without torch or this package."""
    return {"type": "byte", "vocab_size": VOCAB_SIZE, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
