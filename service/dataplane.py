"""The data plane: validates, admits, routes to the model's batcher and records the outcome.

Servicers call one method here per RPC; nothing here knows about protobuf or grpc.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.errors import InternalError, TServeError, Unavailable
from service.logs import request_id
from service.models import ModelManager, ModelVersion
from service.types import InferRequest, InferResponse
from service.validation import prepare

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.draining = False
        self.loading_done = False
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    def ready(self, strict: bool) -> bool:
        """Server readiness: loading finished (and, when strict, every model is ready); not draining."""
        return self.loading_done and not self.draining and (self.manager.all_ready or not strict)

    def admit(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        request_id.set(request.id[:64])
        self.admit()
        mv = self.manager.get(request.model_name, request.model_version)
        observer = mv.observer
        started = time.perf_counter()
        self._inflight += 1
        observer.inflight(1)
        try:
            prepared = prepare(mv.spec, request)
            outputs, timing = await mv.batcher.submit(prepared, deadline)
        except TServeError as e:
            observer.request_done(False, e.reason, time.perf_counter() - started)
            raise
        except asyncio.CancelledError:  # the caller went away: counted, then let through
            observer.request_done(False, "cancelled", time.perf_counter() - started)
            raise
        except Exception as e:
            observer.request_done(False, "internal", time.perf_counter() - started)
            log.exception("unexpected error in ModelInfer for %s", request.model_name)
            raise InternalError(f"unexpected error: {type(e).__name__}") from e
        else:
            duration = time.perf_counter() - started
            observer.request_done(True, "", duration, timing.queue_s, timing.compute_s)
            log.debug("%s/%d answered in %.2f ms (queue %.2f ms, compute %.2f ms)", mv.name, mv.version,
                      duration * 1e3, timing.queue_s * 1e3, timing.compute_s * 1e3)
            return InferResponse(mv.name, str(mv.version), request.id, outputs)
        finally:
            self._inflight -= 1
            observer.inflight(-1)

    def model(self, name: str, version: str = "", ready: bool = False) -> ModelVersion:
        return self.manager.get(name, version, ready=ready)

    def statistics(self, name: str = "", version: str = "") -> list[ModelVersion]:
        if name:
            if version:
                return [self.manager.get(name, version, ready=False)]
            return [mv for mv in self.manager.versions(name).values() if mv.observer]
        return [mv for mv in self.manager.all() if mv.observer]
