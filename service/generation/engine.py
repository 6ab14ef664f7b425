"""The generation engine: continuous (iteration-level) batching on a decoder-with-past graph.

One engine per decoder model version. Each step reads like its description:

    reap      drop sequences that finished, were cancelled or passed their deadline
    admit     move waiting requests into prefill while there is room
    prefill   run prompt chunks for joiners, within the step's token budget
    decode    one token for every running sequence, in one batched run
    emit      sample per sequence, stream the token, finish on eos / stop / length

Running sequences share one batched KV cache, left-padded to a common past length (the
attention mask hides the padding; position ids are per row). A step's `present` outputs are
the next step's `past` as they are. A sequence that finishes leaves a hole (its row is masked
out) and a joiner whose prompt fits is written into a hole in place, so joins and leaves cost
the size of one sequence's cache, not the batch's; the cache is compacted (rows gathered,
all-padding columns trimmed) only when holes or dead columns pile up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.errors import QueueFull
from service.generation.sampling import SamplingParams, sample
from service.generation.tokenizer import ByteTokenizer
from service.metrics import Metrics
from service.runtime import OrtRuntime
from service.types import ModelSpec

log = logging.getLogger(__name__)

LENGTH, STOP, EOS, CANCELLED = "length", "stop", "eos", "cancelled"


@dataclass
class Event:
    """One streamed message: a token (with the text it completed), and on the last one the finish."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    deadline: float | None = None  # time.monotonic()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    prefilled: int = 0  # prompt tokens whose keys/values are cached
    cache: list[np.ndarray] | None = None  # during prefill: this sequence's own past
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finish_reason: str | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)
        self.decoder = None


class GenerationEngine:
    def __init__(
        self,
        spec: ModelSpec,
        runtime: OrtRuntime,
        metrics: Metrics,
        tokenizer: ByteTokenizer | None,
        max_sequences: int = 32,
        max_queue: int = 256,
        token_budget: int = 256,
        scheduling: str = "continuous",
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.max_sequences = max_sequences
        self.max_queue = max_queue
        self.token_budget = token_budget
        # "static": the textbook baseline, kept for benchmarks: a batch admits nobody until all
        # its members are done, and finished members keep computing until the longest ends.
        self.static = scheduling == "static"
        manifest = spec.manifest or {}
        self.eos_token_id = (manifest.get("generation") or {}).get("eos_token_id", tokenizer.eos_token_id if tokenizer else None)
        self.max_context = spec.max_sequence_length or (manifest.get("generation") or {}).get("max_context") or 1024
        self.past_names = [t.name for t in spec.past_inputs]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = spec.input("position_ids") is not None
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        # the running batch: rows in `rows` order
        self.rows: list[Sequence] = []
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.positions = np.zeros(0, np.int64)
        self.next_ids = np.zeros(0, np.int64)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        labels = (spec.name, str(spec.version))
        self._labels = labels
        # label lookups take a lock and a dict probe: resolve the per-token series once
        self._ttft = metrics.gen_ttft.labels(*labels)
        self._itl = metrics.gen_itl.labels(*labels)
        self._tokens = metrics.gen_tokens.labels(*labels)

    # -- API for the servicer -------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"generation:{self.spec.name}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for seq in [*self.waiting, *self.prefilling, *self.rows]:
            self._finish(seq, CANCELLED)
        self.waiting.clear()
        self.prefilling.clear()
        self._set_rows([])

    def submit(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"model {self.spec.name!r} has {len(self.waiting)} generation requests queued "
                            f"(max {self.max_queue})")
        seq.decoder = self.tokenizer.decoder() if self.tokenizer else None
        self.waiting.append(seq)
        self._gauges()
        self._wakeup.set()

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence; the engine frees it within one step."""
        if seq.finish_reason is None:
            seq.cancelled = True
            self._wakeup.set()

    @property
    def active(self) -> int:
        return sum(s.finish_reason is None for s in self.rows) + len(self.prefilling)

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not (self.waiting or self.prefilling or self.rows):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("generation step failed for %s; cancelling its sequences", self.spec.name)
                for seq in [*self.prefilling, *self.rows]:
                    self._finish(seq, CANCELLED)
                self.prefilling.clear()
                self._set_rows([])

    async def step(self) -> None:
        self._reap()
        self._admit()
        budget = self.token_budget - len(self.rows)
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            budget -= await self._prefill(seq, max(1, budget))
        if self.rows:
            await self._decode()
        self._gauges()

    def _expired(self, seq: Sequence, now: float) -> bool:
        return seq.cancelled or (seq.deadline is not None and now >= seq.deadline)

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self.waiting if self._expired(s, now)]:
            self.waiting.remove(seq)
            self._finish(seq, CANCELLED)
        for seq in [s for s in self.prefilling if self._expired(s, now)]:
            self.prefilling.remove(seq)
            self._finish(seq, CANCELLED)
        for i, seq in enumerate(self.rows):
            if seq.finish_reason is None and self._expired(seq, now):
                self._finish(seq, CANCELLED)
                self.mask[i] = 0  # a hole
        self._compact_if_sparse()

    def _admit(self) -> None:
        if self.static and self.rows:
            return
        while self.waiting and self.active < self.max_sequences:
            seq = self.waiting.popleft()
            seq.admitted = time.monotonic()
            self.prefilling.append(seq)

    # -- model runs -----------------------------------------------------------------------

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> dict:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.has_position_ids:
            feeds["position_ids"] = positions
        feeds.update(zip(self.past_names, past))
        return feeds

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, t.dims[0], 0, t.dims[2]), np.float32) for t in self.spec.past_inputs]

    async def _prefill(self, seq: Sequence, budget: int) -> int:
        """Run the next chunk of a joiner's prompt; returns the tokens it used."""
        start = seq.prefilled
        chunk = seq.prompt[start : start + budget]
        ids = np.array([chunk], np.int64)
        mask = np.ones((1, start + len(chunk)), np.int64)
        positions = np.arange(start, start + len(chunk), dtype=np.int64)[None]
        past = seq.cache if seq.cache is not None else self._empty_past(1)
        out = await self.runtime.run(self._feeds(ids, mask, positions, past), ["logits", *self.present_names])
        seq.cache = out[1:]
        seq.prefilled += len(chunk)
        if seq.prefilled == len(seq.prompt):
            self.prefilling.remove(seq)
            token = sample(out[0][0, -1], seq.params, seq.rng)
            if self._emit(seq, token) is None:
                self._join(seq, token)
            else:
                seq.cache = None
        return len(chunk)

    def _join(self, seq: Sequence, token: int) -> None:
        """Merge a prefilled sequence into the running batch, left-padding to a common past."""
        own = seq.cache
        seq.cache = None
        length = own[0].shape[2]
        if not self.rows:
            self.past, self.mask = own, np.ones((1, length), np.int64)
            self.positions = np.array([length], np.int64)
            self.next_ids = np.array([token], np.int64)
            self.rows = [seq]
            return
        current = self.mask.shape[1]
        hole = None if self.static else next((i for i, s in enumerate(self.rows) if s.finish_reason is not None), None)
        if hole is not None and length <= current:
            # in place: right-align this sequence's cache in the hole; the mask hides the rest
            for p, o in zip(self.past, own):
                p[hole, :, current - length :] = o[0]
            self.mask[hole] = 0
            self.mask[hole, current - length :] = 1
            self.positions[hole] = length
            self.next_ids[hole] = token
            self.rows[hole] = seq
            return
        target = max(current, length)

        def left_pad(a: np.ndarray, n: int, axis: int) -> np.ndarray:
            if n == 0:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (n, 0)
            return np.pad(a, widths)

        self.past = [np.concatenate([left_pad(p, target - current, 2), left_pad(o, target - length, 2)])
                     for p, o in zip(self.past, own)]
        self.mask = np.concatenate([left_pad(self.mask, target - current, 1),
                                    left_pad(np.ones((1, length), np.int64), target - length, 1)])
        self.positions = np.append(self.positions, length)
        self.next_ids = np.append(self.next_ids, token)
        self.rows.append(seq)

    async def _decode(self) -> None:
        B = len(self.rows)
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)
        out = await self.runtime.run(
            self._feeds(self.next_ids[:, None], mask, self.positions[:, None], self.past),
            ["logits", *self.present_names],
        )
        # ONNX Runtime's outputs are fresh arrays this engine owns: joiners are written into them
        self.past, self.mask = [p if p.flags.writeable else p.copy() for p in out[1:]], mask
        self.positions = self.positions + 1
        logits = out[0][:, -1]
        for i, seq in enumerate(self.rows):
            if seq.finish_reason is not None:
                continue
            token = sample(logits[i], seq.params, seq.rng)
            self.next_ids[i] = token
            if self._emit(seq, token) is not None and not self.static:
                self.mask[i] = 0  # a hole; static batching keeps computing it, as static batching does
        if self.static:
            if all(s.finish_reason is not None for s in self.rows):
                self._set_rows([])
        else:
            self._compact_if_sparse()

    def _compact_if_sparse(self) -> None:
        """Gather the live rows once holes are half the batch or dead columns a quarter of it."""
        if not self.rows:
            return
        holes = sum(s.finish_reason is not None for s in self.rows)
        live_columns = self.mask.any(axis=0)
        dead = int(np.argmax(live_columns)) if live_columns.any() else self.mask.shape[1]
        if holes == len(self.rows) or (holes and 2 * holes >= len(self.rows)) or dead >= max(16, self.mask.shape[1] // 4):
            self._set_rows([s for s in self.rows if s.finish_reason is None])

    def _set_rows(self, keep: list[Sequence]) -> None:
        """Gather the rows still running and trim cache columns that are padding for all."""
        if not keep:
            self.rows, self.past = [], []
            self.mask = np.zeros((0, 0), np.int64)
            self.positions = self.next_ids = np.zeros(0, np.int64)
            return
        index = np.array([self.rows.index(s) for s in keep])
        mask = self.mask[index]
        first = int(np.argmax(mask.any(axis=0)))  # leading columns masked in every row
        self.mask = mask[:, first:]
        self.past = [np.ascontiguousarray(p[index, :, first:]) for p in self.past]
        self.positions = self.positions[index]
        self.next_ids = self.next_ids[index]
        self.rows = keep

    # -- tokens out -----------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int) -> str | None:
        """Record a token, stream it, and return the finish reason if the sequence ended."""
        now = time.monotonic()
        if not seq.generated:
            seq.first_token_at = now
            self._ttft.observe(now - seq.arrived)
        else:
            self._itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        self._tokens.inc()
        reason = None
        if self.eos_token_id is not None and token == self.eos_token_id:
            reason = EOS
        if seq.decoder is not None:
            seq.text += seq.decoder.push(token)
        if reason is None and seq.stop:
            for stop in seq.stop:
                at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
                if at != -1:
                    seq.text, reason = seq.text[:at], STOP
                    break
        if reason is None and (len(seq.generated) >= seq.max_new_tokens
                               or len(seq.prompt) + len(seq.generated) >= self.max_context):
            reason = LENGTH
        if reason is not None:
            if seq.decoder is not None and reason != STOP:
                seq.text += seq.decoder.flush()
            self._finish(seq, reason, last_token=token)
            return reason
        # hold back text that could be the start of a stop sequence
        hold = max((len(s) - 1 for s in seq.stop), default=0)
        safe = max(seq.emitted, len(seq.text) - hold)
        seq.events.put_nowait(Event(seq.text[seq.emitted : safe], [token]))
        seq.emitted = safe
        return None

    def _finish(self, seq: Sequence, reason: str, last_token: int | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        now = time.monotonic()
        seq.events.put_nowait(Event(
            text=seq.text[seq.emitted :],
            token_ids=[] if last_token is None else [last_token],
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            generated_tokens=len(seq.generated),
            queue_s=(seq.admitted or now) - seq.arrived,
            ttft_s=(seq.first_token_at - seq.arrived) if seq.first_token_at else 0.0,
            total_s=now - seq.arrived,
        ))
        seq.emitted = len(seq.text)
        self.metrics.gen_finished.labels(*self._labels, reason).inc()
        self.metrics.gen_prompt_tokens.labels(*self._labels).inc(seq.prefilled)

    def _gauges(self) -> None:
        m, labels = self.metrics, self._labels
        m.gen_active.labels(*labels).set(self.active)
        m.gen_queued.labels(*labels).set(len(self.waiting))
        cache = sum(p.nbytes for p in self.past) + sum(p.nbytes for s in self.prefilling for p in (s.cache or []))
        m.gen_kv_bytes.labels(*labels).set(cache)
