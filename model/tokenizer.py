"""Tokenizers the model trains with, and the bytes each token stands for (so that bits per
byte compare across them).

- bytes: ids 0-255 are the UTF-8 bytes, 256 is <|endoftext|>. Any text round-trips exactly;
  decoding generated ids may meet invalid UTF-8, which becomes U+FFFD rather than an exception.
- byte-level BPE, trained on the training split with the `tokenizers` library and shipped as
  `tokenizer.json` beside the model, so the server reads ours as it reads any Hugging Face
  export's. <|endoftext|> is its id 0.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

import numpy as np

EOT_ID = 256
VOCAB_SIZE = 257
EOT_TOKEN = "<|endoftext|>"


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


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    eot_id = EOT_ID

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return decode(ids)

    def token_bytes(self) -> np.ndarray:
        """(vocab,) bytes of text per id; <|endoftext|> counts as one, as a separator byte would."""
        return np.ones(VOCAB_SIZE, np.int64)

    def to_str(self) -> str | None:
        return None  # nothing to ship: the server knows this tokenizer by name

    def manifest_entry(self) -> dict:
        """How a server rebuilds this tokenizer without torch or this package."""
        return {"type": "byte", "vocab_size": VOCAB_SIZE, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}


class BPETokenizer:
    """Byte-level BPE (GPT-2's pre-tokenization: runs of spaces, words with their leading space)."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT_TOKEN,)) -> BPETokenizer:
        """Special tokens take the first ids, in order."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        # byte-level BPE spells each byte as one character, so a token's length is its bytes
        out = np.ones(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is not None and token != EOT_TOKEN:
                out[i] = len(token)
        return out

    def to_str(self) -> str:
        return self._tok.to_str()

    def manifest_entry(self) -> dict:
        return {
            "type": "tokenizer.json",
            "file": self.FILE,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eot_id,
            "pad_token_id": self.eot_id,
        }


Tokenizer = ByteTokenizer | BPETokenizer


def from_checkpoint(ckpt: dict) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (bytes when it carries none)."""
    text = ckpt.get("tokenizer")
    return BPETokenizer.from_str(text) if text else ByteTokenizer()
