"""The HTTP front end: one Starlette app with the KServe v2, OpenAI and TEI routes, behind
the same bearer-token check the gRPC interceptor makes (service/auth.py)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import TokenAuth
from service.dataplane import DataPlane
from service.errors import Unauthenticated
from service.http import kserve, openai, tei
from service.http.limits import Admission
from service.http.openapi import document
from service.http.errors import kserve_body, openai_body

OPEN_PREFIXES = ("/v2/health/",)  # probes, when auth_open_health


class BearerAuth:
    """Refuses requests without an accepted bearer token with 401, before any route runs."""

    def __init__(self, app: ASGIApp, auth: TokenAuth, open_health: bool) -> None:
        self.app, self.auth = app, auth
        self.open_prefixes = OPEN_PREFIXES if open_health else ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.open_prefixes):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            self.auth.check(header.decode("latin-1") if header is not None else None)
        except Unauthenticated as e:
            shape = openai_body if scope["path"].startswith("/v1/") else kserve_body
            response = JSONResponse(shape(401, e.message), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(
    dp: DataPlane, auth: TokenAuth | None, open_health: bool, max_in_flight: int = 0, max_body_bytes: int = 1 << 26
) -> ASGIApp:
    spec = Route("/openapi.json", lambda request: JSONResponse(document()), methods=["GET"])
    app: ASGIApp = Starlette(routes=[*kserve.routes(dp), *openai.routes(dp), *tei.routes(dp), spec])
    app = Admission(app, max_in_flight, max_body_bytes, dp.refused, traced=dp.tracing is not None)
    if auth is not None:
        app = BearerAuth(app, auth, open_health)
    return app
