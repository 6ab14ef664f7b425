"""The dynamic batcher: one per model version; it owns the queue and the time.

Requests wait in groups of batch-compatible shapes. A batch starts when an instance is free
and either enough rows are waiting for the largest preferred batch size, the oldest request
has waited max_queue_delay, or the batch policy (service/batch_policy.py) finds that the next
request is not expected soon enough to pay for waiting: it compares the expected gap to the
next arrival with the fixed cost of a run, both measured. The policy also picks the batch: the
oldest request (or one whose deadline it would otherwise miss) and, from the same group, the
requests closest to it in length within the row cap and token budget, each only if merging it
costs less than running it apart, so padding stays low; inputs the model declares
paddable are right-padded to the longest, outputs are cut back and split so every caller
gets exactly its own rows.

The queue is bounded (QueueFull at once beyond it), and so is the wait: a request whose
deadline would pass before its predicted start (the queued work on the measured cost line) is
refused at once. Requests whose deadline passed or whose caller went away are dropped before
compute, and a batch that fails is re-run one request
at a time so a failure stays with the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.batch_policy import BatchPolicy
from service.errors import DeadlineExceeded, InternalError, InvalidInput, QueueFull, TServeError
from service.metrics import ModelObserver
from service.runtime import OrtRuntime
from service.stats import BatchRun
from service.types import ModelSpec
from service.validation import Prepared

log = logging.getLogger(__name__)


@dataclass
class Timing:
    queue_s: float = 0.0
    compute_s: float = 0.0


@dataclass(eq=False)  # identity: deque.remove must not compare numpy payloads
class _Item:
    prepared: Prepared
    deadline: float | None  # time.monotonic() deadline
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.prepared.rows

    @property
    def length(self) -> int | None:
        return self.prepared.length

    @property
    def tokens(self) -> int:
        return self.prepared.rows * (self.prepared.length or 1)


class DynamicBatcher:
    def __init__(
        self, spec: ModelSpec, runtime: OrtRuntime, observer: ModelObserver, cost_seeds: list[tuple[float, float]] = ()
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.observer = observer
        policy = spec.batching
        self.max_rows = policy.max_batch_size if policy.enabled else 0  # 0: one request per run
        preferred = [p for p in policy.preferred_batch_sizes if p <= policy.max_batch_size]
        self.target_rows = max(preferred) if preferred else policy.max_batch_size
        self.max_queue = policy.max_queue_size
        self.policy = BatchPolicy(policy.max_queue_delay_s, policy.latency_target_s, policy.max_batch_tokens)
        for tokens, seconds in cost_seeds:  # timed at load: (rows x length, seconds) of whole runs
            self.policy.costs.observe(tokens, seconds)
        observer.queue_capacity(self.max_queue)
        self._groups: dict[tuple, deque[_Item]] = {}
        self._queued = 0
        self._queued_rows = self._queued_tokens = 0  # for the predicted wait
        self._in_flight = self._in_flight_tokens = 0  # batches running, and their padded tokens
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(runtime.instances)
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._schedule(), name=f"batcher:{self.spec.name}")

    async def close(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(InternalError("the model was unloaded before the request ran"))
        self._groups.clear()

    async def submit(self, prepared: Prepared, deadline: float | None) -> tuple[dict[str, np.ndarray], Timing]:
        if self._queued >= self.max_queue:
            self.observer.refused("queue_full")
            raise QueueFull(
                f"model {self.spec.name!r} has {self._queued} requests queued (max_queue_size {self.max_queue})"
            )
        self._admit_by_deadline(deadline)
        return await self._enqueue(prepared, deadline)

    def predicted_wait_s(self) -> float:
        """How long a request queued now waits before its run starts: the queued work (the cost
        line's fixed part per batch of target_rows, its per-token part per queued token) and the
        runs in progress, shared by the instances. 0 until the cost line is known."""
        costs = self.policy.costs
        if not costs.known or not (self._queued or self._in_flight):
            return 0.0
        if not self._queued and self._in_flight < self.runtime.instances:
            return 0.0  # an instance is free: the run starts at once
        batches = -(-self._queued_rows // max(1, self.target_rows or 1)) + self._in_flight
        work = batches * costs.fixed_s + (self._queued_tokens + self._in_flight_tokens) * costs.per_token_s
        return work / self.runtime.instances

    def _admit_by_deadline(self, deadline: float | None) -> None:
        """A request whose deadline passes before its run could start is refused now, at once,
        rather than queued to expire (RESOURCE_EXHAUSTED: the server is too busy for it)."""
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the queue")
        wait = self.predicted_wait_s()
        if wait > left:
            self.observer.refused("deadline")
            raise QueueFull(
                f"model {self.spec.name!r} is too busy for this request's deadline: predicted queue wait "
                f"{wait * 1e3:.0f} ms, {max(0.0, left) * 1e3:.0f} ms left"
            )

    async def submit_all(
        self, prepared: list[Prepared], deadline: float | None
    ) -> list[tuple[dict[str, np.ndarray], Timing]]:
        """The rows of one request (a task's inputs): queued together or not at all, and when
        one fails the others are withdrawn, so the request gets one answer and frees its places."""
        if len(prepared) > self.max_queue:
            raise InvalidInput(
                f"the request holds {len(prepared)} inputs; model {self.spec.name!r} queues at most "
                f"{self.max_queue} (max_queue_size): send them in smaller requests"
            )
        if self._queued + len(prepared) > self.max_queue:
            self.observer.refused("queue_full")
            raise QueueFull(
                f"model {self.spec.name!r} has {self._queued} requests queued; {len(prepared)} more inputs would pass "
                f"its max_queue_size {self.max_queue}"
            )
        self._admit_by_deadline(deadline)
        futures = [self._enqueue(p, deadline) for p in prepared]  # no await between the check and here
        try:
            return await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()  # a cancelled place is freed at once (_forget)
            raise

    def _enqueue(self, prepared: Prepared, deadline: float | None) -> asyncio.Future:
        item = _Item(prepared, deadline, asyncio.get_running_loop().create_future())
        self.policy.arrivals.arrived(item.enqueued)
        self._groups.setdefault(prepared.group, deque()).append(item)
        self._queued += 1
        self._queued_rows += item.rows
        self._queued_tokens += item.tokens
        self.observer.queue_depth(self._queued)
        item.future.add_done_callback(lambda f, it=item: self._forget(it) if f.cancelled() else None)
        self._wakeup.set()
        return item.future

    def _forget(self, item: _Item) -> None:
        """A cancelled caller frees its place in the queue at once."""
        group = self._groups.get(item.prepared.group)
        if group is not None and item in group:
            group.remove(item)
            self._queued -= 1
            self._queued_rows -= item.rows
            self._queued_tokens -= item.tokens
            if not group:
                del self._groups[item.prepared.group]
            self.observer.queue_depth(self._queued)

    # -- scheduling -------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            if not self._queued:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception:  # a bug here must not stop the model: log it, keep serving
                log.exception("batch formation failed for model %s", self.spec.name)
                self._slots.release()
                continue
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _oldest_group(self) -> tuple | None:
        if not self._groups:
            return None
        return min(self._groups, key=lambda g: self._groups[g][0].enqueued)

    async def _form_batch(self) -> list[_Item]:
        while True:
            key = self._oldest_group()
            if key is None:
                return []
            group = self._groups[key]
            if not self.max_rows:
                break
            rows = sum(it.prepared.rows for it in group)
            length = max((it.prepared.length or 0) for it in group) or None
            decision = self.policy.decide(group[0].enqueued, rows, length, self.target_rows)
            if decision.wait_s <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=decision.wait_s)
            except TimeoutError:
                if key not in self._groups:  # everyone in it went away meanwhile
                    continue
                break  # the request it waited for did not come: run what is there
        return self._take(key)

    def _take(self, key: tuple) -> list[_Item]:
        group = self._groups[key]
        batch = self.policy.select(group, self.max_rows)  # closest in length, within budget and cost
        for it in batch:
            group.remove(it)
        if not group:
            del self._groups[key]
        self._queued -= len(batch)
        self._queued_rows -= sum(it.rows for it in batch)
        self._queued_tokens -= sum(it.tokens for it in batch)
        self.observer.queue_depth(self._queued)
        return batch

    # -- execution --------------------------------------------------------------------------

    async def _execute(self, batch: list[_Item]) -> None:
        tokens = sum(it.rows for it in batch) * max(it.length or 1 for it in batch)
        self._in_flight += 1
        self._in_flight_tokens += tokens
        try:
            now = time.monotonic()
            live = []
            for it in batch:
                if it.future.done():  # cancelled while queued
                    continue
                if it.deadline is not None and now >= it.deadline:
                    it.future.set_exception(
                        DeadlineExceeded(f"deadline passed after {now - it.enqueued:.3f}s in the queue")
                    )
                    continue
                live.append(it)
            if not live:
                return
            try:
                await self._run(live, now)
            except Exception as e:
                if len(live) == 1:
                    self._fail(live[0], e)
                    return
                log.warning("batch of %d failed (%s); running its requests one at a time", len(live), e)
                for it in live:
                    if it.future.done():
                        continue
                    try:
                        await self._run([it], time.monotonic())
                    except Exception as e2:
                        self._fail(it, e2)
        finally:
            self._in_flight -= 1
            self._in_flight_tokens -= tokens
            self._slots.release()

    def _fail(self, item: _Item, error: Exception) -> None:
        if item.future.done():
            return
        if isinstance(error, TServeError):  # the runtime classified ONNX Runtime's verdict
            item.future.set_exception(error)
        else:
            log.error("batch handling failed for model %s", self.spec.name, exc_info=error)
            item.future.set_exception(InternalError(f"inference failed: {type(error).__name__}"))

    async def _run(self, items: list[_Item], started: float) -> None:
        spec = self.spec
        outputs = list(items[0].prepared.outputs)
        feeds, pads, efficiency = self._assemble(items)
        t0 = time.perf_counter()
        results = await self.runtime.run(feeds, outputs)
        compute_s = time.perf_counter() - t0
        rows = sum(it.prepared.rows for it in items)
        padded = rows * max(it.prepared.length or 1 for it in items)
        lengths = items[0].prepared.length is not None
        self.observer.batch(BatchRun(len(items), rows, compute_s, efficiency, padded if lengths else None))
        self.policy.costs.observe(padded, compute_s)
        start = 0
        for it, pad in zip(items, pads):
            n = it.prepared.rows
            own: dict[str, np.ndarray] = {}
            for name, value in zip(outputs, results):
                part = value[start : start + n] if spec.max_batch_size else value
                if pad and spec.padding.unpads(name):
                    axis = spec.output(name).variable_axis
                    part = part[(slice(None),) * axis + (slice(0, part.shape[axis] - pad),)]
                own[name] = part
            start += n
            if not it.future.done():
                it.future.set_result((own, Timing(queue_s=started - it.enqueued, compute_s=compute_s)))

    def _assemble(self, items: list[_Item]) -> tuple[dict[str, np.ndarray], list[int], float | None]:
        """Concatenate along the batch axis, right-padding paddable inputs to the longest."""
        if len(items) == 1:
            return items[0].prepared.inputs, [0], None
        spec = self.spec
        longest = max(it.prepared.length or 0 for it in items)
        pads = [longest - (it.prepared.length or 0) for it in items]
        feeds: dict[str, np.ndarray] = {}
        for name in items[0].prepared.inputs:
            parts = [it.prepared.inputs[name] for it in items]
            if any(pads) and name in spec.padding.pad_values:
                axis = spec.input(name).variable_axis
                value = spec.padding.pad_values[name]
                parts = [
                    np.pad(p, [(0, pad) if a == axis else (0, 0) for a in range(p.ndim)], constant_values=value)
                    if pad
                    else p
                    for p, pad in zip(parts, pads)
                ]
            feeds[name] = np.concatenate(parts, axis=0)
        efficiency = None
        if items[0].prepared.length is not None:
            real = sum(it.prepared.rows * (it.prepared.length or 0) for it in items)
            total = sum(it.prepared.rows for it in items) * longest
            efficiency = real / total if total else 1.0
        return feeds, pads, efficiency
