"""The encoder-decoder's masks and caches, and the naming task's data and metrics."""

from __future__ import annotations

from pathlib import Path

import torch

from model.naming import _examples_in, subtoken_f1
from model.seq2seq import BOS_ID, PAD_ID, Seq2Seq, Seq2SeqConfig

CFG = Seq2SeqConfig(
    d_model=32, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, n_head=2, max_source=32, max_target=10, dropout=0.0
)


def model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(CFG).eval()


def test_source_padding_changes_nothing():
    m = model()
    src = torch.randint(0, 256, (1, 7))
    padded = torch.cat([src, torch.full((1, 5), PAD_ID)], 1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64)], 1)
    tgt = torch.tensor([[BOS_ID, 5, 6]])
    with torch.no_grad():
        a, _, _ = m.decode(tgt, torch.ones(1, 7, dtype=torch.int64), m.encode(src, torch.ones(1, 7, dtype=torch.int64)))
        b, _, _ = m.decode(tgt, mask, m.encode(padded, mask))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_the_caches_give_the_full_pass():
    m = model()
    src, mask = torch.randint(0, 256, (2, 6)), torch.ones(2, 6, dtype=torch.int64)
    tgt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        memory = m.encode(src, mask)
        full, _, _ = m.decode(tgt, mask, memory)
        changed = tgt.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 256
        other, _, _ = m.decode(changed, mask, memory)
        torch.testing.assert_close(full[:, :-1], other[:, :-1])  # a later token changes no earlier logits
        logits, past, cross = m.decode(tgt[:, :2], mask, memory)
        steps = [logits]
        for t in range(2, 5):
            logits, past, cross = m.decode(tgt[:, t : t + 1], mask, past=past, cross=cross)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_targets_in_a_batch_match_each_alone():
    """decoder_attention_mask: a row with a shorter target, left-padded, decodes as alone."""
    m = model()
    src, mask = torch.randint(0, 256, (1, 6)), torch.ones(1, 6, dtype=torch.int64)
    with torch.no_grad():
        memory = m.encode(src, mask)
        alone, _, _ = m.decode(torch.tensor([[BOS_ID, 7]]), mask, memory)
        padded, _, _ = m.decode(
            torch.tensor([[PAD_ID, BOS_ID, 7]]), mask, memory, decoder_attention_mask=torch.tensor([[0, 1, 1]])
        )
    torch.testing.assert_close(padded[:, 1:], alone, rtol=1e-5, atol=1e-5)


def test_examples_mask_the_name_and_drop_the_docstring():
    text = (
        'class A:\n    def get_item(self, key):\n        """Get it."""\n'
        "        return self.get_item(key) or self._d[key]\n"
    )
    [ex] = _examples_in(text)
    assert ex.name == "get_item" and "get_item" not in ex.source and "Get it" not in ex.source
    assert ex.source.startswith("def _(self, key):") and "self._(key)" in ex.source
    assert _examples_in("def __init__(self):\n    self.x = 1\n    self.y = 2\n") == []


def test_subtoken_f1():
    assert subtoken_f1("get_item", "get_item") == 1.0
    assert subtoken_f1("get_value", "get_item") == 0.5
    assert subtoken_f1("run", "get_item") == 0.0


def test_train_seq2seq_on_a_bpe_checkpoints_and_resumes(tmp_path):
    import sysconfig

    from model.train_seq2seq import NamingTokenizer, parse_args, train

    email = str(Path(sysconfig.get_paths()["stdlib"]) / "email")  # 29 files, 2 of them held out
    tc, mc, _ = parse_args(
        [
            "--out",
            str(tmp_path),
            "--data",
            email,
            "--bpe-vocab",
            "300",
            "--batch-size",
            "8",
            "--max-steps",
            "12",
            "--warmup-steps",
            "2",
            "--eval-interval",
            "6",
            "--eval-examples",
            "8",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--n-encoder-layers",
            "1",
            "--n-decoder-layers",
            "1",
            "--n-head",
            "2",
            "--max-source",
            "48",
            "--max-target",
            "12",
        ]
    )
    tc.max_steps = 6
    train(tc, mc)
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    tok = NamingTokenizer.from_checkpoint(first)
    assert first["config"]["vocab_size"] == 300 and (first["config"]["pad_id"], first["config"]["eos_id"]) == (0, 2)
    assert tok.decode(tok.encode("def _(self):\n    return self._x")) == "def _(self):\n    return self._x"
    tc.max_steps, tc.bpe_vocab = 12, 280  # a resume keeps the checkpoint's tokenizer, whatever the flag
    metrics = train(tc, mc, resume=True)
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert after["step"] == 12 and after["tokenizer"] == first["tokenizer"] and metrics["examples_seen"] == 12 * 8
    assert set(metrics["held_out"]) == {"exact_match", "subtoken_f1"} and len(metrics["baselines"]) == 2
