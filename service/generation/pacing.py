"""How many prompt tokens a generation step may run beside the running rows.

A step runs its prompt chunks and then the batched decode, so every running stream waits for
the chunks: a long prompt joining in chunks of the whole token budget makes each of those steps
several decode steps long, and the streams' inter-token latency spikes while it joins. So while
rows are running, a step's prompt tokens are capped so that their predicted time is at most
`stall` times the decode step's, times the sequences waiting to be prefilled per running row
where there are more of them than rows (a burst of arrivals joins at once; one long prompt
beside many rows is held to one decode step):

    tokens  =  (stall x decode_s x max(1, waiting / running) - fixed_s) / per_token_s
               at least FLOOR, at most the budget

with the whole budget when no row is running (nothing waits: the joiner's time to first token
is all that counts). `decode_s` is an exponentially weighted mean of the decode runs' times;
the prompt runs' cost line (fixed + per_token x tokens, a step's prompt runs together, since a
cache may run several chunks in one) is the batcher's CostModel (batch_policy.py), fitted by
forgetting least squares, with a shorter memory here: a prompt's chunks cost more as its past
grows, and the line should follow. Until the line has seen two sizes, the mean cost per token
so far stands in for it; until a prompt run and a decode have been timed, nothing is capped.

FLOOR (16 tokens) keeps a prompt advancing when the decode is so fast that the formula gives
next to nothing (a run's fixed part can be most of a decode step's time): a 1,500-token prompt
still joins within ~94 steps, and 16 tokens cost a prompt run little more than its fixed part.
"""

from __future__ import annotations

from service.batch_policy import CostModel

FLOOR = 16  # prompt tokens a step runs at least, where it has them and the budget allows
LINE_DECAY = 0.9  # the prompt cost line's forgetting factor (~10 runs of memory)
DECODE_WEIGHT = 0.2  # the decode time mean's weight on each new run


class PrefillPacer:
    def __init__(self, stall: float) -> None:
        self.stall = stall  # 0: no cap
        self.costs = CostModel(LINE_DECAY)
        self.decode_s: float | None = None
        self._tokens = 0.0  # prompt tokens and seconds timed so far, decayed as the line's
        self._seconds = 0.0

    def prefill_ran(self, tokens: int, seconds: float) -> None:
        """A step's prompt runs took `seconds` for `tokens` tokens in all."""
        self.costs.observe(tokens, seconds)
        self._tokens = LINE_DECAY * self._tokens + tokens
        self._seconds = LINE_DECAY * self._seconds + seconds

    def decode_ran(self, seconds: float) -> None:
        d = self.decode_s
        self.decode_s = seconds if d is None else d + DECODE_WEIGHT * (seconds - d)

    @property
    def _line(self) -> bool:
        return self.costs.known and self.costs.per_token_s > 0

    def predict(self, tokens: int) -> float | None:
        """Seconds a step's prompt runs of `tokens` tokens are expected to take (None: not known yet)."""
        if self._line:
            return self.costs.estimate(tokens)
        return tokens * self._seconds / self._tokens if self._seconds > 0 else None

    def budget(self, budget: int, running: int, waiting: int = 1) -> int:
        """The prompt tokens this step may run, out of `budget`, beside `running` rows, with
        `waiting` sequences to prefill. The stall is shared out: a step may hold the running
        rows up by one decode step (x stall) for each waiting sequence per running row, so a
        burst of prompts arriving a few milliseconds apart joins in a step or two (rather than
        one a step, the first rows decoding alone meanwhile: 78 decode runs of 13 rows, not 64
        of 16, for 16 SmolLM-shaped streams, by hand), while one prompt joining many rows
        holds each of them up by one decode step's time at most."""
        if not running or self.stall <= 0 or self.decode_s is None or self.predict(1) is None:
            return budget
        allowed = self.stall * self.decode_s * max(1.0, waiting / running)
        if self._line:
            tokens = (allowed - self.costs.fixed_s) / self.costs.per_token_s
        else:
            tokens = allowed * self._tokens / self._seconds
        return min(budget, max(FLOOR, int(tokens + 1e-6)))  # not 39 for 39.99999 (float rounding)
