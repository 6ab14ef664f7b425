"""The generation API users expect, on third-party decoders with random weights (Optimum exports
of a GPT-2 and a Llama built from a config after a fixed seed; the Llama's tokenizer_config.json
has a chat template), through a real server and the real `openai` client: log-probabilities
against transformers' own logits, penalties against transformers' generate, and structured
output that parses and validates on every sampled request."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import numpy as np
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess

PROMPT = "def forward(self, x):"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(export, llama, tmp_path_factory):
    repo = tmp_path_factory.mktemp("api_repo")
    shutil.copytree(export[1], repo / "gpt2" / "1")
    shutil.copytree(llama[1], repo / "llama" / "1")
    with ServerProcess(repo, "--generation-max-sequences", "8") as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield gen_grpc.TextGenerationStub(channel)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)


def log_softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(logits.double(), -1).numpy()


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_logprobs_equal_transformers_log_softmax(stub, references, model):
    """Greedy with logprobs 3 and prompt_logprobs 3 over gRPC: each token's log-probability
    and its top 3 are transformers' log_softmax at that position, within 1e-4."""
    hf, tokenizer = references[model]
    res = stub.Generate(
        gen.GenerateRequest(
            model=model, text=PROMPT, max_new_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=3
        ),
        timeout=60,
    )
    prompt = tokenizer(PROMPT).input_ids
    ids = prompt + list(res.token_ids)
    with torch.no_grad():
        want = log_softmax(hf(torch.tensor([ids])).logits[0])
    records = list(res.prompt_logprobs) + list(res.logprobs)
    assert [r.token_id for r in records] == ids and not records[0].HasField("logprob")
    got = np.array([r.logprob for r in records[1:]])
    reference = want[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, reference, atol=1e-4)
    for pos, r in enumerate(records[1:]):
        order = np.argsort(-want[pos], kind="stable")[:3]
        np.testing.assert_allclose([t.logprob for t in r.top], want[pos][order], atol=1e-4)
        assert r.top[0].token_id == order[0]
    print(f"{model}: logprobs vs transformers' log_softmax, max abs diff {np.abs(got - reference).max():.1e}")


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_repetition_penalty_gives_transformers_tokens(stub, references, model):
    """Greedy with repetition_penalty 1.5: transformers' generate(repetition_penalty=1.5)."""
    hf, tokenizer = references[model]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :].tolist()
        plain = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, ids.shape[1] :].tolist()
    sampling = gen.SamplingParameters(temperature=0, repetition_penalty=1.5)
    res = stub.Generate(gen.GenerateRequest(model=model, text=PROMPT, max_new_tokens=24, sampling=sampling), timeout=60)
    assert list(res.token_ids) == want[: len(res.token_ids)] and want != plain


def test_openai_client_parses_a_pydantic_model_from_a_random_model(oai):
    """client.chat.completions.parse with a pydantic response_format: the random-weight Llama's
    answer parses into the model, sampled with 8 seeds, alone and all at once."""

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)
        admin: bool

    def ask(seed: int):
        return oai.chat.completions.parse(
            model="llama",
            messages=[{"role": "user", "content": "Who are you?"}],
            response_format=Person,
            max_tokens=80,
            temperature=1.0,
            seed=seed,
        )

    alone = [ask(seed) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    for res in alone:
        person = res.choices[0].message.parsed
        assert isinstance(person, Person) and res.choices[0].finish_reason == "stop"
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert len({r.choices[0].message.content for r in alone}) > 1  # sampled: not one fixed answer


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_every_sampled_output_validates_against_its_schema(stub, model):
    """40 sampled requests per model with a JSON schema (strings, bounded integers, an enum, an
    array, a boolean), 16 at a time beside 8 unconstrained streams: every output parses and
    validates with jsonschema; the unconstrained ones get what they get alone."""
    constrained = gen.StructuredOutput(json_schema=json.dumps(PERSON))

    def ask(seed: int, structured: bool = True) -> gen.GenerateResponse:
        return stub.Generate(
            gen.GenerateRequest(
                model=model,
                text=PROMPT,
                max_new_tokens=100,
                sampling=gen.SamplingParameters(temperature=1.0, seed=seed),
                structured_output=constrained if structured else None,
            ),
            timeout=120,
        )

    free_alone = [list(ask(seed, False).token_ids) for seed in range(8)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, seed) for seed in range(40)]
        free = [pool.submit(ask, seed, False) for seed in range(8)]
        outputs = [f.result() for f in futures]
    valid = 0
    for res in outputs:
        jsonschema.validate(json.loads(res.text), PERSON)
        valid += res.finish_reason == gen.FINISH_REASON_EOS
    print(f"{model}: {len(outputs)}/{len(outputs)} outputs validate, {valid} ended by the grammar")
    assert valid == len(outputs)
    assert [list(f.result().token_ids) for f in free] == free_alone


def test_regex_choice_and_grammar_constraints(oai):
    """vLLM's structured_outputs extras: a regex, a choice, a Lark grammar."""
    regex = oai.completions.create(
        model="gpt2",
        prompt=PROMPT,
        max_tokens=20,
        temperature=1.0,
        seed=1,
        extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[A-Z]{2}"}},
    )
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"
    for seed in range(5):
        choice = oai.completions.create(
            model="gpt2",
            prompt=PROMPT,
            max_tokens=20,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": ["positive", "negative", "neutral"]},
        )
        assert choice.choices[0].text in {"positive", "negative", "neutral"}
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    expr = oai.completions.create(
        model="gpt2", prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"structured_outputs": {"grammar": lark}}
    )
    text = expr.choices[0].text
    assert expr.choices[0].finish_reason in {"stop", "length"} and text.startswith("(")
    if expr.choices[0].finish_reason == "stop":
        assert text.endswith(")") and all(p.isdigit() for p in text[1:-1].split("+"))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            ["schema", "nope"],
        ),
        ({"response_format": {"type": "xml"}}, ["response_format.type"]),
        ({"structured_outputs": {"regex": "(unclosed"}}, ["structured_outputs.regex"]),
        ({"structured_outputs": {"choice": []}}, ["structured_outputs.choice"]),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, ["one constraint"]),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"enum": ["a" * 70000]}},
                }
            },
            ["bytes"],
        ),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_naming_it(oai, body, words):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt2", prompt="x", max_tokens=4, extra_body=body)
    message = e.value.body["message"]
    assert all(w in message for w in words), message


def test_n_choices_are_each_a_seeded_request_of_their_own(oai, stub):
    """n 3 with seed 5: choice i is what one choice with seed 5 + i gives, unary and streamed
    (one chunk per choice, with its index), over both APIs; usage counts every choice's tokens."""
    kw = {"model": "llama", "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0}
    singles = [oai.completions.create(**kw, seed=5 + i).choices[0].text for i in range(3)]
    res = oai.completions.create(**kw, seed=5, n=3, logprobs=1)
    assert [c.index for c in res.choices] == [0, 1, 2] and [c.text for c in res.choices] == singles
    assert res.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in res.choices) == 48
    assert len(set(singles)) == 3
    chunks = list(oai.completions.create(**kw, seed=5, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == singles and chunks[-1].usage.completion_tokens == 48
    chat = oai.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, seed=2, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1] and all(c.message.role == "assistant" for c in chat.choices)
    request = gen.GenerateRequest(
        model="llama",
        text=PROMPT,
        max_new_tokens=16,
        ignore_eos=True,
        n=3,
        sampling=gen.SamplingParameters(temperature=1.0, seed=5),
    )
    unary = stub.Generate(request, timeout=60)
    assert [c.text for c in unary.choices] == singles and unary.text == singles[0]
    assert unary.usage.generated_tokens == 48
    messages = list(stub.GenerateStream(request, timeout=60))
    assert ["".join(m.text for m in messages if m.index == i) for i in range(3)] == singles
    assert sum(m.finish_reason != gen.FINISH_REASON_UNSPECIFIED for m in messages) == 3


def test_n_beyond_the_engines_sequences_is_refused_naming_it(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="llama", prompt="x", max_tokens=2, n=9)
    assert "n is 9" in e.value.body["message"] and "--generation-max-sequences" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as best_of:
        oai.completions.create(model="llama", prompt="x", max_tokens=2, best_of=2)
    assert "best_of" in best_of.value.body["message"] and "n" in best_of.value.body["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def test_tool_messages_render_as_transformers_renders_them(oai, references):
    """A conversation with the tools, an assistant's call (arguments as OpenAI's JSON string) and
    the tool's answer: the prompt is transformers' apply_chat_template(..., tools=...)."""
    _, tokenizer = references["llama"]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'})
    res = oai.chat.completions.create(
        model="llama", messages=messages, tools=[WEATHER, TIME], tool_choice="none", max_tokens=1
    )
    hf_messages = [
        *messages[:1],
        {**messages[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": {"city": "Oslo"}}}]},
        messages[2],
    ]
    want = tokenizer.apply_chat_template(hf_messages, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=True)
    assert res.usage.prompt_tokens == len(want) and res.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_constrained_tool_calls_are_valid_calls_streamed_or_not(oai, choice):
    """tool_choice required or a named function, sampled from the random-weight Llama with 6
    seeds: every answer is finish_reason tool_calls with calls of the request's functions whose
    arguments validate against their parameters; streamed, the same calls as tool-call deltas."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    kw = {"model": "llama", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 300}
    for seed in range(6):
        res = oai.chat.completions.create(**kw, temperature=1.0, seed=seed)
        message = res.choices[0].message
        assert res.choices[0].finish_reason == "tool_calls" and message.content is None and message.tool_calls
        for call in message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(choice, dict):
            assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    stream = list(oai.chat.completions.create(**kw, temperature=1.0, seed=5, stream=True))
    deltas = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls
    ]
    assert stream[-1].choices[0].finish_reason == "tool_calls"
    assert all(not (c.choices[0].delta.content or "") for c in stream if c.choices)


def test_auto_parses_a_hermes_call_out_of_the_text(oai):
    """tool_choice auto on a template that teaches <tool_call> blocks: text the model writes in
    that format comes back as a call (here the model is held to such text by a regex), unary and
    streamed; text that is no call stays content."""
    regex = r'Checking\. <tool_call>\{"name": "get_time", "arguments": \{\}\}</tool_call>'
    kw = {"model": "llama", "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 200}
    res = oai.chat.completions.create(**kw, extra_body={"structured_outputs": {"regex": regex}})
    message = res.choices[0].message
    assert res.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_time", "{}")]
    stream = list(oai.chat.completions.create(**kw, stream=True, extra_body={"structured_outputs": {"regex": regex}}))
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    calls = [d.function.name for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Checking." and "<tool" not in content and calls == ["get_time"]
    plain = oai.chat.completions.create(**kw, extra_body={"structured_outputs": {"regex": "No calls, thanks"}})
    assert plain.choices[0].message.content == "No calls, thanks" and not plain.choices[0].message.tool_calls


def test_a_call_round_trips_through_the_openai_client(oai):
    """The client's own loop: ask, take the call, answer it with a tool message, ask again."""
    first = oai.chat.completions.create(
        model="llama", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True)]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'})
    second = oai.chat.completions.create(model="llama", messages=messages, tools=[WEATHER], max_tokens=8)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens and second.choices[0].message.role == "assistant"
