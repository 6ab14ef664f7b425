"""The gRPC face of service/auth.py: an interceptor that refuses calls without an accepted
bearer token with UNAUTHENTICATED, before any handler runs. Health and reflection may stay open
for probes (auth_open_health)."""

from __future__ import annotations

import grpc

from service.auth import TokenAuth
from service.errors import Unauthenticated

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refuse(message: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as streaming handlers are

    return unary, streaming


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth, open_health: bool) -> None:
        self.auth = auth
        self.open_prefixes = OPEN_PREFIXES if open_health else ()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_prefixes):
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.auth.check(authorization)
        except Unauthenticated as e:
            unary, streaming = _refuse(e.message)
            args = {
                "request_deserializer": handler.request_deserializer,
                "response_serializer": handler.response_serializer,
            }
            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(unary, **args)
            if handler.unary_stream:
                return grpc.unary_stream_rpc_method_handler(streaming, **args)
            if handler.stream_unary:
                return grpc.stream_unary_rpc_method_handler(unary, **args)
            return grpc.stream_stream_rpc_method_handler(streaming, **args)
        return handler
