"""KServe v2 / Open Inference Protocol over HTTP, with Triton's extensions (model config,
statistics, repository, binary tensors), so that `tritonclient.http` and `perf_analyzer -i http`
work unchanged. Every route goes through the data plane the gRPC servicers use; metadata,
config, statistics and the repository index are built by the gRPC converters and written as
JSON here, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import json
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import __version__
from service.dataplane import HTTP, DataPlane
from service.errors import InvalidInput, short
from service.http.errors import handled, kserve_body
from service.http.tensors import HEADER_LENGTH, decode_infer, encode_infer
from service.servicers import converters
from service.servicers.inference import EXTENSIONS

TIMEOUT_HEADER = "x-request-timeout"  # seconds; also Triton's `timeout` request parameter (microseconds)
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}

kserve = handled(kserve_body)


def proto_json(message: Message) -> dict:
    """A message as Triton's HTTP endpoint writes it: field names as in the proto, fields at
    their defaults included, 64-bit integers as JSON numbers (protobuf's JSON mapping writes
    them as strings, which perf_analyzer cannot read)."""
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message, doc)
    return doc


def _numbers(message: Message, doc: dict) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in doc:
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    for key, sub in value.items():
                        _numbers(sub, doc[field.name][str(key)])
                elif value_field.type in _INT64:
                    doc[field.name] = {k: int(v) for k, v in doc[field.name].items()}
            elif field.label == FieldDescriptor.LABEL_REPEATED:
                for sub, sub_doc in zip(value, doc[field.name]):
                    _numbers(sub, sub_doc)
            else:
                _numbers(value, doc[field.name])
        elif field.type in _INT64:
            doc[field.name] = (
                [int(v) for v in doc[field.name]]
                if field.label == FieldDescriptor.LABEL_REPEATED
                else int(doc[field.name])
            )


def deadline_of(request: Request, parameters_timeout_us: Any = None) -> float | None:
    timeouts = []
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            timeouts.append(float(header))
        except ValueError:
            raise InvalidInput(f"header {TIMEOUT_HEADER} must be seconds, got {short(header)}") from None
    if parameters_timeout_us is not None:
        timeouts.append(parameters_timeout_us / 1e6)
    if not timeouts:
        return None
    if min(timeouts) <= 0:
        raise InvalidInput("the request's timeout must be positive")
    return time.monotonic() + min(timeouts)


def _ready(ok: bool) -> Response:
    return Response(status_code=200 if ok else 503)


def routes(dp: DataPlane) -> list[Route]:
    @kserve
    async def live(request: Request) -> Response:
        return _ready(True)

    @kserve
    async def ready(request: Request) -> Response:
        return _ready(dp.ready())

    @kserve
    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "tserve", "version": __version__, "extensions": EXTENSIONS})

    def version_of(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    @kserve
    async def model_ready(request: Request) -> Response:
        return _ready(dp.model_ready(*version_of(request)))

    @kserve
    async def model_metadata(request: Request) -> Response:
        name, version = version_of(request)
        mv = dp.model(name, version, ready=True)
        return JSONResponse(proto_json(converters.model_metadata_to_proto(mv, dp.ready_versions(name))))

    @kserve
    async def model_config(request: Request) -> Response:
        mv = dp.model(*version_of(request), ready=True)
        return JSONResponse(proto_json(mv.config))

    @kserve
    async def model_stats(request: Request) -> Response:
        name, version = request.path_params.get("model", ""), request.path_params.get("version", "")
        return JSONResponse(proto_json(converters.statistics_to_proto(dp.statistics(name, version))))

    @kserve
    async def infer(request: Request) -> Response:
        name, version = version_of(request)
        decoded = decode_infer(await request.body(), request.headers.get(HEADER_LENGTH), name, version)
        result = await dp.infer(decoded.request, deadline_of(request, decoded.timeout_us), HTTP)
        body, header_length = encode_infer(result, decoded)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    async def _json_body(request: Request) -> dict:
        body = await request.body()
        if not body:
            return {}
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise InvalidInput(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidInput("the request body's JSON is nested too deeply") from None
        if not isinstance(doc, dict):
            raise InvalidInput("the request body must be a JSON object")
        return doc

    @kserve
    async def repository_index(request: Request) -> Response:
        ready_only = bool((await _json_body(request)).get("ready", False))
        index = converters.repository_index_to_proto(dp.repository_index(), ready_only)
        return JSONResponse([proto_json(m) for m in index.models])

    @kserve
    async def load(request: Request) -> Response:
        await _json_body(request)
        await dp.load(request.path_params["model"])
        return JSONResponse({})

    @kserve
    async def unload(request: Request) -> Response:
        await _json_body(request)
        await dp.unload(request.path_params["model"])
        return JSONResponse({})

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        *[
            r
            for prefix in (model, versioned)
            for r in (
                Route(prefix, model_metadata, methods=["GET"]),
                Route(prefix + "/ready", model_ready, methods=["GET"]),
                Route(prefix + "/config", model_config, methods=["GET"]),
                Route(prefix + "/stats", model_stats, methods=["GET"]),
                Route(prefix + "/infer", infer, methods=["POST"]),
            )
        ],
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
    ]
