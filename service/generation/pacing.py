"""How many prompt tokens a generation step may run beside the running rows.

A step runs its prompt chunks and then the batched decode, so every running stream waits for
the chunks: a long prompt joining in chunks of the whole token budget makes each of those steps
several decode steps long, and the streams' inter-token latency spikes while it joins. So while
rows are running, a step's prompt tokens are capped so that their predicted time is at most
`stall` times the decode step's:

    tokens  =  (stall x decode_s - fixed_s) / per_token_s      at least FLOOR, at most the budget

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

    def budget(self, budget: int, running: bool) -> int:
        """The prompt tokens this step may run, out of `budget`, while rows are `running` or not."""
        if not running or self.stall <= 0 or self.decode_s is None or self.predict(1) is None:
            return budget
        allowed = self.stall * self.decode_s
        if self._line:
            tokens = (allowed - self.costs.fixed_s) / self.costs.per_token_s
        else:
            tokens = allowed * self._tokens / self._seconds
        return min(budget, max(FLOOR, int(tokens + 1e-6)))  # not 39 for 39.99999 (float rounding)
