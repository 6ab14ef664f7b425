"""The batch policy, in-process: the cost line it learns and the wait-or-run decision."""

from __future__ import annotations

import pytest

from service.batch_policy import ArrivalRate, BatchPolicy, CostModel

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit


def test_the_cost_line_is_recovered_and_follows_drift():
    costs = CostModel()
    for tokens in (16, 512, 64, 256, 16, 512):
        costs.observe(tokens, 0.002 + 1e-5 * tokens)
    assert costs.fixed_s == pytest.approx(0.002) and costs.per_token_s == pytest.approx(1e-5)
    for _ in range(300):  # the model got slower per token: old observations fade
        for tokens in (16, 512):
            costs.observe(tokens, 0.002 + 3e-5 * tokens)
    assert costs.per_token_s == pytest.approx(3e-5, rel=0.01)


def test_one_size_alone_says_nothing_about_the_fixed_cost():
    costs = CostModel()
    costs.observe(16, 0.01)
    costs.observe(16, 0.01)
    assert not costs.known and costs.fixed_s == 0.0


def test_arrival_gap_is_a_moving_mean():
    rate = ArrivalRate(weight=0.5)
    for t in (0.0, 0.010, 0.020, 0.030):
        rate.arrived(t)
    assert rate.mean_gap_s == pytest.approx(0.010)
    rate.arrived(0.032)
    assert rate.mean_gap_s == pytest.approx(0.006)


def policy(
    gap: float | None, fixed: float, per_token: float = 1e-5, max_delay: float = 0.005, target: float | None = None
) -> BatchPolicy:
    p = BatchPolicy(max_delay, target)
    for tokens in (16, 512):
        p.costs.observe(tokens, fixed + per_token * tokens)
    if gap is not None:
        p.arrivals.arrived(0.0)
        p.arrivals.arrived(gap)
    return p


def test_waits_only_when_the_next_request_comes_sooner_than_a_runs_fixed_cost():
    busy = policy(gap=0.0005, fixed=0.002).decide(oldest_enqueued=10.0, rows=3, length=32, max_rows=16, now=10.0)
    assert busy.wait_s == pytest.approx(0.0005)
    lone = policy(gap=0.004, fixed=0.002).decide(10.0, 1, 32, 16, now=10.0)  # a single client's round trip
    assert lone.wait_s == 0
    assert policy(gap=None, fixed=0.002).decide(10.0, 1, 32, 16, now=10.0).wait_s == 0  # nothing seen yet


def test_waiting_is_bounded_by_the_queue_delay_the_target_and_a_full_batch():
    p = policy(gap=0.0005, fixed=0.002, max_delay=0.005)
    assert p.decide(10.0, 3, 32, 16, now=10.0049).wait_s == pytest.approx(0.0001)
    assert p.decide(10.0, 3, 32, 16, now=10.006).reason == "max_queue_delay"
    assert p.decide(10.0, 16, 32, 16, now=10.0).reason == "full"
    # a 3 ms latency target: 4 rows x 32 tokens run in about 2 ms + 1.3 ms, so no time is left to wait
    tight = policy(gap=0.0005, fixed=0.002, target=0.003)
    assert tight.decide(10.0, 3, 32, 16, now=10.0).reason == "latency_target"


def test_a_long_run_of_one_batch_size_keeps_the_last_fitted_line():
    """Thousands of equal-size batches leave no spread to fit from; the line must not collapse
    to 'all fixed' or 'unknown'."""
    costs = CostModel()
    costs.observe(16, 0.002 + 1e-5 * 16)
    costs.observe(512, 0.002 + 1e-5 * 512)
    for _ in range(5000):
        costs.observe(112, 0.002 + 1e-5 * 112)
    assert costs.known and costs.fixed_s == pytest.approx(0.002, rel=0.05)
    assert costs.per_token_s == pytest.approx(1e-5, rel=0.05)
