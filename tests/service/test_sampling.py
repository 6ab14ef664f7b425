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
    return np.array([choose_tokens(logits[None].copy(), [s])[0] for _ in range(n)])


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=257).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    batch = np.stack([logits, -logits])
    assert choose_tokens(batch, [seq(SamplingParams()), seq(SamplingParams())]) == [
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
        crowd.append(choose_tokens(batch, [others[0], s, others[1], others[2]])[1])
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
    got = choose_tokens(np.stack([logits] * 4), [s] * 4, range(4))
    assert got[:2] == [int(np.argsort(-logits)[1])] * 2 and got[2:] == [eos, eos]
