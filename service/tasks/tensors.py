"""The tasks over KServe v2 ModelInfer (gRPC and HTTP alike), for tritonclient users: text and
images as BYTES tensors (Triton's string encoding), answers as tensors. A ModelInfer request
that carries a BYTES input takes the data plane's task road; one of numbers runs the graph as
sent, as before.

    role            inputs (BYTES, [N] or [N, 1])          outputs
    embed           text                                  embedding FP32 [N, D]
    classify        text (+ text_pair)                    scores FP32 [N, L], label BYTES [N]
    rerank          query [1] + text [N], or text_pair    score FP32 [N]
    token_classify  text                                  entities BYTES [N] (JSON, as /predict)
    image_classify  image (PNG, JPEG, ... bytes)          scores FP32 [N, L], label BYTES [N]

Request parameters truncate, normalize, raw_scores and dimensions mean what they mean on the
HTTP routes.
"""

from __future__ import annotations

import json

import numpy as np

from service.errors import InvalidInput, short
from service.tasks.roles import Role, TaskModel, TaskRequest, TaskResult
from service.types import InferRequest
from service.wire import strings

TASK_PARAMETERS = ("truncate", "normalize", "raw_scores", "dimensions")
TEXT, TEXT_PAIR, QUERY, IMAGE = "text", "text_pair", "query", "image"
OUTPUTS = {
    Role.EMBED: ("embedding",),
    Role.CLASSIFY: ("scores", "label"),
    Role.RERANK: ("score",),
    Role.TOKEN_CLASSIFY: ("entities",),
    Role.IMAGE_CLASSIFY: ("scores", "label"),
}


def carries_bytes(request: InferRequest) -> bool:
    return any(a.dtype == np.object_ for a in request.inputs.values())


def _column(request: InferRequest, name: str) -> list[bytes] | None:
    array = request.inputs.get(name)
    if array is None:
        return None
    if array.dtype != np.object_ or array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
        raise InvalidInput(f"input {name!r} must be BYTES of shape [N] or [N, 1] (got {list(array.shape)})")
    return list(array.reshape(-1))


def _texts(items: list[bytes], name: str) -> list[str]:
    try:
        return [b.decode("utf-8") for b in items]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input {name!r} is not UTF-8 text: {e}") from None


def _option(request: InferRequest, key: str, kind: type, default):
    value = request.parameters.get(key, default)
    if value is None or (kind is bool and not isinstance(value, bool)) or (kind is int and isinstance(value, bool)):
        if value is None:
            return default
        raise InvalidInput(f"parameter {key!r} must be a {kind.__name__}")
    if not isinstance(value, kind):
        raise InvalidInput(f"parameter {key!r} must be a {kind.__name__}")
    return value


def task_request(task: TaskModel, request: InferRequest) -> TaskRequest:
    """The TaskRequest a BYTES ModelInfer request asks for; InvalidInput naming what is missing."""
    expected = {TEXT, TEXT_PAIR} | ({QUERY} if task.role == Role.RERANK else set())
    if task.role == Role.IMAGE_CLASSIFY:
        expected = {IMAGE}
    unknown = sorted(set(request.inputs) - expected)
    if unknown:
        raise InvalidInput(
            f"input {short(unknown[0])}: a {task.role.value} model takes BYTES inputs {sorted(expected)} "
            "(or its graph's own tensors, all numeric)"
        )
    if task.role == Role.IMAGE_CLASSIFY:
        inputs: list = _column(request, IMAGE)
        if inputs is None:
            raise InvalidInput("input 'image' (BYTES, the encoded images) is required")
    else:
        texts = _column(request, TEXT)
        if texts is None:
            raise InvalidInput("input 'text' (BYTES) is required")
        inputs = _texts(texts, TEXT)
        pair = _column(request, TEXT_PAIR)
        query = _column(request, QUERY)
        if query is not None:
            if len(query) != 1:
                raise InvalidInput(f"input 'query' holds {len(query)} texts; one query ranks the texts")
            pair, inputs = inputs, _texts(query, QUERY) * len(inputs)
        if pair is not None:
            second = _texts(pair, TEXT_PAIR) if query is None else pair
            if len(second) != len(inputs):
                raise InvalidInput(f"inputs 'text' and 'text_pair' hold {len(inputs)} and {len(second)} texts")
            inputs = list(zip(inputs, second))
        elif task.role == Role.RERANK:
            raise InvalidInput("a reranker scores pairs: send 'query' [1] with 'text' [N], or 'text' with 'text_pair'")
    requested = set(request.requested_outputs) - set(OUTPUTS[task.role])
    if requested:
        raise InvalidInput(
            f"output {short(sorted(requested)[0])}: a {task.role.value} model answers {list(OUTPUTS[task.role])}"
        )
    dims = _option(request, "dimensions", int, None)
    if dims is not None and dims < 1:
        raise InvalidInput(f"parameter 'dimensions' must be at least 1 (got {dims})")
    return TaskRequest(
        request.model_name,
        inputs,
        request.id,
        request.model_version,
        truncate=_option(request, "truncate", bool, False),
        normalize=_option(request, "normalize", bool, True),
        dimensions=dims,
        raw_scores=_option(request, "raw_scores", bool, False),
    )


def task_outputs(task: TaskModel, result: TaskResult, requested: tuple[str, ...]) -> dict[str, np.ndarray]:
    role = task.role
    if role == Role.EMBED:
        out = {"embedding": np.stack(result.values).astype(np.float32)}
    elif role == Role.RERANK:
        out = {"score": np.array([v[0] for v in result.values], np.float32)}
    elif role == Role.TOKEN_CLASSIFY:
        out = {"entities": strings([json.dumps(v).encode() for v in result.values], [len(result.values)])}
    else:
        scores = np.stack(result.values).astype(np.float32)
        labels = [task.labels[i].encode() for i in scores.argmax(1).tolist()]
        out = {"scores": scores, "label": strings(labels, [len(labels)])}
    return {name: out[name] for name in requested} if requested else out
