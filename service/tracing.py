"""OpenTelemetry tracing, on when the standard environment asks for it, free when it does not.

On when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and neither
OTEL_SDK_DISABLED=true nor OTEL_TRACES_EXPORTER=none): spans go over OTLP, gRPC or HTTP as
OTEL_EXPORTER_OTLP_PROTOCOL says (`grpc`, `http/protobuf`: the specification's default),
sampled as OTEL_TRACES_SAMPLER says (the SDK reads it; parentbased_always_on by default), under
OTEL_SERVICE_NAME (default `tserve`). Off, nothing of the SDK is imported and a request pays
one `is None` test.

Each request of either API is one SERVER span, the child of the caller's W3C `traceparent` /
`tracestate` (gRPC metadata, HTTP headers) or a root. Its children, recorded with their own
start and end times when the request ends: `queue` (waiting in the batcher or for a
generation slot), `compute` (the batch the request rode: rows, padded tokens) or, for
generation, `prefill` (to the first token) and `decode` (the engine steps to the last). Generation
spans carry the GenAI semantic conventions' attributes (gen_ai.request.model,
gen_ai.usage.input_tokens, gen_ai.usage.output_tokens, gen_ai.response.finish_reasons, ...).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.generation.requests import GenerateInput
    from service.generation.sequence import Event

log = logging.getLogger(__name__)

# the caller's trace headers, set by the front end in the request's own task
incoming: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("trace_headers", default=None)
HEADERS = ("traceparent", "tracestate")


def genai_attributes(request: GenerateInput, model: str, ends: list[Event]) -> dict:
    """A generation's span attributes, as OpenTelemetry's GenAI semantic conventions name them."""
    attributes = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "tserve",
        "gen_ai.request.model": request.model,
        "gen_ai.response.model": model,
        "gen_ai.request.choice.count": request.n,
        "gen_ai.usage.input_tokens": ends[0].prompt_tokens if ends else 0,
        "gen_ai.usage.output_tokens": sum(e.generated_tokens for e in ends),
        "gen_ai.response.finish_reasons": [e.finish_reason.value for e in ends if e.finish_reason is not None],
    }
    for key, value in (
        ("gen_ai.request.max_tokens", request.max_new_tokens),
        ("gen_ai.request.temperature", request.temperature),
        ("gen_ai.request.top_p", request.top_p),
        ("gen_ai.request.top_k", request.top_k),
        ("gen_ai.request.seed", request.seed),
        ("gen_ai.request.presence_penalty", request.presence_penalty),
        ("gen_ai.request.frequency_penalty", request.frequency_penalty),
    ):
        if value is not None:
            attributes[key] = value
    return attributes


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def take(pairs: Iterable[tuple[str, str | bytes]]) -> None:
    """Keep the caller's trace headers (gRPC metadata or HTTP headers) for this request's span."""
    found = {}
    for key, value in pairs:
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() in HEADERS:
            found[key.lower()] = value.decode("latin-1") if isinstance(value, bytes) else value
    if found:
        incoming.set(found)


class Tracing:
    def __init__(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        )
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "tserve")})
        self.provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("tserve")
        self.propagator = TraceContextTextMapPropagator()
        self.SERVER, self.INTERNAL = SpanKind.SERVER, SpanKind.INTERNAL
        self._error = lambda message: Status(StatusCode.ERROR, message)
        self.protocol = protocol

    def start(self, name: str, attributes: dict):
        """The request's span, a child of the caller's trace headers when it sent them."""
        headers = incoming.get()
        parent = self.propagator.extract(headers) if headers else None
        return self.tracer.start_span(name, context=parent, kind=self.SERVER, attributes=attributes)

    def finish(self, span, outcome, ended_ns: int) -> None:
        """The request's children from its recorded times, its attributes and status; then end it."""
        from opentelemetry import trace

        context = trace.set_span_in_context(span)
        for name, start_s, end_s, attributes in outcome.phases:
            child = self.tracer.start_span(
                name, context=context, kind=self.INTERNAL, start_time=_ns(start_s), attributes=attributes
            )
            child.end(end_time=_ns(end_s))
        span.set_attributes(outcome.attributes)
        if outcome.reason is not None:
            span.set_attribute("error.type", outcome.reason)
            span.set_status(self._error(outcome.reason))
        span.end(end_time=ended_ns)

    def trace_id(self, span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    def close(self) -> None:
        self.provider.shutdown()  # flushes what is still batched


# perf_counter readings (the data plane's clock) to the epoch nanoseconds spans carry
_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def _ns(perf_s: float) -> int:
    return _OFFSET_NS + int(perf_s * 1e9)


def from_env() -> Tracing | None:
    if not wanted():
        return None
    try:
        tracing = Tracing()
    except Exception as e:  # a bad exporter setting must not stop serving
        log.error("OpenTelemetry tracing could not start (%s); serving without it", e)
        return None
    log.info("OpenTelemetry tracing on: OTLP over %s", tracing.protocol)
    return tracing
