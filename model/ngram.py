"""Smoothed byte n-gram language model: the baseline the Transformer has to beat.

Interpolated absolute discounting (Ney et al.), the core of Kneser-Ney without continuation
counts: P(w|h) = max(c(h,w) - D, 0) / c(h) + D * N1+(h·) / c(h) * P(w|h'), bottoming out
at the uniform distribution. Counting is vectorised with numpy so a 4-gram over the whole
standard library fits in seconds.
"""

from __future__ import annotations

import numpy as np


class NGramModel:
    def __init__(self, order: int, vocab_size: int, discount: float = 0.75) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order = order
        self.vocab_size = vocab_size
        self.discount = discount
        # per context length k: sorted joint keys and counts, sorted context keys, totals, types
        self._tables: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def _keys(self, tokens: np.ndarray, k: int, positions: np.ndarray) -> np.ndarray:
        """Integer key of the k tokens before each position (positions >= k)."""
        key = np.zeros(len(positions), dtype=np.int64)
        for j in range(k, 0, -1):
            key = key * self.vocab_size + tokens[positions - j]
        return key

    def fit(self, tokens: np.ndarray) -> "NGramModel":
        tokens = tokens.astype(np.int64)
        self._tables = []
        for k in range(self.order):  # k = context length
            pos = np.arange(k, len(tokens))
            ctx = self._keys(tokens, k, pos)
            joint, joint_counts = np.unique(ctx * self.vocab_size + tokens[pos], return_counts=True)
            ctx_of_joint = joint // self.vocab_size
            ctx_keys, first = np.unique(ctx_of_joint, return_index=True)
            totals = np.add.reduceat(joint_counts, first)
            types = np.diff(np.append(first, len(joint)))
            self._tables.append((joint, joint_counts, ctx_keys, totals, types))
        return self

    @staticmethod
    def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
        return np.where(sorted_keys[idx] == keys, values[idx], 0)

    def nll(self, tokens: np.ndarray) -> np.ndarray:
        """Negative log-likelihood in nats of tokens[1:], each given the tokens before it."""
        tokens = tokens.astype(np.int64)
        pos = np.arange(1, len(tokens))
        prob = np.full(len(pos), 1.0 / self.vocab_size)
        for k, (joint, joint_counts, ctx_keys, totals, types) in enumerate(self._tables):
            has_ctx = pos >= k
            p = pos[has_ctx]
            ctx = self._keys(tokens, k, p)
            total = self._lookup(ctx_keys, totals, ctx).astype(np.float64)
            n_types = self._lookup(ctx_keys, types, ctx)
            count = self._lookup(joint, joint_counts, ctx * self.vocab_size + tokens[p])
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            lower = prob[has_ctx]
            mixed = np.maximum(count - self.discount, 0) / safe + self.discount * n_types / safe * lower
            prob[has_ctx] = np.where(seen, mixed, lower)
        return -np.log(prob)

    def next_probs(self, context: np.ndarray) -> np.ndarray:
        """(vocab,) probability of each next token after `context` (for greedy decoding)."""
        context = np.asarray(context, dtype=np.int64)
        candidates = np.arange(self.vocab_size, dtype=np.int64)
        prob = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k, (joint, joint_counts, ctx_keys, totals, types) in enumerate(self._tables):
            if len(context) < k:
                break
            ctx = np.zeros(1, dtype=np.int64)
            for j in range(k, 0, -1):
                ctx = ctx * self.vocab_size + context[-j]
            total = float(self._lookup(ctx_keys, totals, ctx)[0])
            if total == 0:
                continue
            n_types = float(self._lookup(ctx_keys, types, ctx)[0])
            count = self._lookup(joint, joint_counts, ctx * self.vocab_size + candidates)
            prob = np.maximum(count - self.discount, 0) / total + self.discount * n_types / total * prob
        return prob
