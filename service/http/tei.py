"""Hugging Face text-embeddings-inference's routes, for clients written against TEI:

    POST /embed    inputs: a text or a list (or token ids)  -> a vector per input
    POST /rerank   query + texts                            -> [{index, score[, text]}], best first
    POST /predict  inputs: a text, a pair [a, b], or a batch [[a], [a, b], ...]
                   -> [{label, score}] per input, every label best first; on a token
                   classifier the tokens' labels; on an image classifier base64 images

Scores are softmax over the labels (the sigmoid for one label), the logits with raw_scores.
TEI serves one model per process; tserve serves a repository, so the body may name one with
`model`, and must when more than one model could answer. Errors are TEI-shaped
(`{"error": ..., "error_type": ...}`) with the status each error maps to everywhere. Each route
is one call of the data plane's task road (DataPlane.run_task).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.dataplane import HTTP, DataPlane
from service.errors import InvalidInput
from service.http.errors import handled, tei_body
from service.http.kserve import deadline_of
from service.logs import new_id
from service.tasks.roles import Role, TaskRequest

tei = handled(tei_body)
PREDICT_ROLES = (Role.CLASSIFY, Role.RERANK, Role.TOKEN_CLASSIFY, Role.IMAGE_CLASSIFY)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    truncate: bool = False
    truncation_direction: str = "Right"

    def check(self) -> None:
        if self.truncation_direction != "Right":
            raise InvalidInput("truncation_direction: tserve truncates on the right")


class EmbedBody(_Body):
    inputs: str | list[str] | list[int] | list[list[int]]
    normalize: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    prompt_name: str | None = None


class RerankBody(_Body):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class PredictBody(_Body):
    inputs: str | list[str] | list[list[str]]
    raw_scores: bool = False


def _parse(model: type[BaseModel], body: bytes):
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise InvalidInput(f"{where}: {first['msg']}") from None
    parsed.check()
    return parsed


def _image(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where} is not base64 (send an image's bytes base64-encoded)") from None


def routes(dp: DataPlane) -> list[Route]:
    def model_for(name: str | None, roles: tuple[Role, ...]) -> str:
        if name:
            return name
        names = [mv.name for mv in dp.task_models(*roles)]
        if len(names) != 1:
            raise InvalidInput(
                f"model: the repository serves {len(names)} models for this route ({', '.join(names) or 'none'}); "
                "name one"
            )
        return names[0]

    def rid(request: Request, kind: str) -> str:
        return request.headers.get("x-request-id") or new_id(kind)

    @tei
    async def embed(request: Request) -> Response:
        body = _parse(EmbedBody, await request.body())
        if body.prompt_name is not None:
            raise InvalidInput("prompt_name: tserve applies no prompts (send the text with its prompt)")
        if isinstance(body.inputs, str) or (body.inputs and isinstance(body.inputs[0], int)):
            inputs = [body.inputs]
        else:
            inputs = list(body.inputs)
        roles = (Role.EMBED,)
        result = await dp.run_task(
            TaskRequest(
                model_for(body.model, roles),
                inputs,
                rid(request, "embed"),
                truncate=body.truncate,
                normalize=body.normalize,
                dimensions=body.dimensions,
            ),
            roles,
            deadline_of(request),
            HTTP,
        )
        return JSONResponse([v.tolist() for v in result.values])

    @tei
    async def rerank(request: Request) -> Response:
        body = _parse(RerankBody, await request.body())
        if not body.texts:
            raise InvalidInput("texts: at least one text to rank against the query")
        if not body.query:
            raise InvalidInput("query is empty")
        roles = (Role.RERANK,)
        result = await dp.run_task(
            TaskRequest(
                model_for(body.model, roles),
                [(body.query, t) for t in body.texts],
                rid(request, "rerank"),
                truncate=body.truncate,
                raw_scores=body.raw_scores,
            ),
            roles,
            deadline_of(request),
            HTTP,
        )
        scores = np.array([float(v[0]) for v in result.values])
        ranked = []
        for i in np.argsort(-scores, kind="stable").tolist():
            entry = {"index": i, "score": float(scores[i])}
            if body.return_text:
                entry["text"] = body.texts[i]
            ranked.append(entry)
        return JSONResponse(ranked)

    @tei
    async def predict(request: Request) -> Response:
        body = _parse(PredictBody, await request.body())
        name = model_for(body.model, PREDICT_ROLES)
        task = dp.model(name, ready=True).task
        images = task is not None and task.role == Role.IMAGE_CLASSIFY
        raw = body.inputs
        single = isinstance(raw, str) or (not images and bool(raw) and isinstance(raw[0], str))
        if images:  # a base64 image, or a list of them
            items = [raw] if isinstance(raw, str) else raw
            if not all(isinstance(x, str) for x in items):
                raise InvalidInput("inputs: a base64 image, or a list of them")
            inputs = [_image(x, f"inputs[{i}]") for i, x in enumerate(items)]
        else:  # TEI's shapes: a text, [text] or [text, text] (a pair), or a batch of those
            sequences = [raw] if single else raw
            inputs = []
            for i, seq in enumerate(sequences):
                seq = [seq] if isinstance(seq, str) else seq
                if len(seq) not in (1, 2) or not all(isinstance(s, str) for s in seq):
                    raise InvalidInput(f"inputs[{i}]: a text or a pair of texts ([a] or [a, b]), got {len(seq)}")
                inputs.append(seq[0] if len(seq) == 1 else (seq[0], seq[1]))
        result = await dp.run_task(
            TaskRequest(name, inputs, rid(request, "predict"), truncate=body.truncate, raw_scores=body.raw_scores),
            PREDICT_ROLES,
            deadline_of(request),
            HTTP,
        )
        if task.role == Role.TOKEN_CLASSIFY:
            answers = result.values
        else:
            answers = [task.ranked(v) for v in result.values]
        return JSONResponse(answers[0] if single else answers)

    return [
        Route("/embed", embed, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
    ]
