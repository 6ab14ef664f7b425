"""One generation request inside the engine: its tokens, its text, and when it ends.

Everything that is per sequence and not per batch lives here: detokenizing a token at a time,
holding back text that could be the start of a stop sequence, the finish rules (eos, stop,
max_new_tokens, which requests.py keeps within the model's context) and the events streamed
to the caller.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import numpy as np

from service.errors import InternalError, TServeError
from service.generation.sampling import SamplingParams, TokenLogprob
from service.generation.grammar import Grammar
from service.generation.speculation import PromptLookup
from service.generation.tokenizer import StreamDecoder


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    # ended with an error, raised to the caller instead of a last message (Event.error):
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the sequence's own run failed


@dataclass
class Event:
    """One streamed message: a token (with the text it completed), and on the last one the finish."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: TServeError | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # the first event's, when asked for (echo)
    index: int = 0  # which of the request's choices (n > 1)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    min_tokens: int = 0  # no end-of-sequence token or stop sequence before this many tokens
    stop: tuple[str, ...] = ()
    deadline: float | None = None  # time.monotonic()
    eos_token_ids: frozenset[int] = frozenset()
    decoder: StreamDecoder | None = None  # text out; None: token ids only
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # read on the event loop
    outbox: list[Event] = field(default_factory=list)  # written by the engine, moved to `events` per step
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    prefilled: int = 0  # prompt tokens whose keys/values are cached (what each cache keeps is its own)
    prefix_looked_up: bool = False  # the prefix cache was asked for its prompt's kept prefix
    prompt_logprobs: int | None = None  # k: each prompt token's log-probability and the k most likely (echo)
    prompt_records: list[TokenLogprob] = field(default_factory=list)  # filled while prefilling
    grammar: Grammar | None = None  # structured output: the grammar its tokens stay in
    # n > 1: the request's other choices, submitted with this one (which prefills the prompt
    # once for all: each sibling's cache is a copy of this one's), sharing its events queue
    index: int = 0
    siblings: list[Sequence] = field(default_factory=list)
    prefill_from: Sequence | None = None  # a sibling's: the choice whose prefill it copies
    lookup: PromptLookup | None = None  # its n-gram index, once it drafts (speculative decoding)
    logits_seen: list[np.ndarray] | None = (
        None  # when a list: each token's logits, as the model gave them (load-time checks)
    )
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)
        self._logprob: TokenLogprob | None = None  # the token being appended's
        self._prompt_sent = False  # the prompt's log-probabilities ride on the first event
        if self.prompt_logprobs is not None and self.prompt and not self.prompt_records:
            self.prompt_records.append(TokenLogprob(self.prompt[0], None))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def group(self) -> list[Sequence]:
        """This sequence and its siblings: the choices of one request."""
        return [self, *self.siblings]

    def expired(self, now: float) -> bool:
        return self.cancelled or self.past_deadline(now)

    def past_deadline(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def append(self, token: int, now: float, logprob: TokenLogprob | None = None) -> FinishReason | None:
        """Record a token and stream it; on the sequence's last token, finish it and return why."""
        first = not self.generated
        self._logprob = logprob
        self.last_token_at = now
        if first:
            self.first_token_at = now
        self.generated.append(token)
        reason = FinishReason.EOS if token in self.eos_token_ids else None
        if self.decoder is not None:
            self.text += self.decoder.push(token)
        if self.grammar is not None and reason is None:
            if self.grammar.error:  # cannot happen with the mask applied; answered, never raised in the step
                self.generated.pop()
                self.finish(FinishReason.ERROR, now, error=InternalError(f"structured output: {self.grammar.error}"))
                return FinishReason.ERROR
            if self.grammar.finished:  # the output is complete: nothing but end-of-sequence could follow
                reason = FinishReason.EOS
        if reason is None and self.stop and len(self.generated) >= self.min_tokens:
            for stop in self.stop:
                at = self.text.find(stop, max(0, self.emitted - len(stop)))
                if at != -1:
                    self.text, reason = self.text[:at], FinishReason.STOP
                    break
        if reason is None and len(self.generated) >= self.max_new_tokens:  # within the context: checked on entry
            reason = FinishReason.LENGTH
        if reason is not None:
            if self.decoder is not None and reason != FinishReason.STOP:
                self.text += self.decoder.flush()
            self.finish(reason, now, last_token=token)
            return reason
        # hold back text that could be the start of a stop sequence
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = max(self.emitted, len(self.text) - hold)
        self.outbox.append(self._event(self.text[self.emitted : safe], token))
        self.emitted = safe
        return None

    def _event(self, text: str, token: int | None, **last) -> Event:
        """The event of a token (with its log-probability, and on the first the prompt's)."""
        logprob, self._logprob = self._logprob, None
        prompt, self._prompt_sent = (None if self._prompt_sent else self.prompt_records), True
        return Event(
            text,
            [] if token is None else [token],
            logprobs=[logprob] if logprob is not None and token is not None else [],
            prompt_logprobs=prompt if self.prompt_logprobs is not None else None,
            index=self.index,
            **last,
        )

    def finish(
        self, reason: FinishReason, now: float, last_token: int | None = None, error: TServeError | None = None
    ) -> bool:
        """End the sequence with its last event; False if it had already ended."""
        if self.finish_reason is not None:
            return False
        self.finish_reason = reason
        self.outbox.append(
            self._event(
                self.text[self.emitted :],
                last_token,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(self.prompt),
                generated_tokens=len(self.generated),
                queue_s=(self.admitted or now) - self.arrived,
                ttft_s=(self.first_token_at - self.arrived) if self.first_token_at else 0.0,
                total_s=now - self.arrived,
            )
        )
        self.emitted = len(self.text)
        return True
