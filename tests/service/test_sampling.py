"""Sampling, in-process: greedy, seeded determinism, and the top-k / top-p bounds."""

from __future__ import annotations

import numpy as np
import pytest

from service.generation.sampling import SamplingParams, sample


def draws(logits: np.ndarray, params: SamplingParams, n: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(params.seed)
    return np.array([sample(logits, params, rng) for _ in range(n)])


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=257).astype(np.float32) * 3


def test_greedy_is_argmax(logits):
    assert sample(logits, SamplingParams(), np.random.default_rng()) == int(np.argmax(logits))


def test_the_same_seed_gives_the_same_tokens(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    assert (draws(logits, params, 200) == draws(logits, params, 200)).all()
    assert (draws(logits, params, 200) != draws(logits, SamplingParams(temperature=1.0, seed=8), 200)).any()


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
