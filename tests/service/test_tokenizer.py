"""Streaming detokenization, in-process: the text streamed a token at a time equals decoding
all the ids at once, for byte-level BPE and for SentencePiece-style (Metaspace) tokenizers."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from service.generation.tokenizer import HFTokenizer
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def metaspace_tokenizer(path: Path) -> HFTokenizer:
    vocab = {"<unk>": 0, "▁The": 1, "▁capital": 2, "▁is": 3, "▁Paris": 4, ".": 5, "▁caf": 6, "é": 7}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(path))
    return HFTokenizer(path)


def test_the_first_generated_word_keeps_its_space(tmp_path):
    tok = metaspace_tokenizer(tmp_path / "tokenizer.json")
    prompt = [1, 2, 3]  # "The capital is"
    decoder = tok.decoder(prompt)
    streamed = "".join(decoder.push(t) for t in [4, 5]) + decoder.flush()
    assert streamed == " Paris."
    assert tok.decode(prompt) + streamed == tok.decode(prompt + [4, 5])


def test_byte_level_text_streams_whole_characters(tmp_path):
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("café naïve 東京 " * 20)
    tokenizer.train(
        [str(corpus)],
        trainers.BpeTrainer(vocab_size=260, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    ids = tok.encode("東京 café")
    decoder = tok.decoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == "東京 café"
    assert all("\ufffd" not in p for p in pieces)  # a half character is held back, never sent
