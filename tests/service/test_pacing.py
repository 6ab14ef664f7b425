"""The prefill pacer's rule, fed known timings (no clock): while rows run, a step's prompt
tokens are the most whose predicted time fits in `stall` decode steps, at least FLOOR, at most
the budget; with no rows running, or nothing timed yet, the whole budget."""

from __future__ import annotations

import pytest

from service.generation.pacing import FLOOR, PrefillPacer

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

FIXED, PER_TOKEN = 0.004, 0.0005  # a prompt run: 4 ms + 0.5 ms a token


def timed(stall: float = 1.0, decode_s: float | None = 0.024, sizes=(200, 50, 120)) -> PrefillPacer:
    pacer = PrefillPacer(stall)
    for tokens in sizes:
        pacer.prefill_ran(tokens, FIXED + PER_TOKEN * tokens)
    if decode_s is not None:
        pacer.decode_ran(decode_s)
    return pacer


def test_the_cap_is_the_most_tokens_predicted_within_a_decode_step():
    pacer = timed()
    cap = pacer.budget(256, running=True)
    assert cap == 40  # (24 ms - 4 ms) / 0.5 ms
    assert pacer.predict(cap) == pytest.approx(0.024) and pacer.predict(cap + 1) > 0.024
    assert timed(stall=2.0).budget(256, running=True) == 88  # (48 ms - 4 ms) / 0.5 ms


def test_no_cap_with_no_row_running_or_stall_zero_or_nothing_timed():
    assert timed().budget(256, running=False) == 256
    assert timed(stall=0).budget(256, running=True) == 256
    assert timed(decode_s=None).budget(256, running=True) == 256  # no decode timed yet
    assert timed(sizes=()).budget(256, running=True) == 256  # no prompt run timed yet


def test_the_floor_and_the_budget_bound_it():
    assert timed(decode_s=0.001).budget(256, running=True) == FLOOR  # under a run's fixed part
    assert timed(decode_s=0.001).budget(10, running=True) == 10  # never past the budget
    assert timed(decode_s=10.0).budget(256, running=True) == 256
    assert timed().budget(0, running=True) == 0  # no budget left: no prompt tokens


def test_before_two_sizes_are_seen_the_mean_cost_a_token_stands_in():
    pacer = timed(sizes=(100, 100))  # one size: no line yet
    assert not pacer.costs.known
    per_token = (FIXED + PER_TOKEN * 100) / 100
    assert pacer.budget(256, running=True) == int(0.024 / per_token) == 44


def test_the_decode_time_is_a_moving_mean_and_the_line_follows_new_costs():
    pacer = timed(decode_s=0.020)
    pacer.decode_ran(0.040)
    assert pacer.decode_s == pytest.approx(0.024)
    assert pacer.budget(256, running=True) == 40
    for _ in range(40):  # prompt runs got twice as expensive a token (a longer past)
        for tokens in (30, 60):
            pacer.prefill_ran(tokens, FIXED + 2 * PER_TOKEN * tokens)
    assert pacer.budget(256, running=True) == pytest.approx(20, abs=1)


def test_the_stall_is_shared_out_over_the_sequences_waiting_per_running_row():
    one = timed().budget(256, running=1)
    assert timed().budget(256, running=1, waiting=1) == one  # one joiner beside one row: the plain cap
    assert timed().budget(256, running=15, waiting=1) == one  # one joiner beside many rows: the same
    assert timed().budget(256, running=2, waiting=4) == timed(stall=2.0).budget(256, running=1)  # 2 per row
    assert timed().budget(4096, running=1, waiting=15) > 10 * one  # a burst behind one row joins at once
