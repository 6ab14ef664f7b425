"""The one place domain errors become HTTP answers, in the shapes the HTTP APIs use: KServe v2 /
Triton (`{"error": "<message>"}`), OpenAI (`{"error": {"message", "type", ...}}`) and TEI
(`{"error": "<message>", "error_type": ...}`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import errors

log = logging.getLogger(__name__)

HTTP_STATUS = {
    errors.InvalidInput: 400,
    errors.FailedPrecondition: 400,
    errors.Unauthenticated: 401,
    errors.ModelNotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.QueueFull: 429,
    errors.OutOfMemory: 429,
    errors.InternalError: 500,
    errors.Unavailable: 503,
    errors.DeadlineExceeded: 504,
}
OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


def status_of(error: errors.TServeError) -> int:
    return HTTP_STATUS.get(type(error), 500)


def kserve_body(status: int, message: str) -> dict:
    return {"error": message}


def openai_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": OPENAI_TYPE.get(status, "server_error"), "param": param, "code": status}
    }


TEI_TYPE = {400: "Validation", 404: "Validation", 413: "Validation", 429: "Overloaded", 503: "Unhealthy"}


def tei_body(status: int, message: str) -> dict:
    return {"error": message, "error_type": TEI_TYPE.get(status, "Backend")}


_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}  # a 413 keeps the connection:
# closing it while a client still sends a chunked body resets the client before it reads the answer


def _answer(e: Exception, where: str, shape: Callable[[int, str], dict]) -> Response:
    if isinstance(e, errors.TServeError):
        status = status_of(e)
        headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}, 413: {"Connection": "close"}}.get(
            status
        )
        return JSONResponse(shape(status, e.message), status_code=status, headers=headers)
    log.error("unhandled error in %s", where, exc_info=e)
    return JSONResponse(shape(500, f"internal error in {where}; see the server log"), status_code=500)


def handled(shape: Callable[[int, str], dict]) -> Callable:
    """Route handlers: domain errors answer with their status in `shape`; anything else is a
    500, logged."""

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return _answer(e, handler.__name__, shape)

        return wrapper

    return decorate
