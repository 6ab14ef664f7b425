"""The HTTP API's OpenAPI 3.1 document, served at /openapi.json: the KServe v2 routes with the
protocol's request and response shapes (written here from the KServe v2 / Triton REST spec),
and the OpenAI and TEI routes with the JSON schemas of the pydantic models that parse their
bodies, so the document and the parser cannot disagree. Clients generate from it, and the HTTP
fuzz (tests/chaos) draws its bodies from it."""

from __future__ import annotations

from functools import cache

from pydantic.json_schema import models_json_schema

from service.http.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from service.http.tei import EmbedBody, PredictBody, RerankBody

REF = "#/components/schemas/{model}"
_ERROR = {"type": "object", "properties": {"error": {}}, "required": ["error"]}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {
            "type": "string",
            "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
            + ["FP16", "FP32", "FP64", "BF16", "BYTES"],
        },
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
KSERVE = {
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"$ref": REF.format(model="InferenceTensor")}},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                },
            },
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": REF.format(model="InferenceTensor")}},
        },
    },
    "InferenceTensor": _TENSOR,
    "Error": _ERROR,
}


def _op(summary: str, body: str | None = None, answer: str | None = None, params: tuple[str, ...] = ()) -> dict:
    op: dict = {"summary": summary, "responses": {}}
    ok = {"description": "OK"}
    if answer:
        ok["content"] = {"application/json": {"schema": {"$ref": REF.format(model=answer)}}}
    op["responses"]["200"] = ok
    for status, why in (
        ("400", "bad input"),
        ("404", "unknown model"),
        ("413", "body over max_message_bytes"),
        ("429", "overloaded (Retry-After)"),
        ("503", "draining or not ready"),
    ):
        op["responses"][status] = {
            "description": why,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
        }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=body)}}},
        }
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    return op


@cache
def document() -> dict:
    models = [(m, "validation") for m in (CompletionRequest, ChatRequest, EmbeddingRequest)]
    models += [(m, "validation") for m in (EmbedBody, RerankBody, PredictBody)]
    _, defs = models_json_schema(models, ref_template=REF)
    schemas = {**defs.get("$defs", {}), **KSERVE}
    model = ("model",)
    versioned = ("model", "version")
    paths = {
        "/v2/health/live": {"get": _op("server live")},
        "/v2/health/ready": {"get": _op("server ready")},
        "/v2": {"get": _op("server metadata")},
        "/v2/models/{model}": {"get": _op("model metadata", params=model)},
        "/v2/models/{model}/ready": {"get": _op("model ready", params=model)},
        "/v2/models/{model}/config": {"get": _op("model configuration", params=model)},
        "/v2/models/{model}/stats": {"get": _op("model statistics", params=model)},
        "/v2/models/{model}/infer": {
            "post": _op("inference (KServe v2)", "InferenceRequest", "InferenceResponse", model)
        },
        "/v2/models/{model}/versions/{version}/infer": {
            "post": _op("inference on one version (KServe v2)", "InferenceRequest", "InferenceResponse", versioned)
        },
        "/v2/repository/index": {"post": _op("repository index")},
        "/v2/repository/models/{model}/load": {"post": _op("load a model", params=model)},
        "/v2/repository/models/{model}/unload": {"post": _op("unload a model", params=model)},
        "/v1/models": {"get": _op("models (OpenAI)")},
        "/v1/completions": {"post": _op("completions (OpenAI)", "CompletionRequest")},
        "/v1/chat/completions": {"post": _op("chat completions (OpenAI)", "ChatRequest")},
        "/v1/embeddings": {"post": _op("embeddings (OpenAI)", "EmbeddingRequest")},
        "/embed": {"post": _op("embeddings (TEI)", "EmbedBody")},
        "/rerank": {"post": _op("reranking (TEI)", "RerankBody")},
        "/predict": {"post": _op("classification (TEI)", "PredictBody")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tserve", "version": "0.1.0", "description": "KServe v2, OpenAI-compatible and TEI routes"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
