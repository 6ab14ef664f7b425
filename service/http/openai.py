"""An OpenAI-compatible API for the models that generate: `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, with `stream: true` as server-sent events.

Requests are checked by pydantic models (a wrong field answers 400 naming it), turned into the
same GenerateInput the gRPC API builds, and run through the data plane's generate road: the same
validation, admission, deadlines, drain, cancellation and metrics (protocol="openai"). Parameters
OpenAI has and tserve does not implement (n > 1, logprobs, echo, penalties, ...) are refused,
never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.dataplane import OPENAI, DataPlane
from service.errors import FailedPrecondition, InvalidInput, TServeError, short
from service.generation.requests import GenerateInput
from service.generation.sequence import Event, FinishReason
from service.http.errors import handled, openai_body, status_of
from service.http.kserve import deadline_of

openai = handled(openai_body)
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
# OpenAI parameters tserve does not implement, with the values that ask for nothing (accepted)
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # beyond OpenAI, as vLLM accepts it
    ignore_eos: bool = False  # beyond OpenAI, as vLLM accepts it
    min_tokens: int = Field(default=0, ge=0)  # beyond OpenAI, as vLLM accepts it
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise InvalidInput("n must be 1: tserve returns one choice per request")
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
                raise InvalidInput(f"parameter {key!r} is not supported by tserve (got {short(value)})")

    def generate_input(
        self,
        request_id: str,
        text: str | None,
        token_ids: list[int] | None,
        max_tokens: int | None,
        add_special_tokens: bool = True,
    ) -> GenerateInput:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerateInput(
            model=self.model,
            text=text,
            token_ids=token_ids,
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            request_id=request_id,
            add_special_tokens=add_special_tokens,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInput("message content parts must be of type 'text'")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise InvalidInput(f"{where}: {first['msg']}") from None


def _usage(last: Event) -> dict:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.generated_tokens,
        "total_tokens": last.prompt_tokens + last.generated_tokens,
    }


def _sse(doc: dict | str) -> bytes:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def routes(dp: DataPlane) -> list[Route]:
    def request_id(request: Request, prefix: str) -> str:
        return request.headers.get("x-request-id") or f"{prefix}-{uuid.uuid4().hex}"

    async def first_chunk(gen: GenerateInput, request: Request) -> tuple[AsyncIterator[list[Event]], list[Event]]:
        """Start generating and wait for the first chunk, so that a bad request or a refusal
        still answers with its HTTP status instead of a stream that opens and then fails."""
        chunks = dp.generate(gen, deadline_of(request), OPENAI)
        try:
            return chunks, await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise

    async def run(gen: GenerateInput, request: Request, stream: bool, shape_chunk, shape_whole) -> Response:
        chunks, first = await first_chunk(gen, request)
        if not stream:
            async with aclosing(chunks):
                events = first + [e async for chunk in chunks for e in chunk]
            return JSONResponse(shape_whole(events))

        async def body() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                try:
                    yield _sse(shape_chunk(first))
                    async for chunk in chunks:
                        yield _sse(shape_chunk(chunk))
                except TServeError as e:  # after the stream opened: an error event, as OpenAI sends one
                    yield _sse(openai_body(status_of(e), e.message))
            yield _sse("[DONE]")

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @openai
    async def models(request: Request) -> Response:
        data = [{"id": mv.name, "object": "model", "created": 0, "owned_by": "tserve"} for mv in dp.generators()]
        return JSONResponse({"object": "list", "data": data})

    @openai
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await request.body())
        req.refuse_unsupported()
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidInput("prompt: one prompt per request (a list of strings must hold exactly one)")
            prompt = prompt[0]
        rid, created = request_id(request, "cmpl"), int(time.time())
        gen = req.generate_input(
            rid,
            prompt if isinstance(prompt, str) else None,
            prompt if isinstance(prompt, list) else None,
            req.max_tokens,
        )

        def chunk(events: list[Event]) -> dict:
            last = events[-1]
            doc = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(e.text for e in events),
                        "logprobs": None,
                        "finish_reason": FINISH.get(last.finish_reason),
                    }
                ],
            }
            if last.finish_reason is not None:
                doc["usage"] = _usage(last)
            return doc

        def whole(events: list[Event]) -> dict:
            return {**chunk(events), "usage": _usage(events[-1])}

        return await run(gen, request, req.stream, chunk, whole)

    @openai
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatRequest, await request.body())
        req.refuse_unsupported()
        mv = dp.model(req.model, ready=True)
        if mv.generation is None:
            raise FailedPrecondition(f"model {req.model!r} does not generate text")
        template = mv.generation.chat_template
        if template is None:
            raise InvalidInput(
                f"model {req.model!r} has no chat template (its export's tokenizer_config.json has "
                "no chat_template); use /v1/completions with a prompt"
            )
        text = template.render([{"role": m.role, "content": m.text()} for m in req.messages])
        rid, created = request_id(request, "chatcmpl"), int(time.time())
        gen = req.generate_input(rid, text, None, req.max_completion_tokens or req.max_tokens, add_special_tokens=False)
        opened = [False]

        def chunk(events: list[Event]) -> dict:
            last = events[-1]
            delta: dict[str, str] = {"content": "".join(e.text for e in events)}
            if not opened[0]:
                delta, opened[0] = {"role": "assistant", **delta}, True
            doc = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": FINISH.get(last.finish_reason)}
                ],
            }
            if last.finish_reason is not None:
                doc["usage"] = _usage(last)
            return doc

        def whole(events: list[Event]) -> dict:
            last = events[-1]
            message = {"role": "assistant", "content": "".join(e.text for e in events)}
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH.get(last.finish_reason)}
                ],
                "usage": _usage(last),
            }

        return await run(gen, request, req.stream, chunk, whole)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
