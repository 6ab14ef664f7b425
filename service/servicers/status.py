"""The one place domain errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc

from service import errors

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def status_of(error: errors.TServeError) -> grpc.StatusCode:
    return STATUS.get(type(error), grpc.StatusCode.INTERNAL)


def handle_errors(method: Callable) -> Callable:
    """Unary handlers: domain errors abort with their status; anything else is INTERNAL, logged."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except errors.TServeError as e:
            await context.abort(status_of(e), e.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log")

    return wrapper
