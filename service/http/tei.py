"""Hugging Face text-embeddings-inference's routes, for clients written against TEI:
`POST /embed` (`inputs`: a text or a list; `normalize`, `truncate`, `dimensions`) answering a
list of vectors. TEI serves one model per process; tserve serves a repository, so the body may
name one with `model`, and must when more than one embedder is loaded. Errors are TEI-shaped
(`{"error": ..., "error_type": ...}`) with the status each error maps to everywhere.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.dataplane import HTTP, DataPlane
from service.embeddings import EmbedRequest
from service.errors import InvalidInput
from service.http.errors import handled, tei_body
from service.http.kserve import deadline_of

tei = handled(tei_body)


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    normalize: bool = True
    truncate: bool = False
    truncation_direction: str = "Right"
    dimensions: int | None = Field(default=None, ge=1)
    prompt_name: str | None = None


def _parse(body: bytes) -> EmbedBody:
    try:
        return EmbedBody.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise InvalidInput(f"{where}: {first['msg']}") from None


def routes(dp: DataPlane) -> list[Route]:
    def model_for(name: str | None) -> str:
        if name:
            return name
        names = [mv.name for mv in dp.embedders()]
        if len(names) != 1:
            raise InvalidInput(
                f"model: the repository serves {len(names)} embedders ({', '.join(names) or 'none'}); name one"
            )
        return names[0]

    @tei
    async def embed(request: Request) -> Response:
        body = _parse(await request.body())
        if body.truncation_direction != "Right":
            raise InvalidInput("truncation_direction: tserve truncates on the right")
        if body.prompt_name is not None:
            raise InvalidInput("prompt_name: tserve applies no prompts (send the text with its prompt)")
        inputs: list[Any]
        if isinstance(body.inputs, str):
            inputs = [body.inputs]
        elif body.inputs and isinstance(body.inputs[0], int):
            inputs = [body.inputs]
        else:
            inputs = list(body.inputs)
        rid = request.headers.get("x-request-id") or f"embed-{uuid.uuid4().hex}"
        result = await dp.embed(
            EmbedRequest(
                model_for(body.model),
                inputs,
                rid,
                truncate=body.truncate,
                normalize=body.normalize,
                dimensions=body.dimensions,
            ),
            deadline_of(request),
            HTTP,
        )
        return JSONResponse([v.tolist() for v in result.vectors])

    return [Route("/embed", embed, methods=["POST"])]
