"""Bits per byte on the validation split, one scoring rule for every tokenizer and the n-gram.

All score the same text (`data.eval_span`): the total negative log-likelihood of its tokens
after the first, divided by the bytes those tokens spell. The Transformer sees each target
with up to block_size tokens of context (sliding windows with a stride of half the context);
the n-gram sees its own order's worth of bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from model.data import eval_span, tokenize
from model.ngram import NGramModel
from model.tokenizer import ByteTokenizer, Tokenizer
from model.transformer import GPT


def bits_per_byte(nll_nats: np.ndarray | float, n_bytes: int) -> float:
    return float(np.sum(nll_nats)) / n_bytes / math.log(2)


def scored(docs: Sequence[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The span's tokens, and the bytes spelt by all but the first (the scored ones)."""
    tokens = tokenize(docs, tokenizer)
    return tokens, int(tokenizer.token_bytes()[tokens[1:]].sum())


LogitsFn = Callable[[np.ndarray], np.ndarray]  # (B, T) int64 ids -> (B, T, vocab) logits


def torch_logits_fn(model: GPT) -> LogitsFn:
    @torch.no_grad()
    def fn(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x))[0].float().numpy()

    return fn


def sliding_nll(logits_fn: LogitsFn, tokens: np.ndarray, block_size: int, batch_size: int = 16) -> np.ndarray:
    """NLL in nats of tokens[1:], each predicted from up to block_size preceding tokens."""
    T = block_size
    stride = T // 2
    n = len(tokens)
    data = tokens.astype(np.int64)
    out = np.zeros(n - 1)
    windows = []  # (input start, first scored target, end target exclusive)
    for first in range(1, n, stride):
        end = min(first + stride, n)
        windows.append((max(0, end - 1 - T), first, end))
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[2] - 1 - w[0], []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = np.stack([data[s : s + length] for s, _, _ in chunk])
            y = np.stack([data[s + 1 : s + 1 + length] for s, _, _ in chunk])
            logits = logits_fn(x).astype(np.float64)
            m = logits.max(-1, keepdims=True)
            log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
            nll = log_z - np.take_along_axis(logits, y[..., None], -1)[..., 0]  # (B, length)
            for row, (s, first, end) in enumerate(chunk):
                # logits index j predicts position s + j + 1
                out[first - 1 : end - 1] = nll[row, first - s - 1 : end - s - 1]
    return out


def logits_fn_bpb(logits_fn: LogitsFn, block_size: int, tokenizer: Tokenizer, docs: Sequence[str]) -> float:
    tokens, n_bytes = scored(docs, tokenizer)
    return bits_per_byte(sliding_nll(logits_fn, tokens, block_size), n_bytes)


def model_bpb(model: GPT, tokenizer: Tokenizer, val_docs: Sequence[str], max_bytes: int) -> float:
    was_training = model.training
    model.eval()
    try:
        return logits_fn_bpb(torch_logits_fn(model), model.cfg.block_size, tokenizer, eval_span(val_docs, max_bytes))
    finally:
        model.train(was_training)


def ngram_bpb(train_docs: Sequence[str], val_docs: Sequence[str], max_bytes: int, order: int) -> float:
    """A smoothed byte n-gram fitted on the training files, on the same span."""
    byte_tok = ByteTokenizer()
    tokens, n_bytes = scored(eval_span(val_docs, max_bytes), byte_tok)
    ngram = NGramModel(order, byte_tok.vocab_size).fit(tokenize(train_docs, byte_tok))
    return bits_per_byte(ngram.nll(tokens), n_bytes)
