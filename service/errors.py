"""Domain errors. No grpc here: service/servicers/status.py maps each class to a status code.

Messages name the problem and quote client-supplied strings only in short form (`short`).
"""

from __future__ import annotations


def short(value: object, limit: int = 64) -> str:
    """A client-supplied value, safe to echo: repr'd and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TServeError(Exception):
    """Base class; `reason` is the label recorded in metrics."""

    reason = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TServeError):
    reason = "invalid_argument"


class ModelNotFound(TServeError):
    reason = "not_found"


class QueueFull(TServeError):
    reason = "resource_exhausted"


class PayloadTooLarge(TServeError):
    """A request body over max_message_bytes (HTTP 413), refused before it is read whole."""

    reason = "resource_exhausted"


class OutOfMemory(TServeError):
    """A run could not allocate what it needed: the request is too big for this server now."""

    reason = "resource_exhausted"


class Unavailable(TServeError):
    """Draining, or the model is not ready."""

    reason = "unavailable"


class Unauthenticated(TServeError):
    """No credentials, or ones the server does not accept."""

    reason = "unauthenticated"


class DeadlineExceeded(TServeError):
    reason = "deadline_exceeded"


class FailedPrecondition(TServeError):
    """The request is valid but the model cannot serve it (e.g. generation on an encoder)."""

    reason = "failed_precondition"


class InternalError(TServeError):
    reason = "internal"


class ModelLoadError(Exception):
    """A model could not be loaded; the message becomes its not-ready reason."""
