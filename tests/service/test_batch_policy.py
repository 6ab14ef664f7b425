"""The batch policy, in-process: the cost line it learns and the wait-or-run decision."""

from __future__ import annotations

import pytest

from dataclasses import dataclass

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


@dataclass(eq=False)
class Req:
    length: int | None
    enqueued: float
    rows: int = 1
    deadline: float | None = None


def policy_with_costs(fixed: float, per_token: float, max_tokens: int | None = None) -> BatchPolicy:
    p = BatchPolicy(0.002, max_tokens=max_tokens)
    for tokens in (16, 4096, 256, 1024):
        p.costs.observe(tokens, fixed + per_token * tokens)
    return p


def test_a_batch_takes_similar_lengths_and_leaves_one_that_costs_more_padded_than_apart():
    """fixed 2 ms, 10 us a token: a 400-token sentence beside three of ~10 would pad them to 400
    (3 x 390 wasted tokens = 11.7 ms) to save one fixed part (2 ms): it runs apart."""
    p = policy_with_costs(0.002, 1e-5)
    queue = [Req(10, 0.0), Req(400, 0.1), Req(12, 0.2), Req(11, 0.3)]
    assert p.select(queue, max_rows=32, now=1.0) == [queue[0], queue[3], queue[2]]
    assert p.select(queue[1:2] + queue[2:], max_rows=32, now=1.0) == [queue[1]]  # the long one, alone
    # where the fixed part dominates, padding is worth it
    cheap_tokens = policy_with_costs(0.050, 1e-6)
    assert len(cheap_tokens.select(queue, max_rows=32, now=1.0)) == 4


def test_a_batch_stays_within_the_row_cap_and_the_token_budget():
    p = policy_with_costs(0.002, 1e-7, max_tokens=1000)
    queue = [Req(100, float(i)) for i in range(20)]
    assert len(p.select(queue, max_rows=32, now=100.0)) == 10  # 10 x 100 tokens
    assert len(p.select(queue, max_rows=4, now=100.0)) == 4
    # an input past the budget alone still runs: alone
    assert p.select([Req(5000, 0.0), *queue], max_rows=32, now=100.0)[0].length == 5000


def test_a_short_request_with_a_deadline_is_not_held_behind_a_long_run():
    """The oldest is long (no deadline; its run takes ~40 ms); a short one behind it must be
    answered within 20 ms: it runs first. With room for both, the oldest goes first."""
    p = policy_with_costs(0.002, 1e-5)
    long_one, short = Req(4000, 0.0), Req(10, 0.5, deadline=1.020)
    assert p.select([long_one, short], max_rows=1, now=1.0) == [short]
    relaxed = Req(10, 0.5, deadline=1.5)
    assert p.select([long_one, relaxed], max_rows=1, now=1.0) == [long_one]
    hopeless = Req(10, 0.5, deadline=1.001)  # cannot make it even now: no reason to jump the queue
    assert p.select([long_one, hopeless], max_rows=1, now=1.0) == [long_one]


def test_before_the_cost_line_is_known_the_closest_lengths_fill_the_batch():
    p = BatchPolicy(0.002)
    queue = [Req(10, 0.0), Req(400, 0.1), Req(12, 0.2)]
    assert p.select(queue, max_rows=2, now=1.0) == [queue[0], queue[2]]
    fixed = [Req(None, 0.0), Req(None, 0.1)]  # fixed shapes: no lengths, no padding
    assert p.select(fixed, max_rows=8, now=1.0) == fixed
