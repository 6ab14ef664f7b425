from model import tokenizer
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def test_any_text_round_trips():
    for text in ["def f(x):\n    return x\n", "naïve café ☕ 日本語 🐍", "", "\x00\t\r\n"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tokenizer.decode(ids) == text


def test_invalid_utf8_is_replaced_not_raised():
    assert tokenizer.decode([0xFF, ord("a"), 0xC3]) == "\ufffda\ufffd"
    assert tokenizer.decode([ord("x"), tokenizer.EOT_ID]) == "x"


def test_stream_decoder_holds_back_partial_characters():
    dec = tokenizer.StreamDecoder()
    pieces = [dec.push(i) for i in "é🐍".encode()]
    assert pieces[0] == "" and pieces[1] == "é"
    assert "".join(pieces) + dec.flush() == "é🐍"
    dec = tokenizer.StreamDecoder()
    assert dec.push(0xE2) == "" and dec.flush() == "\ufffd"
