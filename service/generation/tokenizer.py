"""Tokenizers the server can load without the training code or `transformers`: tserve's own
byte-level tokenizer (named by its manifest), and any `tokenizer.json` an export carries (read
with the `tokenizers` library). A model with neither takes and returns token ids only.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes; ids above are special tokens that produce no text."""

    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # no special tokens to add

    def decoder(self, prompt: list[int] = ()) -> "ByteStreamDecoder":
        return ByteStreamDecoder()

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if 0 <= token_id < 256 else b""


class ByteStreamDecoder:
    """Holds back a multi-byte character until it is complete; invalid bytes become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face tokenizers' format), e.g. byte-level BPE."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer  # only models that carry a tokenizer.json need it

        self._tokenizer = Tokenizer.from_file(str(path))
        self.eos_token_id = None  # an export's end-of-sequence ids come from its generation config

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # with the tokenizer's own post-processing (a Llama tokenizer's <s>), as transformers does,
        # unless the text already carries them (a rendered chat template)
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): a byte-level BPE's token
        through its byte alphabet, a SentencePiece byte-fallback piece `<0xNN>` as that byte,
        `▁` as a space; a special token as its own text."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            if all(c in _UNICODE_TO_BYTE for c in piece):
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    @property
    def _byte_level(self) -> bool:
        decoder = self._tokenizer.decoder
        return decoder is not None and type(decoder).__name__ == "ByteLevel"

    def decoder(self, prompt: list[int] = ()) -> "HFStreamDecoder":
        return HFStreamDecoder(self, prompt)


class HFStreamDecoder:
    """Text a token at a time from a tokenizer that only decodes sequences: decode the ids from
    a prefix offset, and emit what lies beyond the prefix's own text once it no longer ends in
    an incomplete character (U+FFFD), as text-generation-inference does. The text streamed
    equals decoding all the ids at once."""

    CONTEXT = 5  # prompt ids decoded with the first tokens, so e.g. a SentencePiece word keeps its space

    def __init__(self, tokenizer: HFTokenizer, prompt: list[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt[-self.CONTEXT :])
        self._prefix = 0  # ids before this are done
        self._read = len(self._ids)  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]


Tokenizer = ByteTokenizer | HFTokenizer


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character each byte is written as
    in a byte-level BPE's vocabulary -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_alphabet()


def load_tokenizer(manifest_entry: dict | None, tokenizer_file: Path | None) -> Tokenizer | None:
    """The manifest's tokenizer first, else the export's tokenizer.json, else none."""
    if manifest_entry and manifest_entry.get("type") == "byte":
        return ByteTokenizer(int(manifest_entry.get("vocab_size", 257)), manifest_entry.get("eos_token_id"))
    if tokenizer_file is not None:
        return HFTokenizer(tokenizer_file)
    return None
