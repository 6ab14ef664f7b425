"""The one token path: a step's logits for the rows that need a token -> their tokens.

Every generated token is chosen here, on every road: a prompt's last chunk, the batched decode,
a verified draft (one row per drafted position), both passes of an encoder-decoder, and the
load-time checks (which run the engine). The logits go through small processors, in order,
each vectorised over the rows it concerns:

    ban_early_eos   end-of-sequence ids -> -inf for a row whose token would come before its
                    sequence's `min_tokens`
    temperature     sampled rows, as float64, divided by their temperature
    top_k           everything below a row's k-th largest -> -inf
    softmax         -> probabilities
    top_p           the smallest set of a row's most likely tokens reaching p, renormalised

then the choice: the argmax for greedy rows (one call for all of them), a draw from each
sampled row's probabilities with its own sequence's generator (seeded by the request), so a
sequence's tokens never depend on what else shares the batch. The next processors
(penalties, logit bias, grammar masks) and log-probabilities go here too, nowhere else.

A row is (sequence, offset): `logits[i]` is the distribution of the token that follows the
sequence's generated tokens and `offset` more (a draft's later positions); processors that
count generated tokens (min_tokens) read it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the sequence imports SamplingParams from here
    from service.generation.sequence import Sequence


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_tokens(logits: np.ndarray, seqs: Seq[Sequence], offsets: Seq[int] | None = None) -> list[int]:
    """The next token of each row: `logits` is [rows, vocab] (changed in place by the
    processors), `seqs[i]` row i's sequence, `offsets[i]` (default 0) how many tokens after its
    generated ones row i's token comes."""
    offsets = offsets if offsets is not None else [0] * len(seqs)
    for i, seq in enumerate(seqs):
        if seq.logits_seen is not None:
            seq.logits_seen.append(logits[i].copy())
    ban_early_eos(logits, seqs, offsets)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    tokens = np.empty(len(seqs), np.int64)
    if len(greedy) == len(seqs):
        tokens[:] = logits.argmax(-1)
    else:
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        params = [seqs[i].params for i in sampled]
        z = temperature(logits[sampled], params)
        z = top_k(z, params)
        probs = top_p(softmax(z), params)
        tokens[sampled] = draw(probs, [seqs[i].rng for i in sampled])
    return tokens.tolist()


# -- processors, in the order they run ----------------------------------------------------


def ban_early_eos(logits: np.ndarray, seqs: Seq[Sequence], offsets: Seq[int]) -> None:
    """End-of-sequence ids to -inf in the rows whose token would come before `min_tokens`."""
    for i, (seq, offset) in enumerate(zip(seqs, offsets)):
        if seq.min_tokens > len(seq.generated) + offset and seq.eos_token_ids:
            logits[i, list(seq.eos_token_ids)] = -np.inf


def temperature(logits: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    return logits.astype(np.float64) / np.array([p.temperature for p in params])[:, None]


def top_k(z: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    for i, p in enumerate(params):
        if p.top_k and p.top_k < z.shape[1]:
            kth = np.partition(z[i], -p.top_k)[-p.top_k]
            z[i, z[i] < kth] = -np.inf
    return z


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    return probs


def top_p(probs: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    p = np.array([q.top_p for q in params])
    rows = np.flatnonzero(p < 1.0)
    if not len(rows):
        return probs
    part = probs[rows]
    order = np.argsort(-part, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(part, order, -1), -1)
    keep = (cumulative < p[rows, None]).sum(-1) + 1  # the smallest set reaching top_p
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None], -1)
    part = np.where(ranks < keep[:, None], part, 0.0)
    probs[rows] = part / part.sum(-1, keepdims=True)
    return probs


def draw(probs: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row from its probabilities, with that row's own generator."""
    cumulative = np.cumsum(probs, -1)
    u = np.array([rng.random() for rng in rngs]) * cumulative[:, -1]
    return np.array([np.searchsorted(c, x, side="right") for c, x in zip(cumulative, u)]).clip(max=probs.shape[1] - 1)
