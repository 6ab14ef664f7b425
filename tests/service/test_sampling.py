"""The one token path, in-process: greedy, seeded determinism, the top-k / top-p bounds, the
end-of-sequence ban, and rows of a batch that do not depend on each other."""

from __future__ import annotations

import numpy as np
import pytest

from service.generation.sampling import SamplingParams, choose_tokens
from service.generation.sequence import Sequence

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def seq(params: SamplingParams, **kw) -> Sequence:
    return Sequence("s", [1], params, 10, **kw)


def draws(logits: np.ndarray, params: SamplingParams, n: int = 2000) -> np.ndarray:
    """n tokens of one sequence, a row at a time."""
    s = seq(params)
    return np.array([choose_tokens(logits[None].copy(), [s])[0][0] for _ in range(n)])


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=257).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    batch = np.stack([logits, -logits])
    assert choose_tokens(batch, [seq(SamplingParams()), seq(SamplingParams())])[0] == [
        int(np.argmax(logits)),
        int(np.argmax(-logits)),
    ]


def test_the_same_seed_gives_the_same_tokens(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    assert (draws(logits, params, 200) == draws(logits, params, 200)).all()
    assert (draws(logits, params, 200) != draws(logits, SamplingParams(temperature=1.0, seed=8), 200)).any()


def test_a_rows_tokens_do_not_depend_on_the_other_rows(logits):
    """A seeded sequence sampled beside greedy and other sampled rows (other temperatures,
    top-k, top-p) draws what it draws alone."""
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=5)
    alone = draws(logits, params, 50)
    s = seq(params)
    others = [
        seq(SamplingParams()),
        seq(SamplingParams(temperature=1.5, seed=1)),
        seq(SamplingParams(temperature=0.5, top_p=0.3, seed=2)),
    ]
    rng = np.random.default_rng(9)
    crowd = []
    for _ in range(50):
        batch = np.stack(
            [
                rng.normal(size=257).astype(np.float32),
                logits,
                rng.normal(size=257).astype(np.float32),
                rng.normal(size=257).astype(np.float32),
            ]
        )
        crowd.append(choose_tokens(batch, [others[0], s, others[1], others[2]])[0][1])
    assert crowd == alone.tolist()


def test_top_k_never_leaves_the_k_most_likely(logits):
    got = set(draws(logits, SamplingParams(temperature=2.0, top_k=5, seed=1)).tolist())
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert got <= top5 and len(got) > 1  # sampled, and only inside the bound


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    got = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=2)).tolist())
    assert got == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    got = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.4, seed=2)).tolist())
    assert got == {0}


def test_temperature_follows_the_softmax():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    counts = np.bincount(draws(logits, SamplingParams(temperature=1.0, seed=3), 20000), minlength=3) / 20000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.02)
    sharp = np.bincount(draws(logits, SamplingParams(temperature=0.25, seed=3), 20000), minlength=3) / 20000
    assert sharp[0] > 0.95  # (0.7^4 normalised) = 0.9955


def test_eos_is_banned_for_the_tokens_before_min_tokens_only(logits):
    """Rows of one sequence at offsets 0..3 (a verified draft's positions): with 2 tokens
    generated and min_tokens 4, its eos id is banned at offsets 0 and 1, chosen at 2 and 3."""
    eos = int(np.argmax(logits))
    s = seq(SamplingParams(), min_tokens=4, eos_token_ids=frozenset({eos}))
    s.generated = [7, 8]
    got = choose_tokens(np.stack([logits] * 4), [s] * 4, range(4))[0]
    assert got[:2] == [int(np.argsort(-logits)[1])] * 2 and got[2:] == [eos, eos]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def test_logprobs_are_those_of_the_distribution_the_token_was_drawn_from(logits):
    """Greedy: log_softmax of the logits; sampled: of the logits over the temperature, before
    top_k cuts them; the k alternatives are the k most likely, best first; rows that do not ask
    get None."""
    greedy, hot, plain = (
        seq(SamplingParams(logprobs=3)),
        seq(SamplingParams(temperature=0.7, top_k=5, seed=3, logprobs=2)),
        seq(SamplingParams()),
    )
    tokens, records = choose_tokens(np.stack([logits] * 3), [greedy, hot, plain])
    assert records[2] is None
    want = log_softmax(logits)
    assert records[0].token == tokens[0] and records[0].logprob == pytest.approx(want.max(), abs=1e-9)
    assert [t for t, _ in records[0].top] == np.argsort(-want)[:3].tolist()
    np.testing.assert_allclose([lp for _, lp in records[0].top], np.sort(want)[::-1][:3], atol=1e-9)
    scaled = log_softmax(logits / 0.7)
    assert tokens[1] in np.argsort(-logits)[:5]  # drawn within the top 5
    assert records[1].logprob == pytest.approx(scaled[tokens[1]], abs=1e-6)
    assert [t for t, _ in records[1].top] == np.argsort(-scaled)[:2].tolist()
    assert choose_tokens(logits[None].copy(), [plain])[1] is None  # nobody asked: no work


def test_logit_bias_bans_and_forces_tokens(logits):
    best, weak = int(np.argmax(logits)), int(np.argmin(logits))
    banned = choose_tokens(logits[None].copy(), [seq(SamplingParams(logit_bias=((best, -100.0),)))])[0][0]
    forced = draws(logits, SamplingParams(temperature=1.0, seed=0, logit_bias=((weak, 100.0),)), 50)
    assert banned == int(np.argsort(-logits)[1]) and (forced == weak).all()


def test_frequency_and_presence_penalties_follow_openais_formula(logits):
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over generated tokens only."""
    s = seq(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logprobs=0))
    s.prompt = [3, 3, 3]  # the prompt does not count
    s.generated = [5, 5, 9]
    _, [record] = choose_tokens(logits[None].copy(), [s])
    want = logits.astype(np.float64).copy()
    want[5] -= 2 * 0.5 + 0.25
    want[9] -= 0.5 + 0.25
    assert record.logprob == pytest.approx(log_softmax(want)[record.token], abs=1e-5)
    assert record.token == int(np.argmax(want))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    """Hugging Face's rule, over prompt and output: a seen token with logit 2 falls to 1 (penalty
    2), one with logit -1 to -2; unseen tokens keep theirs."""
    logits = np.array([[2.0, 1.5, -1.0, -1.8]], np.float32)
    s = seq(SamplingParams(repetition_penalty=2.0, logprobs=0))
    s.prompt, s.generated = [0], [2]
    token, [record] = choose_tokens(logits.copy(), [s])
    assert token == [1]
    want = log_softmax(np.array([1.0, 1.5, -2.0, -1.8]))
    assert record.logprob == pytest.approx(want[1], abs=1e-6)


def test_min_p_keeps_only_tokens_near_the_most_likely():
    """Probabilities 0.5, 0.3, 0.15, 0.05 with min_p 0.5: only ids 0 and 1 (>= 0.25) are drawn."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    got = draws(logits, SamplingParams(temperature=1.0, min_p=0.5, seed=1), 400)
    assert set(got.tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, seed=1), 400).tolist()) == {0, 1, 2, 3}


def test_penalties_are_applied_per_row(logits):
    """A penalized row beside a plain one: each gets what it gets alone."""
    penalized = seq(SamplingParams(frequency_penalty=2.0, repetition_penalty=1.5))
    penalized.generated = [int(np.argmax(logits))] * 3
    alone = [choose_tokens(logits[None].copy(), [s])[0][0] for s in (penalized, seq(SamplingParams()))]
    together = choose_tokens(np.stack([logits, logits]), [penalized, seq(SamplingParams())])[0]
    assert together == alone and alone[0] != alone[1]
