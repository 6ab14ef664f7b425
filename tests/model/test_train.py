import math

import pytest
import torch

from model.data import eval_span, load_documents
from model.evaluate import scored
from model.tokenizer import from_checkpoint
from model.train import parse_args, train
from model.transformer import load_checkpoint

TINY = [
    "--block-size",
    "32",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--batch-size",
    "8",
    "--warmup-steps",
    "2",
    "--lr",
    "3e-3",
    "--eval-interval",
    "10",
    "--eval-bytes",
    "4096",
    "--final-eval-bytes",
    "8192",
    "--max-corpus-bytes",
    "400000",
    "--ngram-order",
    "3",
]


@pytest.mark.parametrize("bpe_vocab", [0, 512])
def test_train_checkpoint_and_resume(tmp_path, bpe_vocab):
    tc, mc, _ = parse_args(["--out", str(tmp_path), "--max-steps", "40", "--bpe-vocab", str(bpe_vocab), *TINY])
    tc.max_steps = 20
    first = train(tc, mc)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert {"config", "tokenizer", "model", "optimizer", "step", "metrics", "train_config"} <= ckpt.keys()
    assert ckpt["step"] == 20 and ckpt["config"]["d_model"] == 32
    tokenizer = from_checkpoint(ckpt)
    assert ckpt["config"]["vocab_size"] == tokenizer.vocab_size == (bpe_vocab or 257)
    assert first["val_history"][-1]["val_bpb"] < first["val_history"][0]["val_bpb"] + 1e-9

    tc.max_steps = 40
    tc.bpe_vocab = 300 if bpe_vocab else 0  # a resume keeps the checkpoint's tokenizer, whatever the flag
    resumed = train(tc, mc, resume=True)
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert after["tokenizer"] == ckpt["tokenizer"]  # resuming keeps the tokenizer it was trained with
    assert resumed["steps"] == 40 and resumed["tokens_seen"] == 40 * 8 * 32
    model, _ = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    # well below a uniform guess over the ids, per byte of the text they spell
    tokens, n_bytes = scored(eval_span(load_documents(max_bytes=400_000).val, 8192), tokenizer)
    uniform = math.log2(tokenizer.vocab_size) * (len(tokens) - 1) / n_bytes
    assert resumed["val_bpb"] < uniform - 0.5
    assert resumed["ngram_val_bpb"] > 0
    assert model.cfg.n_layer == 2


def test_bpe_tokenizer_round_trips_and_counts_bytes():
    from model.tokenizer import BPETokenizer

    docs = load_documents(max_bytes=300_000)
    tok = BPETokenizer.train(docs.train, 400)
    sizes = tok.token_bytes()
    for text in ["def f(x):\n    return x\n", "naïve café ☕ 日本語 🐍", "\x00\t\r\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert sum(sizes[i] for i in ids) == len(text.encode())  # bits per byte rests on this
    again = BPETokenizer.from_str(tok.to_str())
    assert again.encode(docs.val[0]) == tok.encode(docs.val[0]) and again.eot_id == tok.eot_id == 0
