"""Logging: plain text or one JSON object per line, carrying the request id where there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")  # with tracing on

# Request ids need to be unique, not secret: uuid4 reads the OS's random source on every call
# (about a tenth of the event loop's time per embedding request, profiled at c16b1).
_ids = random.Random(int.from_bytes(os.urandom(16), "big"))


def new_id(prefix: str) -> str:
    """A fresh request or call id, `prefix-` and 32 hex digits, as uuid4().hex looks."""
    return f"{prefix}-{_ids.getrandbits(128):032x}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.trace_id = trace_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
