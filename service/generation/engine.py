"""The generation engine: continuous (iteration-level) batching, one engine for every model kind.

One engine per generating model version (a decoder or an encoder-decoder), stepping in its own
thread: ONNX Runtime runs there
directly (it releases the GIL), with no hand-off to a worker and back per step, and the event
loop is never blocked. The loop thread submits and cancels; after each step the engine posts
the step's events and stats to the loop in one call. Each step is

    schedule  end sequences that were cancelled or passed their deadline; admit waiting
              requests while there is room, each starting from the longest kept prefix of its
              prompt where the cache keeps them (generation/prefix_cache.py); give joiners
              prompt chunks within the token budget, and while rows are running within what
              the measured costs predict to take at most `prefill_stall` decode steps
              (generation/pacing.py) (a whole source where the cache cannot chunk it: an
              encoder reads it at once)
    execute   run the prompt chunks, and one batched decode for every running row (a greedy
              sequence running alone may run a prompt-lookup draft with its next token where
              the cache can verify one: generation/speculation.py, off unless
              speculative_tokens is set)
    update    choose tokens (generation/sampling.py: the one token path), stream them, finish
              on eos / stop / length; move prefilled joiners into the running batch; compact it

and returns a StepStats, which the model's observer turns into metrics. The running batch's
cache runs the graphs and implements one interface (generation/cache.py): KVRows (left-padded
numpy rows), KVSlots (a shared buffer, IO binding) or Seq2SeqCache (encoder-decoders); the
engine never asks which. Per-sequence text and finish rules are in generation/sequence.py.

A failure stays with the request that caused it: a failed prompt run ends that sequence with
its error; only a failed batched decode, which cannot be attributed, ends the running rows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, InternalError, InvalidInput, QueueFull, TServeError, Unavailable
from service.generation.cache import KVCache
from service.generation.pacing import PrefillPacer
from service.generation.sampling import TokenLogprob, choose_tokens, prompt_logprobs
from service.generation.sequence import FinishReason, Sequence
from service.generation.speculation import PromptLookup, accepted
from service.stats import StepStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_sequences: int = 32  # sequences in prefill or decoding at once
    max_queue: int = 256  # requests waiting for a slot (QueueFull beyond)
    token_budget: int = 512  # tokens per step: one per running row, the rest for prompt chunks
    # source tokens per step where an encoder reads the prompts (an encoder-decoder): whole
    # sources, at least one a step; the encoder is another graph than the decoder the token
    # budget bounds (vLLM's max_num_encoder_input_tokens)
    encoder_token_budget: int = 2048
    # "static": the textbook baseline, kept for benchmarks: a batch admits nobody until all
    # its members are done, and finished members keep computing until the longest ends.
    scheduling: str = "continuous"
    # prompt-lookup speculative decoding (generation/speculation.py): draft tokens checked per
    # run, for a greedy sequence running alone on a shared-buffer graph; 0: off
    speculative_tokens: int = 0
    prompt_lookup_max: int = 3
    # a running sequence's tokens are handed to its reader this many at a time (its first token
    # and its end at once): fewer stream messages, each costing the event loop and the client
    stream_interval: int = 1
    # automatic prefix caching (generation/prefix_cache.py): bytes of prompt blocks' keys and
    # values a decoder's cache keeps for later prompts that start with the same tokens; 0: off.
    # The cache factory hands it to the caches it applies to.
    prefix_cache_bytes: int = 512 << 20
    # while rows are running, a step's prompt chunks are held to what the measured costs predict
    # takes this many decode steps' time, at least 16 tokens (generation/pacing.py); 0: no cap
    prefill_stall: float = 1.0


@dataclass
class Plan:
    """What a step runs: prompt chunks (sequence, tokens) and whether to decode the batch."""

    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: bool = False
    draft: list[int] | None = None  # speculative tokens after the one running row's next token


@dataclass
class Results:
    prefill: list[np.ndarray | TServeError] = field(default_factory=list)  # logits [n, vocab] a chunk
    decode: np.ndarray | TServeError | None = None  # last logits [rows, vocab]; with a draft [1 + draft, vocab]
    draft: list[int] | None = None  # the draft the decode verified
    decode_failed: dict[int, TServeError] = field(default_factory=dict)  # row -> why, after a re-run apart


CacheFactory = Callable[[EngineLimits], KVCache]  # a model's cache, sized and scheduled by the limits


class GenerationEngine:
    def __init__(
        self,
        name: str,
        make_cache: CacheFactory,
        limits: EngineLimits = EngineLimits(),
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.static = limits.scheduling == "static"
        self.speculative_tokens = limits.speculative_tokens  # 0 once a run with a draft failed
        self.on_step = on_step
        self.waiting: deque[Sequence] = deque()  # shared with the loop thread: under _lock
        self.prefilling: list[Sequence] = []  # the rest is the engine thread's own
        self._make_cache = make_cache
        self.rows: KVCache = make_cache(limits)  # the running batch's cache; it runs the graphs
        self.pacer = PrefillPacer(limits.prefill_stall)  # the measured costs of prompt runs and decodes
        self._evictions = 0  # the prefix cache's evictions already reported
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._touched: dict[int, Sequence] = {}  # sequences with events this step (engine thread)
        self._posted: list[tuple[list, StepStats]] = []  # steps not yet delivered to the loop (under _lock)
        self._wake_scheduled = False  # a call of _deliver_posted is on its way to the loop (under _lock)

    # -- API for the data plane -------------------------------------------------------------

    def start(self) -> None:
        """Start stepping (call on the event loop the readers run on)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"generation:{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join)
        self._deliver_posted()  # the last steps' tokens first, in order
        now, stats = time.monotonic(), StepStats()
        error = Unavailable(f"model {self.name!r} was unloaded before the sequence finished; retry")
        for seq in [*self.waiting, *self.prefilling, *self.rows.seqs]:
            if seq.finish(FinishReason.ERROR, now, error=error):
                stats.finished.append(FinishReason.ERROR.value)
            self._deliver([(seq, seq.outbox)], None)
            seq.outbox = []
        for seq in self.prefilling:
            self.rows.release(seq)
        self.waiting.clear()
        self.prefilling.clear()
        self.rows.clear()
        self._deliver([], stats)  # the gauges go to zero

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (with its siblings, n > 1: the group is admitted whole)."""
        if len(seq.group) > self.limits.max_sequences:
            raise InvalidInput(
                f"n is {len(seq.group)}; model {self.name!r} generates at most {self.limits.max_sequences} "
                "sequences at once (--generation-max-sequences)"
            )
        with self._lock:
            if len(self.waiting) >= self.limits.max_queue:
                raise QueueFull(
                    f"model {self.name!r} has {len(self.waiting)} generation requests queued "
                    f"(max {self.limits.max_queue})"
                )
            self.waiting.append(seq)
        self._wakeup.set()

    def run_here(self, seqs: list[Sequence]) -> None:
        """Run these sequences to their ends on the calling thread, for an engine that was never
        started (the load-time checks and warm-up run the real step this way); their events stay
        in each sequence's outbox. A failure of the engine itself is raised."""
        for seq in seqs:
            self.submit(seq)
        while not self.idle:
            self.step()
        self._touched.clear()

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence and its siblings; the engine frees them within one step."""
        for s in seq.group:
            if not s.finished:
                s.cancelled = True
                self._wakeup.set()

    @property
    def active(self) -> int:
        return self.rows.live + len(self.prefilling)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or len(self.rows))

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wakeup.clear()
            if self._stopping:
                return
            if self.idle:
                self._wakeup.wait()
                continue
            try:
                stats = self.step()
            except Exception as e:  # a bug in the engine itself: end what runs, keep serving
                log.exception("generation step failed for %s; ending its active sequences", self.name)
                stats = self._recover(InternalError(f"generation step failed: {type(e).__name__}"))
            self._gauges(stats)
            self._post(stats)

    def _recover(self, error: TServeError) -> StepStats:
        """After a failed step: end every sequence the step held with `error`. If the cache cannot
        be cleared either (a failure in the middle of its own bookkeeping), it is replaced by a
        new one, so the engine never stops serving the queue."""
        now, stats = time.monotonic(), StepStats()
        held = [*self.prefilling, *(s for s in self.rows.seqs if s is not None)]
        try:
            for seq in self.prefilling:
                self.rows.release(seq)
            self.rows.clear()
        except Exception:
            log.exception("the generation cache of %s could not be cleared; starting a new one", self.name)
            self.rows = self._make_cache(self.limits)
            self._evictions = 0
        self.prefilling.clear()
        for seq in held:
            self._end(seq, FinishReason.ERROR, now, stats, error=error)
        return stats

    def _post(self, stats: StepStats) -> None:
        """Hand the step's events and stats to the event loop. One wake-up carries every step
        posted since the loop last ran: a loop that falls behind the steps is woken less. A step
        with nothing for a reader (tokens held for the stream interval, a prompt chunk) wakes
        nobody: its stats go with the next step that has events, or when the engine goes idle,
        so the loop is not woken beside ONNX Runtime's threads for metrics alone."""
        batch, held, interval = [], {}, self.limits.stream_interval
        for key, seq in self._touched.items():
            if not seq.outbox:
                continue
            if seq.finished or len(seq.outbox) >= interval or len(seq.outbox) == len(seq.generated):
                batch.append((seq, seq.outbox))
                seq.outbox = []
            else:
                held[key] = seq  # more tokens to come: posted with them
        self._touched = held
        with self._lock:
            self._posted.append((batch, stats))
            if self._wake_scheduled or not (batch or self.idle):  # on its way / nothing to read yet
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver_posted)
        except RuntimeError:  # the loop has closed: nobody is reading any more
            pass

    def _deliver_posted(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
            self._wake_scheduled = False
        for batch, stats in posted:
            self._deliver(batch, stats)

    def _deliver(self, batch: list[tuple[Sequence, list]], stats: StepStats | None) -> None:
        """On the event loop's thread: events to their readers, stats to the observer."""
        for seq, events in batch:
            for event in events:
                seq.events.put_nowait(event)
        if stats is not None and self.on_step is not None:
            self.on_step(stats)

    def step(self) -> StepStats:
        stats = StepStats()
        plan = self._schedule(stats)
        results = self._execute(plan)
        self._update(plan, results, stats)
        return stats

    def _gauges(self, stats: StepStats) -> None:
        stats.active = self.active
        stats.queued = len(self.waiting)
        stats.kv_cache_bytes = self.rows.nbytes
        prefix = self.rows.prefix_cache
        if prefix is not None:
            stats.prefix_cache_bytes = prefix.nbytes
            stats.prefix_evictions, self._evictions = prefix.evictions - self._evictions, prefix.evictions

    # -- schedule ---------------------------------------------------------------------------

    def _schedule(self, stats: StepStats) -> Plan:
        now = time.monotonic()
        with self._lock:
            expired = [s for s in self.waiting if s.expired(now)]
            for seq in expired:
                self.waiting.remove(seq)
        expired = [s for seq in expired for s in seq.group]  # a group waits whole
        expired += [s for s in self.prefilling if s.expired(now)]
        for seq in expired:
            if seq in self.prefilling:
                for orphan in self._leave_prefill(seq):  # its siblings end with it
                    orphan.cancelled = orphan.cancelled or seq.cancelled
                    self._expire(orphan, now, stats)
            self._expire(seq, now, stats)
        for row, seq in enumerate(self.rows.seqs):
            if not seq.finished and seq.expired(now):
                self._expire(seq, now, stats)
                self.rows.finish(row)
        self.rows.compact()
        if not (self.static and len(self.rows)):
            with self._lock:
                while self.waiting and self.active + len(self.waiting[0].group) <= self.limits.max_sequences:
                    for seq in self.waiting.popleft().group:  # siblings are admitted with it, and counted
                        seq.admitted = now
                        self.prefilling.append(seq)
        plan = Plan(decode=len(self.rows) > 0, draft=self._draft())
        if self.rows.chunked_prefill:  # prompt chunks share the decoder's budget with the running rows
            budget = self.limits.token_budget - self.rows.live - len(plan.draft or ())  # holes cost compute, not budget
            waiting = sum(s.prefill_from is None for s in self.prefilling)
            budget = self.pacer.budget(budget, running=self.rows.live, waiting=waiting)
        else:
            budget = self.limits.encoder_token_budget
        for seq in self.prefilling:
            if seq.prefill_from is not None:  # a sibling: its cache is copied from its group's prefill
                continue
            if budget <= 0:
                break
            if not seq.prefix_looked_up:  # at its first chunk, not at admission: a prompt admitted
                self._restore(seq, stats)  # beside another with its prefix then finds that one's blocks
            n = len(seq.prompt) - seq.prefilled
            if self.rows.chunked_prefill:
                n = min(n, max(1, budget))
            plan.prefill.append((seq, n))
            budget -= n
        return plan

    def _restore(self, seq: Sequence, stats: StepStats) -> None:
        """Start a sequence's prefill, at its first prompt chunk, after the kept prefix of its
        prompt, where the cache keeps prefixes (blocks are kept as each chunk is computed); not
        for a sibling (it copies its group's prefill), nor for one that wants each prompt
        token's log-probability (that takes every position's logits)."""
        seq.prefix_looked_up = True
        if self.rows.prefix_cache is None or seq.prefill_from is not None or seq.prompt_logprobs is not None:
            return
        seq.prefilled = self.rows.restore(seq)
        stats.prefix_queried_tokens += len(seq.prompt)
        stats.prefix_cached_tokens += seq.prefilled

    def _draft(self) -> list[int] | None:
        """A prompt-lookup draft for the running row, when one greedy sequence runs alone and
        the cache can verify a draft (a shared buffer's graph checks several tokens over a cache
        only at batch one)."""
        rows, k = self.rows, self.speculative_tokens
        room = rows.max_draft() if k and not self.static else 0
        if room <= 0:
            return None
        seq = rows.seqs[0]
        if seq.finished or not seq.params.greedy or seq.params.penalized or seq.grammar is not None:
            return None
        if seq.lookup is None:
            seq.lookup = PromptLookup(self.limits.prompt_lookup_max, k)
        # the row's next token and the draft fit in the context and the step's token budget; the
        # sequence's last token is greedy's own
        k = min(seq.lookup.draft_len, seq.max_new_tokens - len(seq.generated) - 1, room, self.limits.token_budget - 1)
        if k <= 0:
            return None
        seq.lookup.sync(seq.prompt, seq.generated)
        return seq.lookup.draft(k) or None

    # -- execute ----------------------------------------------------------------------------

    def _execute(self, plan: Plan) -> Results:
        results = Results()
        if plan.prefill:
            started = time.perf_counter()
            results.prefill = self.rows.prefill(plan.prefill)
            if not any(isinstance(out, TServeError) for out in results.prefill):  # a failure's time says little
                self.pacer.prefill_ran(sum(n for _, n in plan.prefill), time.perf_counter() - started)
        if plan.decode:
            try:
                if plan.draft:
                    results.decode, results.draft = self.rows.verify(plan.draft), plan.draft
                else:
                    started = time.perf_counter()
                    results.decode = self.rows.decode()
                    self.pacer.decode_ran(time.perf_counter() - started)
            except TServeError as e:
                # find the rows that made it fail: each live row runs alone
                log.warning("batched decode failed for %s (%s); running its rows apart", self.name, e.message)
                results.decode, results.decode_failed = self.rows.decode_apart()
                if plan.draft and not results.decode_failed:  # the row runs alone, not with a draft
                    log.warning(
                        "a run with a speculative draft failed for %s where one token ran: speculative "
                        "decoding is off for this model from now on",
                        self.name,
                    )
                    self.speculative_tokens = 0
                if results.decode is None:  # nothing ran alone either: every live row fails
                    results.decode = e
                    results.decode_failed = {
                        row: results.decode_failed.get(row, e)
                        for row, seq in enumerate(self.rows.seqs)
                        if not seq.finished
                    }
        return results

    # -- update -----------------------------------------------------------------------------

    def _update(self, plan: Plan, results: Results, stats: StepStats) -> None:
        now = time.monotonic()
        if plan.decode:
            stats.decode_rows = len(self.rows)
            for row, error in results.decode_failed.items():  # the culprits end alone, with why
                self._end(self.rows.seqs[row], FinishReason.ERROR, now, stats, error=error)
            if isinstance(results.decode, TServeError):
                self.rows.clear()
            else:
                if results.draft:
                    self._take_verified(results.decode, results.draft, now, stats)
                else:
                    self._take_decode(results.decode, now, stats)
                for row in results.decode_failed:
                    if row < len(self.rows):  # static batching may have cleared the rows
                        self.rows.finish(row)
        done = []  # prompts prefilled whole this step, with their last logits
        for (seq, n), out in zip(plan.prefill, results.prefill):
            if isinstance(out, TServeError):
                for s in self._leave_prefill(seq):
                    self._end(s, FinishReason.ERROR, now, stats, error=out)
                self._end(seq, FinishReason.ERROR, now, stats, error=out)
                continue
            if seq.prompt_logprobs is not None:  # echo: each prompt token's log-probability
                following = seq.prompt[seq.prefilled + 1 : seq.prefilled + n + 1]
                seq.prompt_records.extend(prompt_logprobs(out, following, seq.prompt_logprobs))
            seq.prefilled += n
            stats.prefill_tokens += n
            if seq.prefilled == len(seq.prompt):
                done.append((seq, out[-1]))
                for sibling in seq.siblings:  # n > 1: the prompt ran once; each choice gets a copy
                    if sibling in self.prefilling and not sibling.finished:
                        self.rows.fork(seq, sibling)
                        sibling.prefilled, sibling.prompt_records = seq.prefilled, list(seq.prompt_records)
                        done.append((sibling, out[-1]))
        starting = [(seq, logits) for seq, logits in done if not seq.finished]  # not cancelled meanwhile
        if starting:
            firsts, logprobs = choose_tokens(np.stack([logits for _, logits in starting]), [seq for seq, _ in starting])
            for i, ((seq, _), token) in enumerate(zip(starting, firsts)):
                if not self._emit(seq, token, now, stats, logprobs and logprobs[i]):
                    self.rows.join(seq, token)
        for seq, _ in done:
            # only now: until it is in the rows or finished, a failure handler must find it here
            self.prefilling.remove(seq)
            if seq.finished:
                self.rows.release(seq)
        self.rows.compact()

    def _leave_prefill(self, seq: Sequence) -> list[Sequence]:
        """A sequence that ends before its prefill completed leaves `prefilling`; siblings
        waiting for its prefill leave with it (returned, for the caller to end)."""
        self.prefilling.remove(seq)
        self.rows.release(seq)
        orphans = [s for s in seq.siblings if s in self.prefilling]
        for s in orphans:
            self.prefilling.remove(s)
        return orphans

    def _take_decode(self, logits: np.ndarray, now: float, stats: StepStats) -> None:
        rows = self.rows
        running = [(row, seq) for row, seq in enumerate(rows.seqs) if not seq.finished]
        if len(running) < len(rows):
            logits = logits[[row for row, _ in running]]
        tokens, logprobs = choose_tokens(logits, [seq for _, seq in running])
        for i, ((row, seq), token) in enumerate(zip(running, tokens)):
            rows.feed(row, token)
            if self._emit(seq, token, now, stats, logprobs and logprobs[i]) and not self.static:
                rows.finish(row)  # static batching keeps computing it, as static batching does
        if self.static and rows.live == 0:
            rows.clear()

    def _take_verified(self, logits: np.ndarray, draft: list[int], now: float, stats: StepStats) -> None:
        """The one row's verified draft: greedy's tokens, as many as the draft got right plus one
        (row j of the logits chooses the token j after the row's next one)."""
        rows, seq = self.rows, self.rows.seqs[0]
        chosen, logprobs = choose_tokens(logits, [seq] * len(logits), range(len(logits)))
        tokens = accepted(chosen, draft)
        seq.lookup.update(len(draft), len(tokens) - 1)
        stats.draft_tokens += len(draft)
        for i, token in enumerate(tokens):
            rows.feed(0, token)
            if i < len(tokens) - 1:
                stats.accepted_tokens += 1  # a draft token kept (and streamed: counted as it goes)
            if self._emit(seq, token, now, stats, logprobs and logprobs[i]):
                rows.finish(0)
                return
        rows.accept(0, len(tokens) - 1)  # the kept draft tokens' columns; the last token feeds next

    def _emit(
        self, seq: Sequence, token: int, now: float, stats: StepStats, logprob: TokenLogprob | None = None
    ) -> bool:
        """Hand a token (and its log-probability, if asked for) to its sequence; True if that ended it."""
        if seq.generated:
            stats.inter_token_s.append(now - seq.last_token_at)
        else:
            stats.time_to_first_token_s.append(now - seq.arrived)
        stats.tokens += 1
        self._touched[id(seq)] = seq
        reason = seq.append(token, now, logprob)
        if reason is not None:
            stats.finished.append(reason.value)
        return reason is not None

    def _expire(self, seq: Sequence, now: float, stats: StepStats) -> None:
        """End a sequence its caller cancelled, or whose deadline passed."""
        if seq.cancelled:
            self._end(seq, FinishReason.CANCELLED, now, stats)
        else:
            error = DeadlineExceeded(
                f"the deadline passed after {now - seq.arrived:.3f}s, "
                f"with {len(seq.generated)} of {seq.max_new_tokens} tokens generated"
            )
            self._end(seq, FinishReason.DEADLINE, now, stats, error=error)

    def _end(
        self, seq: Sequence, reason: FinishReason, now: float, stats: StepStats, error: TServeError | None = None
    ) -> None:
        if seq.finish(reason, now, error=error):
            stats.finished.append(reason.value)
        self._touched[id(seq)] = seq
