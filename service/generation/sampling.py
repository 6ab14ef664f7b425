"""The one token path: a step's logits for the rows that need a token -> their tokens.

Every generated token is chosen here, on every road: a prompt's last chunk, the batched decode,
a verified draft (one row per drafted position), both passes of an encoder-decoder, and the
load-time checks (which run the engine). The logits go through small processors, in order,
each vectorised over the rows it concerns:

    ban_early_eos   end-of-sequence ids -> -inf for a row whose token would come before its
                    sequence's `min_tokens`
    logit_bias      a row's bias added to the logits of the token ids it names (OpenAI's
                    logit_bias; -100 bans a token, 100 all but forces it)
    penalize        repetition_penalty over the prompt and output (Hugging Face's: a seen
                    token's positive logit divided by it, a negative one multiplied), then
                    OpenAI's frequency and presence penalties over the output
                    (logit -= count * frequency_penalty + (count > 0) * presence_penalty)
    temperature     sampled rows, as float64, divided by their temperature
                    [log-probabilities are read here: log_softmax of the logits so far, at
                    temperature 1 for greedy rows; before min_p, top_k and top_p cut]
    min_p           tokens less likely than min_p x the most likely one -> -inf (vLLM's)
    top_k           everything below a row's k-th largest -> -inf
    softmax         -> probabilities
    top_p           the smallest set of a row's most likely tokens reaching p, renormalised

Before them all, a constrained row's grammar (generation/grammar.py) sets every token outside it
to -inf; after the choice, it advances with the token chosen.

then the choice: the argmax for greedy rows (one call for all of them), a draw from each
sampled row's probabilities with its own sequence's generator (seeded by the request), so a
sequence's tokens never depend on what else shares the batch.

A row is (sequence, offset): `logits[i]` is the distribution of the token that follows the
sequence's generated tokens and `offset` more (a draft's later positions); processors that
count generated tokens (min_tokens) read it. A sequence with penalties never drafts, so the
penalties count its generated tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.generation import grammar

if TYPE_CHECKING:  # the sequence imports SamplingParams from here
    from service.generation.sequence import Sequence

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a token's logits depend on the tokens before it (a draft cannot be verified)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A chosen token's log-probability and the `k` most likely tokens' (best first), from the
    distribution it was drawn from: after logit bias, penalties and temperature (1 for greedy),
    before min_p, top_k and top_p cut it."""

    token: int
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()


def choose_tokens(
    logits: np.ndarray, seqs: Seq[Sequence], offsets: Seq[int] | None = None
) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """The next token of each row, and (when any row's sequence asks for them) each row's
    TokenLogprob, None for the rows that do not ask. `logits` is [rows, vocab] (changed in
    place by the processors), `seqs[i]` row i's sequence, `offsets[i]` (default 0) how many
    tokens after its generated ones row i's token comes."""
    offsets = offsets if offsets is not None else [0] * len(seqs)
    for i, seq in enumerate(seqs):
        if seq.logits_seen is not None:
            seq.logits_seen.append(logits[i].copy())
    constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if constrained:
        grammar.mask(logits, constrained, [seqs[i].grammar for i in constrained])
    ban_early_eos(logits, seqs, offsets)
    logit_bias(logits, seqs)
    penalize(logits, seqs)
    asked = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    log_probs: dict[int, np.ndarray] = {}
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    tokens = np.empty(len(seqs), np.int64)
    if asked and greedy:
        rows = [i for i in asked if seqs[i].params.greedy]
        log_probs.update(zip(rows, log_softmax(logits[rows].astype(np.float64))))
    if len(greedy) == len(seqs):
        tokens[:] = logits.argmax(-1)
    else:
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        params = [seqs[i].params for i in sampled]
        z = temperature(logits[sampled], params)
        if asked:
            rows = [j for j, i in enumerate(sampled) if seqs[i].params.logprobs is not None]
            log_probs.update(zip((sampled[j] for j in rows), log_softmax(z[rows])))
        z = top_k(min_p(z, params), params)
        probs = top_p(softmax(z), params)
        tokens[sampled] = draw(probs, [seqs[i].rng for i in sampled])
    chosen = tokens.tolist()
    for i in constrained:  # each grammar advances with its token
        seqs[i].grammar.consume(chosen[i])
    if not asked:
        return chosen, None
    out: list[TokenLogprob | None] = [None] * len(seqs)
    for i in asked:
        out[i] = token_logprob(log_probs[i], chosen[i], seqs[i].params.logprobs)
    return chosen, out


def token_logprob(log_probs: np.ndarray, token: int, k: int) -> TokenLogprob:
    """A row's log-probabilities -> the chosen token's and the k most likely (best first)."""
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = np.argpartition(-log_probs, k - 1)[:k] if k < len(log_probs) else np.arange(len(log_probs))
        ids = ids[np.argsort(-log_probs[ids], kind="stable")]
        top = tuple((int(t), float(log_probs[t])) for t in ids)
    return TokenLogprob(token, float(log_probs[token]), top)


def prompt_logprobs(logits: np.ndarray, following: Seq[int], k: int) -> list[TokenLogprob]:
    """Each prompt position's logits [n, vocab] -> the log-probability of the prompt token that
    follows it (`following[j]`), from the model's own distribution (no processors: nothing was
    drawn)."""
    log_probs = log_softmax(logits[: len(following)].astype(np.float64))
    return [token_logprob(row, int(t), k) for row, t in zip(log_probs, following)]


# -- processors, in the order they run ----------------------------------------------------


def ban_early_eos(logits: np.ndarray, seqs: Seq[Sequence], offsets: Seq[int]) -> None:
    """End-of-sequence ids to -inf in the rows whose token would come before `min_tokens` (not
    in a constrained row: its grammar says where the output may end)."""
    for i, (seq, offset) in enumerate(zip(seqs, offsets)):
        if seq.min_tokens > len(seq.generated) + offset and seq.eos_token_ids and seq.grammar is None:
            logits[i, list(seq.eos_token_ids)] = -np.inf


def logit_bias(logits: np.ndarray, seqs: Seq[Sequence]) -> None:
    for i, seq in enumerate(seqs):
        if seq.params.logit_bias:
            ids, bias = zip(*seq.params.logit_bias)
            logits[i, list(ids)] += np.asarray(bias, logits.dtype)


def penalize(logits: np.ndarray, seqs: Seq[Sequence]) -> None:
    """Repetition, frequency and presence penalties, for all the rows that have them at once."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not rows:
        return
    vocab = logits.shape[1]
    params = [seqs[i].params for i in rows]
    repeat = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeat:
        seen = np.zeros((len(repeat), vocab), bool)
        for j, r in enumerate(repeat):
            seq = seqs[rows[r]]
            seen[j, seq.prompt] = True
            seen[j, seq.generated] = True
        at = [rows[r] for r in repeat]
        x = logits[at]
        penalty = np.array([params[r].repetition_penalty for r in repeat], logits.dtype)[:, None]
        logits[at] = np.where(seen, np.where(x > 0, x / penalty, x * penalty), x)
    counted = [j for j, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if counted:
        counts = np.zeros((len(counted), vocab), np.float32)
        for j, c in enumerate(counted):
            generated = seqs[rows[c]].generated
            if generated:
                np.add.at(counts[j], generated, 1.0)
        frequency = np.array([params[c].frequency_penalty for c in counted], np.float32)[:, None]
        presence = np.array([params[c].presence_penalty for c in counted], np.float32)[:, None]
        logits[[rows[c] for c in counted]] -= (counts * frequency + (counts > 0) * presence).astype(logits.dtype)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def temperature(logits: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    return logits.astype(np.float64) / np.array([p.temperature for p in params])[:, None]


def min_p(z: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    """Tokens whose probability is below min_p x the row's most likely one's -> -inf (in log
    space: z < max(z) + log(min_p))."""
    p = np.array([q.min_p for q in params])
    rows = np.flatnonzero(p > 0)
    if len(rows):
        part = z[rows]
        part[part < part.max(-1, keepdims=True) + np.log(p[rows])[:, None]] = -np.inf
        z[rows] = part
    return z


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
