"""HTTP admission, bounded as gRPC is: requests in flight (max_concurrent_rpcs: beyond it 429
with Retry-After at once, where uvicorn's own limit would answer 503) and body size
(max_message_bytes: a declared Content-Length over it is 413 before a byte of the body is read;
a chunked body is counted as it arrives and refused at the first byte past the bound, so a
1 GiB upload never lands in memory). Health probes are never refused for load."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.errors import PayloadTooLarge
from service.http.errors import kserve_body, openai_body, tei_body

EXEMPT = ("/v2/health/", "/health")


def _shape(path: str):
    if path.startswith("/v1/"):
        return openai_body
    if path.startswith(("/embed", "/rerank", "/predict")):
        return tei_body
    return kserve_body


class Admission:
    def __init__(
        self, app: ASGIApp, max_in_flight: int, max_body_bytes: int, on_refused=None, traced: bool = False
    ) -> None:
        self.app = app
        self.traced = traced  # tracing on: keep the caller's traceparent/tracestate for the request's span
        self.max_in_flight = max_in_flight  # 0: no bound
        self.max_body = max_body_bytes
        self.on_refused = on_refused or (lambda cause: None)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT):
            return await self.app(scope, receive, send)
        shape = _shape(scope["path"])
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            self.on_refused("concurrency")
            message = f"the server has {self.in_flight} requests in flight (max_concurrent_rpcs {self.max_in_flight})"
            response = JSONResponse(shape(429, message), status_code=429, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            message = (
                f"the request body holds {int(declared)} bytes; the server takes at most {self.max_body} "
                "(max_message_bytes)"
            )
            response = JSONResponse(shape(413, message), status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(f"the request body holds more than {self.max_body} bytes (max_message_bytes)")
            return message

        if self.traced:
            tracing.take(scope["headers"])
        self.in_flight += 1
        try:
            await self.app(scope, bounded_receive, send)
        finally:
            self.in_flight -= 1
