"""An OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(with `stream: true` as server-sent events) for the models that generate, `POST /v1/embeddings`
for the text embedders (service/tasks/roles.py).

Requests are checked by pydantic models (a wrong field answers 400 naming it), turned into the
same GenerateInput the gRPC API builds, and run through the data plane's generate road: the same
validation, admission, deadlines, drain, cancellation and metrics (protocol="openai").

Implemented: n, logprobs (and echo), penalties, logit_bias, response_format (and vLLM's
structured outputs), tools and tool_choice (generation/tools.py), stream_options.include_usage.
Parameters OpenAI has and tserve does not implement (UNSUPPORTED: best_of, suffix, audio,
modalities, prediction, web_search_options, service_tier, store, metadata, reasoning_effort, the
deprecated functions/function_call) are refused by name with the reason, never silently ignored.

Log-probabilities are those of the distribution each token was drawn from: after logit bias,
penalties and temperature (1 when greedy), before min_p, top_k and top_p cut it (vLLM's
"processed" choice; its default is the raw logits'). A token no distribution allows (-inf) is
reported as -9999.0, as OpenAI does. A token's text is its own bytes decoded (a byte-level BPE
piece of a multi-byte character shows U+FFFD; `bytes` has the exact bytes); a model without a
tokenizer names tokens `token_id:<id>`, as vLLM does.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.dataplane import OPENAI, DataPlane
from service.errors import FailedPrecondition, InvalidInput, TServeError, short
from service.generation.grammar import Constraint
from service.generation.requests import GenerateInput
from service.tasks.roles import Role, TaskRequest
from service.generation.sampling import MAX_TOP_LOGPROBS, TokenLogprob
from service.generation.sequence import Event, FinishReason
from service.generation.tools import HERMES_OPEN, ToolCall, ToolPlan, plan
from service.http.errors import handled, openai_body, status_of
from service.http.kserve import deadline_of
from service.logs import new_id

openai = handled(openai_body)
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
# OpenAI parameters tserve does not implement, with the values that ask for nothing (accepted)
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "reasoning_effort": (None,),
}
WHY = {
    "best_of": "ask for n choices with logprobs and rank them yourself (vLLM dropped best_of too)",
    "suffix": "insertion needs a model trained for fill-in-the-middle",
    "functions": "deprecated by OpenAI: use tools",
    "function_call": "deprecated by OpenAI: use tool_choice",
    "audio": "tserve's models read and write text",
    "modalities": "tserve's models read and write text",
    "prediction": "not implemented (prompt-lookup speculation is: --generation-speculative-tokens)",
    "web_search_options": "tserve does not search the web",
    "service_tier": "tserve has one tier",
    "store": "tserve stores no completions",
    "metadata": "tserve stores no completions to tag",
    "reasoning_effort": "tserve's models have no reasoning budget to set",
}
NO_LOGPROB = -9999.0  # what OpenAI reports for a token no distribution allows


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False  # a last chunk with no choices and the usage


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
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)  # beyond OpenAI, as vLLM accepts it
    min_p: float | None = Field(default=None, ge=0, le=1)  # beyond OpenAI, as vLLM accepts it
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias
    response_format: dict[str, Any] | None = None
    # vLLM's structured outputs: the current form, and the guided_* parameters before it
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> Constraint | None:
        """What the output is constrained to, from whichever parameter asks (at most one)."""
        asked: list[Constraint] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                asked.append(Constraint("json_object"))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise InvalidInput("response_format.json_schema: an object with a 'schema' object")
                asked.append(Constraint("json_schema", spec.get("schema", {}), "response_format.json_schema.schema"))
            elif kind != "text":
                raise InvalidInput(f"response_format.type: 'text', 'json_object' or 'json_schema' (got {short(kind)})")
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        for key, value in (self.structured_outputs or {}).items():
            if key in guided and value is not None:
                guided[key] = value
            elif key == "json_object" and value:
                asked.append(Constraint("json_object", where="structured_outputs.json_object"))
            elif key not in {"whitespace_pattern", "disable_any_whitespace", "disable_additional_properties"}:
                raise InvalidInput(
                    f"structured_outputs.{key}: not a constraint tserve knows (json, regex, choice, grammar)"
                )
        for key, value in guided.items():
            if value is None:
                continue
            where = f"structured_outputs.{key}"
            if key == "json":
                try:
                    schema = json.loads(value) if isinstance(value, str) else value
                except json.JSONDecodeError as e:
                    raise InvalidInput(f"{where}: not JSON ({e})") from None
                asked.append(Constraint("json_schema", schema, where))
            else:
                asked.append(Constraint(key, value, where))
        if len(asked) > 1:
            raise InvalidInput(f"{', '.join(c.where for c in asked)}: one constraint per request")
        return asked[0] if asked else None

    def refuse_unsupported(self) -> None:
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
                why = WHY.get(key, "")
                raise InvalidInput(
                    f"parameter {key!r} is not supported by tserve (got {short(value)})" + (f": {why}" if why else "")
                )
        if self.stream_options is not None and not self.stream:
            raise InvalidInput("stream_options: only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidInput(f"logit_bias: key {short(key)} is not a token id") from None
        return bias

    def generate_input(
        self,
        request_id: str,
        text: str | None,
        token_ids: list[int] | None,
        max_tokens: int | None,
        add_special_tokens: bool = True,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
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
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.token_bias(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint or self.constraint(),
            n=self.n,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy shape: top k
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None  # None: an assistant message of tool calls
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def rendered(self) -> dict:
        """The message as a chat template reads it (transformers' shapes: a call's arguments
        as an object, where OpenAI sends them as a JSON string)."""
        doc: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for i, call in enumerate(self.tool_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidInput(f"tool_calls[{i}]: {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
                arguments = function.get("arguments", "{}")
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError:
                    raise InvalidInput(f"tool_calls[{i}].function.arguments: not JSON") from None
                calls.append(
                    {"id": call.get("id"), "type": "function", "function": {**function, "arguments": arguments}}
                )
            doc["tool_calls"] = calls
        if self.tool_call_id is not None:
            doc["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            doc["name"] = self.name
        return doc

    def text(self) -> str:
        if self.content is None:
            return ""
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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("top_logprobs: only allowed when logprobs is true")
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool = False  # beyond OpenAI (TEI's and vLLM's): cut a text past the model's limit
    normalize: bool = True  # beyond OpenAI (TEI's)

    def inputs(self) -> list:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # one text, as token ids
        return list(self.input)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise InvalidInput(f"{where}: {first['msg']}") from None


def _usage(finals: list[Event]) -> dict:
    """The request's usage from each choice's last event: the prompt once, every choice's tokens."""
    prompt, completion = finals[0].prompt_tokens, sum(e.generated_tokens for e in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def by_choice(events: list[Event]) -> dict[int, list[Event]]:
    """A chunk's events, choice by choice (in index order)."""
    out: dict[int, list[Event]] = {}
    for e in sorted(events, key=lambda e: e.index):
        out.setdefault(e.index, []).append(e)
    return out


def _logprob(value: float) -> float:
    return value if value > NO_LOGPROB else NO_LOGPROB


class TokenTexts:
    """Each token's text and bytes, for log-probabilities: from the model's tokenizer, else
    `token_id:<id>` (vLLM's form for a model without one)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token) if self.tokenizer is not None else f"token_id:{token}".encode()

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def chat(self, records: list[TokenLogprob]) -> list[dict]:
        """Chat's `logprobs.content` entries."""

        def entry(token: int, logprob: float) -> dict:
            raw = self.bytes(token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": _logprob(logprob), "bytes": list(raw)}

        return [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]} for r in records]

    def legacy(self, records: list[TokenLogprob], offset: int) -> dict:
        """Completions' legacy `logprobs`: tokens, token_logprobs, top_logprobs, text_offset
        (each token's character offset in the choice's text, from `offset`)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for r in records:
            text = self.text(r.token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if r.logprob is None:  # a prompt's first token (echo): nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                out["token_logprobs"].append(_logprob(r.logprob))
                out["top_logprobs"].append({self.text(t): _logprob(lp) for t, lp in r.top})
        return out


class CallStream:
    """One choice's text when its output may hold tool calls: content streams until a call may
    begin (a whole-message JSON call, or the template's call marker), and is held from there;
    the calls are read at the end."""

    def __init__(self, tools: ToolPlan, style: str | None) -> None:
        self.tools, self.style = tools, style
        self.text, self.sent, self.holding = "", 0, tools.constrained

    def push(self, new: str) -> str:
        """The content that may stream now."""
        self.text += new
        if self.holding:
            return ""
        if not self.sent and (not self.text.strip() or self.text.lstrip().startswith("{")):
            self.holding = self.text.lstrip().startswith("{")  # perhaps one JSON call: wait for all of it
            return ""
        safe = len(self.text)
        if self.style == "hermes":
            at = self.text.find(HERMES_OPEN, self.sent)
            if at != -1:
                self.holding, safe = True, at
            else:  # the start of a marker may be arriving
                safe -= next((k for k in range(len(HERMES_OPEN) - 1, 0, -1) if self.text.endswith(HERMES_OPEN[:k])), 0)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self, finish: str | None) -> tuple[str, list[ToolCall]]:
        """At the choice's end: (the content not yet streamed, the calls)."""
        content, calls = self.read(self.text, finish)
        return ("", calls) if calls else (self.text[self.sent :], [])

    def read(self, text: str, finish: str | None) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; an output cut short (length) stays text."""
        if finish != "stop":
            return text, []
        try:
            return self.tools.calls(text, self.style)
        except (ValueError, KeyError, TypeError):  # not the calls it should be: left as text
            return text, []


def _sse(doc: dict | str) -> bytes:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def routes(dp: DataPlane) -> list[Route]:
    def request_id(request: Request, prefix: str) -> str:
        return request.headers.get("x-request-id") or new_id(prefix)

    async def first_chunk(gen: GenerateInput, request: Request) -> tuple[AsyncIterator[list[Event]], list[Event]]:
        """Start generating and wait for the first chunk, so that a bad request or a refusal
        still answers with its HTTP status instead of a stream that opens and then fails."""
        chunks = dp.generate(gen, deadline_of(request), OPENAI)
        try:
            return chunks, await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise

    async def run(
        gen: GenerateInput, request: Request, req: _Sampling, shape_chunk, shape_whole, shape_usage
    ) -> Response:
        chunks, first = await first_chunk(gen, request)
        if not req.stream:
            async with aclosing(chunks):
                events = first + [e async for chunk in chunks for e in chunk]
            return JSONResponse(shape_whole(events))

        async def body() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                try:
                    finals = [e for e in first if e.finish_reason is not None]
                    for doc in shape_chunk(first):  # one chunk per choice, as OpenAI streams n > 1
                        yield _sse(doc)
                    async for chunk in chunks:
                        finals += [e for e in chunk if e.finish_reason is not None]
                        for doc in shape_chunk(chunk):
                            yield _sse(doc)
                    if req.include_usage:  # OpenAI's last chunk: no choices, the usage
                        yield _sse({**shape_usage(), "choices": [], "usage": _usage(finals)})
                except TServeError as e:  # after the stream opened: an error event, as OpenAI sends one
                    yield _sse(openai_body(status_of(e), e.message))
            yield _sse("[DONE]")

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @openai
    async def models(request: Request) -> Response:
        served = {mv.name for mv in [*dp.generators(), *dp.task_models(Role.EMBED)]}
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "tserve"} for name in sorted(served)]
        return JSONResponse({"object": "list", "data": data})

    def generator(name: str):
        mv = dp.model(name, ready=True)
        if mv.generation is None:
            raise FailedPrecondition(f"model {name!r} does not generate text")
        return mv.generation

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
        config = generator(req.model)
        texts = TokenTexts(config.tokenizer)
        echo_logprobs = req.echo and req.logprobs is not None
        gen = req.generate_input(
            rid,
            prompt if isinstance(prompt, str) else None,
            prompt if isinstance(prompt, list) else None,
            req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if echo_logprobs else None,
        )
        echoed = ""
        if req.echo:
            echoed = (
                prompt if isinstance(prompt, str) else (config.tokenizer.decode(prompt) if config.tokenizer else "")
            )
        sent: dict[int, int] = {}  # each choice's text so far, in characters (text_offset counts from it)

        def choice(index: int, events: list[Event]) -> dict:
            text = "".join(e.text for e in events)
            records = [r for e in events for r in e.logprobs]
            if req.echo and index not in sent:  # the choice's first text: the prompt before it
                text = echoed + text
                if echo_logprobs:
                    records = (events[0].prompt_logprobs or []) + records
            offset = sent.get(index, 0)
            sent[index] = offset + len(text)
            finish = FINISH.get(events[-1].finish_reason)
            logprobs = texts.legacy(records, offset) if req.logprobs is not None else None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def head() -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model}

        def chunk(events: list[Event]) -> list[dict]:
            return [{**head(), "choices": [choice(i, evs)]} for i, evs in by_choice(events).items()]

        def whole(events: list[Event]) -> dict:
            choices = [choice(i, evs) for i, evs in by_choice(events).items()]
            return {**head(), "choices": choices, "usage": _usage([e for e in events if e.finish_reason])}

        return await run(gen, request, req, chunk, whole, head)

    @openai
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatRequest, await request.body())
        req.refuse_unsupported()
        config = generator(req.model)
        template = config.chat_template
        if template is None:
            raise InvalidInput(
                f"model {req.model!r} has no chat template (its export's tokenizer_config.json has "
                "no chat_template); use /v1/completions with a prompt"
            )
        k = req.logprobs_k()
        texts = TokenTexts(config.tokenizer)
        tools = plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        constraint = None
        if tools is not None and tools.constrained:
            if req.constraint() is not None:
                raise InvalidInput("tool_choice and response_format both constrain the output: ask for one")
            constraint = Constraint("json_schema", tools.schema(), "tools")
        calling = tools is not None and tools.choice != "none"  # the output may hold calls
        text = template.render([m.rendered() for m in req.messages], tools.tools if tools else None)
        rid, created = request_id(request, "chatcmpl"), int(time.time())
        gen = req.generate_input(
            rid,
            text,
            None,
            req.max_completion_tokens or req.max_tokens,
            add_special_tokens=False,
            logprobs=k,
            constraint=constraint,
        )
        opened: set[int] = set()  # the choices whose first delta (with the role) went out
        streams: dict[int, CallStream] = {}

        def logprobs(events: list[Event]) -> dict | None:
            if k is None:
                return None
            return {"content": texts.chat([r for e in events for r in e.logprobs]), "refusal": None}

        def head(kind: str = "chat.completion.chunk") -> dict:
            return {"id": rid, "object": kind, "created": created, "model": req.model}

        def delta(index: int, events: list[Event]) -> dict:
            new, finish = "".join(e.text for e in events), FINISH.get(events[-1].finish_reason)
            content: dict[str, Any] = {"content": new}
            if calling:  # content streams until a call may begin; the calls go out at the end
                stream = streams.setdefault(index, CallStream(tools, template.tool_style))
                content = {"content": stream.push(new)}
                if finish is not None:
                    rest, calls = stream.finish(finish)
                    content["content"] += rest
                    if calls:
                        content["tool_calls"] = [c.openai(i) for i, c in enumerate(calls)]
                        finish = "tool_calls"
            if index not in opened:
                opened.add(index)
                content = {"role": "assistant", **content}
            return {"index": index, "delta": content, "logprobs": logprobs(events), "finish_reason": finish}

        def chunk(events: list[Event]) -> list[dict]:
            return [{**head(), "choices": [delta(i, evs)]} for i, evs in by_choice(events).items()]

        def whole(events: list[Event]) -> dict:
            choices = []
            for i, evs in by_choice(events).items():
                content, finish = "".join(e.text for e in evs), FINISH.get(evs[-1].finish_reason)
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calling:
                    content, calls = CallStream(tools, template.tool_style).read(content, finish)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
                        finish = "tool_calls"
                choices.append({"index": i, "message": message, "logprobs": logprobs(evs), "finish_reason": finish})
            return {
                **head("chat.completion"),
                "choices": choices,
                "usage": _usage([e for e in events if e.finish_reason]),
            }

        return await run(gen, request, req, chunk, whole, head)

    @openai
    async def embeddings(request: Request) -> Response:
        req = _parse(EmbeddingRequest, await request.body())
        rid = request_id(request, "embd")
        result = await dp.run_task(
            TaskRequest(
                req.model, req.inputs(), rid, truncate=req.truncate, normalize=req.normalize, dimensions=req.dimensions
            ),
            (Role.EMBED,),
            deadline_of(request),
            OPENAI,
        )

        def encoded(v: np.ndarray):
            if req.encoding_format == "base64":  # little-endian float32, as the openai client decodes it
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
            return v.astype(np.float32).tolist()

        data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(result.values)]
        usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
        return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": usage})

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
