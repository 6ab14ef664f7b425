import numpy as np

from model.ngram import NGramModel
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def test_probabilities_normalise_over_the_vocabulary():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 5, 2000)
    ngram = NGramModel(order=3, vocab_size=6).fit(train)
    context = [1, 2]
    probs = [np.exp(-ngram.nll(np.array(context + [w]))[-1]) for w in range(6)]
    assert abs(sum(probs) - 1) < 1e-9
    assert probs[5] > 0  # an unseen token keeps some mass


def test_learns_a_repeating_pattern():
    train = np.tile(np.arange(10), 500)
    ngram = NGramModel(order=3, vocab_size=257).fit(train)
    nll = ngram.nll(np.tile(np.arange(10), 5))
    assert nll[5:].mean() < 0.05  # nearly certain once two tokens of context exist
