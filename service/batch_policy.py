"""When to run a batch and when to wait for more: decided from measured costs, not a fixed delay.

A run of a batch costs about `fixed + per_token * tokens` (tokens = rows x padded length): the
fixed part is what every run pays whatever its size (kernel launches, thread hand-offs, the
framework around them). Merging one more request into a batch saves exactly one fixed part.
So when an instance is free and a batch is not full, the batcher waits for the next request
only if it is expected to arrive sooner than one fixed part:

    wait  iff  expected gap to the next arrival  <  fixed cost of a run

bounded by the model's max_queue_delay and, when the model sets one, by a latency target
(the oldest request's wait plus the batch's estimated run time must stay within it). A lone
client never waits (its next request cannot come before this one is answered, so the gap it
shows is a whole round trip), while a burst of arrivals is gathered into one run.

What to run is decided from the same line. The batch starts from the oldest request (or, when
one waiting behind it would miss its deadline only because the oldest's run comes first, from
that one: a long input never holds short ones past their deadline) and takes the requests
closest to it in length, each only while the batch stays within the row cap and the token
budget (rows x padded length) and costs no more than its rows run apart:

    merge q  iff  cost((rows + q.rows) x max(length, q.length))  <=  cost(rows x length) + cost(q.rows x q.length)

so a short sentence is not padded to a long one's length when running it apart is cheaper.

The cost line is fitted by exponentially weighted least squares: seeded at load from timed
warm-up runs at two batch sizes, then updated from every executed batch. The arrival gap is an
exponentially weighted mean of the gaps between submissions.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class CostModel:
    """seconds ~ fixed + per_token * tokens, by weighted least squares with forgetting."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._line = (0.0, 0.0)  # (fixed, per_token) from the last fit that had a spread of sizes

    def observe(self, tokens: float, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds
        variance = self._w * self._xx - self._x * self._x
        # a long run of one batch size leaves no spread to fit a slope from (the variance decays
        # into rounding noise): keep the last line that had one
        if variance > 1e-6 * self._w * self._xx:
            per_token = max(0.0, (self._w * self._xy - self._x * self._y) / variance)
            self._line = (max(0.0, (self._y - per_token * self._x) / self._w), per_token)
            self.known = True

    known = False  # True once two sizes have been seen

    @property
    def per_token_s(self) -> float:
        return self._line[1]

    @property
    def fixed_s(self) -> float:
        """The part of a run's cost that does not grow with its size (0 until two sizes were seen)."""
        return self._line[0]

    def estimate(self, tokens: float) -> float:
        return self.fixed_s + self.per_token_s * tokens


class ArrivalRate:
    """Exponentially weighted mean gap between arrivals."""

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        self.mean_gap_s: float | None = None
        self._last: float | None = None

    def arrived(self, now: float) -> None:
        if self._last is not None:
            gap = now - self._last
            self.mean_gap_s = (
                gap if self.mean_gap_s is None else self.mean_gap_s + self.weight * (gap - self.mean_gap_s)
            )
        self._last = now


@dataclass
class Decision:
    wait_s: float  # 0: run now
    reason: str


class Queued(Protocol):
    rows: int
    length: int | None  # tokens per row of a padded (sequence) input; None for fixed shapes
    enqueued: float
    deadline: float | None


Q = TypeVar("Q", bound=Queued)


class BatchPolicy:
    def __init__(
        self, max_delay_s: float, latency_target_s: float | None = None, max_tokens: int | None = None
    ) -> None:
        self.max_delay_s = max_delay_s
        self.latency_target_s = latency_target_s
        self.max_tokens = max_tokens  # rows x padded length of one batch, for sequence models
        self.costs = CostModel()
        self.arrivals = ArrivalRate()

    def _cost(self, rows: int, length: int | None) -> float:
        return self.costs.estimate(rows * (length or 1))

    def _anchor(self, queued: Sequence[Q], now: float) -> Q:
        oldest = queued[0]
        if not self.costs.known or len(queued) == 1:
            return oldest
        behind = self._cost(oldest.rows, oldest.length)
        urgent = [
            q
            for q in itertools.islice(queued, 1, None)
            if q.deadline is not None and now + self._cost(q.rows, q.length) <= q.deadline < now + behind
        ]
        return min(urgent, key=lambda q: q.deadline) if urgent else oldest

    def select(self, queued: Sequence[Q], max_rows: int, now: float | None = None) -> list[Q]:
        """The batch to run from one group's queue, oldest first: see the module's docstring."""
        now = time.monotonic() if now is None else now
        anchor = self._anchor(queued, now)
        batch, rows, longest = [anchor], anchor.rows, anchor.length
        if max_rows <= 1:
            return batch
        target = anchor.length or 0
        ranked = sorted(
            (q for q in queued if q is not anchor), key=lambda q: (abs((q.length or 0) - target), q.enqueued)
        )
        for q in ranked:
            if rows + q.rows > max_rows:
                continue
            if longest is not None and q.length is not None:
                padded = max(longest, q.length)
                if self.max_tokens and (rows + q.rows) * padded > self.max_tokens:
                    continue
                if self.costs.known and self._cost(rows + q.rows, padded) > self._cost(rows, longest) + self._cost(
                    q.rows, q.length
                ):
                    continue
                longest = padded
            batch.append(q)
            rows += q.rows
            if rows >= max_rows:
                break
        return batch

    def decide(
        self, oldest_enqueued: float, rows: int, length: int | None, max_rows: int, now: float | None = None
    ) -> Decision:
        """Whether a batch of `rows` (padded to `length`) whose oldest request arrived at
        `oldest_enqueued` should run now, or wait for how long for one more request."""
        now = time.monotonic() if now is None else now
        if rows >= max_rows:
            return Decision(0.0, "full")
        waited = now - oldest_enqueued
        room = self.max_delay_s - waited
        if room <= 0:
            return Decision(0.0, "max_queue_delay")
        gap = self.arrivals.mean_gap_s
        fixed = self.costs.fixed_s
        if gap is None or gap >= fixed:
            return Decision(0.0, "next arrival not expected within a run's fixed cost")
        if self.latency_target_s is not None:
            run_s = self.costs.estimate((rows + 1) * (length or 1))
            room = min(room, self.latency_target_s - waited - run_s)
            if room <= 0:
                return Decision(0.0, "latency_target")
        return Decision(min(room, gap), "next arrival expected soon")
