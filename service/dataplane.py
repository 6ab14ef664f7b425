"""The data plane: the one road every request takes, whichever API and protocol it came by.

    admit      refuse new work once the drain's intake window is over (UNAVAILABLE); find the model
    count      in-flight gauge per model and API, held until the last answer is sent
    run        inference: validate -> the model's dynamic batcher
               generation: check the request -> the model's generation engine -> events
    record     one outcome per request (success, or the failure's reason) and its duration

Front ends (gRPC servicers, the KServe v2 HTTP routes, the OpenAI routes) convert wire messages
to the domain objects here and back; nothing here knows protobuf or grpc. The server's drain
waits on `inflight`, so it covers both APIs by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from typing import Iterator

from service.errors import FailedPrecondition, InternalError, InvalidInput, QueueFull, TServeError, Unavailable
from service.tasks.roles import WHAT, Role, TaskRequest, TaskResult
from service.tasks.tensors import carries_bytes, task_outputs, task_request
from service.generation.requests import GenerateInput, to_sequence
from service.generation.sequence import Event, FinishReason
from service.logs import request_id, trace_id
from service.models import ModelManager, ModelVersion
from service.settings import Settings
from service.tracing import Tracing, genai_attributes
from service.types import InferRequest, InferResponse
from service.validation import prepare

log = logging.getLogger(__name__)
access = logging.getLogger("tserve.access")  # one line per answered request, with access_log


INFER, GENERATE = "infer", "generate"  # the request kinds (the `api` label), with the task roles
GRPC, HTTP, OPENAI = "grpc", "http", "openai"  # the front ends (the `protocol` label)


class _Outcome:
    """What a request ended with, filled in by the code that runs it."""

    def __init__(self) -> None:
        self.reason: str | None = "internal"  # None: success
        self.answered = False  # the last message has been handed to the front end
        self.queue_s = 0.0
        self.compute_s = 0.0
        self.done_at = 0.0  # perf_counter when the result came back (the trace's anchor)
        self.last: Event | None = None  # generation: the final event (tokens, times)
        self.attributes: dict = {}  # the trace span's, beyond the ones every request has
        self.phases: list[tuple[str, float, float, dict]] = []  # (name, start, end, attributes) for the trace

    def trace_phases(self, started: float) -> None:
        """The request's queue, compute or prefill/decode spans, from the times it recorded."""
        if self.last is not None:  # generation: times since the sequence was submitted
            e, end = self.last, self.done_at or time.perf_counter()
            submitted = end - e.total_s
            prompt = {"gen_ai.usage.input_tokens": e.prompt_tokens}
            self.phases = [
                ("queue", submitted, submitted + e.queue_s, {}),
                ("prefill", submitted + e.queue_s, submitted + e.ttft_s, prompt),
                ("decode", submitted + e.ttft_s, end, {"gen_ai.usage.output_tokens": e.generated_tokens}),
            ]
        elif self.done_at:
            ran = self.done_at - self.compute_s
            self.phases = [("queue", max(started, ran - self.queue_s), ran, {}), ("compute", ran, self.done_at, {})]


class DataPlane:
    def __init__(self, manager: ModelManager, settings: Settings, tracing: Tracing | None = None) -> None:
        self.manager = manager
        self.settings = settings
        self.tracing = tracing  # None: tracing off, and no request pays for it
        self.draining = False  # SIGTERM came: not ready
        self.peers_ready = True  # --workers: whether every other worker is ready (service/workers.py)
        self.fanout = None  # --workers: async (op, name) doing a repository load/unload in every worker
        self.refusing = False  # the drain's intake window is over: new requests get UNAVAILABLE
        self.loading_done = False
        self._inflight = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests of either API received and not yet fully answered."""
        return self._inflight

    def refused(self, cause: str) -> None:
        """A refusal before any model was chosen (the in-flight bound)."""
        self.manager.metrics.refusals.labels("", "", cause).inc()

    def ready(self) -> bool:
        """Server readiness: this process is ready, and so is every other worker (--workers)."""
        return self.ready_here() and self.peers_ready

    def ready_here(self) -> bool:
        """This process's readiness: loading finished (and, with strict_readiness, every model
        is ready); not draining."""
        return (
            self.loading_done and not self.draining and (self.manager.all_ready or not self.settings.strict_readiness)
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.manager.get(name, version, ready=False).ready and not self.draining

    def admit(self) -> None:
        """Before a request of either API is taken: refused when draining, or at once when the
        server already holds max_concurrent_rpcs requests (health, metadata and repository calls
        are never counted or refused: a probe must get through a loaded server)."""
        if self.refusing:
            raise Unavailable("the server is shutting down; retry on another replica")
        bound = self.settings.admission_bound
        if bound and self._inflight >= bound:
            self.refused("concurrency")
            raise QueueFull(f"the server has {self._inflight} requests in flight (max_concurrent_rpcs {bound})")

    # -- the two request kinds --------------------------------------------------------------

    @contextmanager
    def _request(self, mv: ModelVersion, api: str, protocol: str, rid: str) -> Iterator[_Outcome]:
        """In-flight count and outcome record around one request of either API."""
        request_id.set(rid[:64])
        observer, outcome, started = mv.observer, _Outcome(), time.perf_counter()
        span = None
        if self.tracing is not None:
            span = self.tracing.start(
                f"{api} {mv.name}",
                {
                    "tserve.api": api,
                    "tserve.protocol": protocol,
                    "tserve.model": mv.name,
                    "tserve.model_version": mv.version,
                    "tserve.request_id": rid[:64],
                },
            )
            trace_id.set(self.tracing.trace_id(span))
        self._inflight += 1
        observer.inflight(api, protocol, 1)
        try:
            yield outcome
        except TServeError as e:
            outcome.reason = e.reason
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away: counted, then let through
            if not outcome.answered:  # not after its last message was handed over
                outcome.reason = "cancelled"
            raise
        except Exception as e:
            log.exception("unexpected error in a %s request for %s", api, mv.name)
            raise InternalError(f"unexpected error: {type(e).__name__}") from e
        finally:
            self._inflight -= 1
            observer.inflight(api, protocol, -1)
            duration = time.perf_counter() - started
            if span is not None:
                outcome.trace_phases(started)
                self.tracing.finish(span, outcome, time.time_ns())
            if self.settings.access_log:
                access.info(
                    "%s %s/%d %s %s %.2f ms (queue %.2f ms, compute %.2f ms)",
                    api,
                    mv.name,
                    mv.version,
                    protocol,
                    outcome.reason or "ok",
                    duration * 1e3,
                    outcome.queue_s * 1e3,
                    outcome.compute_s * 1e3,
                )
            observer.request_done(
                api,
                protocol,
                outcome.reason is None,
                outcome.reason or "",
                duration,
                outcome.queue_s,
                outcome.compute_s,
            )
            log.debug(
                "%s %s/%d answered in %.2f ms (%s; queue %.2f ms, compute %.2f ms)",
                api,
                mv.name,
                mv.version,
                duration * 1e3,
                outcome.reason or "success",
                outcome.queue_s * 1e3,
                outcome.compute_s * 1e3,
            )

    async def infer(self, request: InferRequest, deadline: float | None = None, protocol: str = GRPC) -> InferResponse:
        self.admit()
        mv = self.manager.get(request.model_name, request.model_version)
        if carries_bytes(request):  # text or images for the model's task: the task road
            if mv.task is None:
                raise InvalidInput(
                    f"model {mv.name!r} takes no BYTES inputs: it has no task (text needs a tokenizer.json beside an "
                    "encoder's graph; images a vision model's pixel_values)"
                )
            result = await self.run_task(task_request(mv.task, request), (mv.task.role,), deadline, protocol)
            return InferResponse(
                mv.name, str(mv.version), request.id, task_outputs(mv.task, result, request.requested_outputs)
            )
        if mv.batcher is None:
            return await self._infer_graph(mv, request, protocol)
        with self._request(mv, INFER, protocol, request.id) as outcome:
            prepared = prepare(mv.spec, request)
            outputs, timing = await mv.batcher.submit(prepared, deadline)
            outcome.reason, outcome.queue_s, outcome.compute_s = None, timing.queue_s, timing.compute_s
            outcome.done_at = time.perf_counter()
            return InferResponse(mv.name, str(mv.version), request.id, outputs)

    async def _infer_graph(self, mv: ModelVersion, request: InferRequest, protocol: str) -> InferResponse:
        """ModelInfer on one graph of an encoder-decoder, run as sent (no batching): for clients
        that drive the decoding loop themselves. ONNX Runtime checks the tensors."""
        with self._request(mv, INFER, protocol, request.id) as outcome:
            runtime = mv.graph_for(set(request.inputs))
            available = [a.name for a in runtime.graph_outputs]
            names = list(request.requested_outputs) or available
            unknown = [n for n in names if n not in available]
            if unknown:
                raise InvalidInput(f"output {unknown[0]!r} is not an output of this graph (it has {available[:6]}...)")
            started = time.perf_counter()
            outputs = await runtime.run(request.inputs, names)
            outcome.reason, outcome.compute_s = None, time.perf_counter() - started
            return InferResponse(mv.name, str(mv.version), request.id, dict(zip(names, outputs)))

    async def generate(
        self, request: GenerateInput, deadline: float | None = None, protocol: str = GRPC
    ) -> AsyncIterator[list[Event]]:
        """The sequence's events in chunks (with n > 1, every choice's, each event naming its
        choice): everything produced since the last chunk. A reader
        keeping up gets one token per chunk; one that falls behind (or a server under load)
        gets fewer, larger chunks instead of a growing backlog. A failure of the sequence's own
        run is raised as its error; a reader that goes away stops the sequence within one step."""
        self.admit()
        mv = self.manager.get(request.model, request.model_version)
        if mv.engine is None:
            raise FailedPrecondition(
                f"model {request.model!r} is not a decoder with a KV cache (decoder-with-past inputs and present "
                "outputs); it cannot generate"
            )
        with self._request(mv, GENERATE, protocol, request.request_id) as outcome:
            args = (mv.generation, request, self.settings.generation_default_max_new_tokens, deadline)
            # a grammar compiles off the event loop (a large schema takes a while)
            seq = await asyncio.to_thread(to_sequence, *args) if request.constraint else to_sequence(*args)
            mv.engine.submit(seq)
            running = len(seq.group)  # n > 1: the choices share one events queue; each event has its index
            ends: list[Event] = []  # each choice's last event
            try:
                while True:
                    chunk = [await seq.events.get()]
                    while not seq.events.empty():
                        chunk.append(seq.events.get_nowait())
                    for event in chunk:
                        if event.error is not None:
                            raise event.error
                    finished = [e for e in chunk if e.finish_reason is not None]
                    ends += finished
                    running -= len(finished)
                    if running == 0:
                        last = finished[-1]
                        outcome.reason = "cancelled" if last.finish_reason == FinishReason.CANCELLED else None
                        outcome.queue_s = last.queue_s
                        outcome.answered = True
                        outcome.last, outcome.done_at = last, time.perf_counter()
                        if self.tracing is not None:
                            outcome.attributes = genai_attributes(request, mv.name, ends)
                    yield chunk
                    if running == 0:
                        return
            finally:
                mv.engine.cancel(seq)  # a no-op when finished; frees the slot on cancel or disconnect

    async def run_task(
        self, request: TaskRequest, roles: tuple[Role, ...], deadline: float | None = None, protocol: str = HTTP
    ) -> TaskResult:
        """An encoder's or vision model's inputs -> one answer each (service/tasks/roles.py):
        every input its own row for the batcher, so the inputs of many requests share batches
        and a request of many inputs is never held to a row cap it did not choose."""
        self.admit()
        mv = self.manager.get(request.model, request.model_version)
        task = mv.task
        if task is None or task.role not in roles or mv.batcher is None:
            raise FailedPrecondition(
                f"model {request.model!r} is not {' or '.join(WHAT[r] for r in roles)}"
                + (f"; it is {WHAT[task.role]}" if task is not None else "")
            )
        with self._request(mv, task.role.value, protocol, request.request_id) as outcome:
            rows = task.rows(request)
            wanted = (task.output,)
            prepared = [prepare(mv.spec, InferRequest(mv.name, "", request.request_id, r.feeds, wanted)) for r in rows]
            results = await mv.batcher.submit_all(prepared, deadline)  # all of the inputs queue, or none
            values = [task.answer(row, out[task.output], request) for row, (out, _) in zip(rows, results)]
            outcome.reason = None
            outcome.queue_s = max(t.queue_s for _, t in results)
            outcome.compute_s = sum({t.compute_s for _, t in results})  # a batch its rows shared counts once
            outcome.done_at = time.perf_counter()
            outcome.attributes = {"tserve.inputs": len(rows)}
            return TaskResult(values, sum(r.tokens for r in rows))

    def task_models(self, *roles: Role) -> list[ModelVersion]:
        """The latest ready version of each model whose role is one of `roles`."""
        latest: dict[str, ModelVersion] = {}
        for mv in self.manager.all():
            if mv.ready and mv.task is not None and mv.task.role in roles:
                if mv.version >= getattr(latest.get(mv.name), "version", -1):
                    latest[mv.name] = mv
        return [latest[name] for name in sorted(latest)]

    # -- lookups for the front ends ----------------------------------------------------------

    def model(self, name: str, version: str = "", ready: bool = False) -> ModelVersion:
        return self.manager.get(name, version, ready=ready)

    def generators(self) -> list[ModelVersion]:
        """The latest ready version of each model that generates."""
        latest: dict[str, ModelVersion] = {}
        for mv in self.manager.all():
            if mv.ready and mv.engine is not None and mv.version >= getattr(latest.get(mv.name), "version", -1):
                latest[mv.name] = mv
        return [latest[name] for name in sorted(latest)]

    def ready_versions(self, name: str) -> list[int]:
        return sorted(v for v, mv in self.manager.versions(name).items() if mv.ready)

    def statistics(self, name: str = "", version: str = "") -> list[ModelVersion]:
        if name:
            if version:
                return [self.manager.get(name, version, ready=False)]
            return [mv for mv in self.manager.versions(name).values() if mv.observer]
        return [mv for mv in self.manager.all() if mv.observer]

    def repository_index(self) -> list[ModelVersion]:
        return self.manager.index()

    async def load(self, name: str) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; it loads no models")
        await (self.fanout("load", name) if self.fanout else self.manager.load(name))

    async def unload(self, name: str) -> None:
        await (self.fanout("unload", name) if self.fanout else self.manager.unload(name))
