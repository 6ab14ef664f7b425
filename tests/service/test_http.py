"""HTTP through a real server: KServe v2 with tritonclient.http and raw requests (JSON and
binary tensors), the OpenAI API with the real `openai` client (sync and streaming) and raw
server-sent events, and the same errors, metrics, auth and cancellation as over gRPC."""

from __future__ import annotations

import http.client
import json
import shutil
import time
import urllib.request

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
from tritonclient.utils import InferenceServerException

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY, bytegpt_tokenizer
from service.launcher import ServerProcess

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def http_server(repository, tmp_path_factory):
    """The service repository plus bytegpt again as `bytegpt_chat`, with a chat template."""
    repo = tmp_path_factory.mktemp("http_repo")
    for entry in repository.iterdir():
        (repo / entry.name).symlink_to(entry)
    shutil.copytree(DEFAULT_REPOSITORY / "bytegpt", repo / "bytegpt_chat")
    config = repo / "bytegpt_chat" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "bytegpt"', 'name: "bytegpt_chat"', 1))
    (repo / "bytegpt_chat" / "1" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    with ServerProcess(repo, "--max-message-bytes", str(1 << 20), "--generation-max-sequences", "4") as s:
        yield s


@pytest.fixture(scope="module")
def triton(http_server):
    c = tch.InferenceServerClient(http_server.http_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def oai(http_server):
    return openai.OpenAI(base_url=http_server.http_url + "/v1", api_key="none", max_retries=0)


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, dict(res.getheaders()), data


def infer_input(name: str, array: np.ndarray, binary: bool = True) -> tch.InferInput:
    x = tch.InferInput(name, list(array.shape), "INT64")
    x.set_data_from_numpy(array, binary_data=binary)
    return x


# -- KServe v2 -------------------------------------------------------------------------------


def test_health_metadata_config_and_repository_with_tritonclient_http(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("bytegpt")
    assert not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta["name"] == "tserve" and "model_repository" in meta["extensions"]
    m = triton.get_model_metadata("bytegpt")
    assert m["versions"] == ["1"] and {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]} in m["inputs"]
    config = triton.get_model_config("bytegpt")
    assert config["max_batch_size"] == 32 and config["dynamic_batching"]["max_queue_delay_microseconds"] >= 0
    index = {(e["name"], e.get("version")): e["state"] for e in triton.get_model_repository_index()}
    assert index[("bytegpt", "1")] == "READY"


def test_infer_with_binary_and_json_tensors_equals_grpc(http_server, triton):
    ids = np.random.default_rng(0).integers(0, 256, (2, 11)).astype(np.int64)
    g = tcg.InferenceServerClient(http_server.address)
    want = g.infer("bytegpt", [_grpc_input(ids)], outputs=[tcg.InferRequestedOutput("logits")]).as_numpy("logits")
    g.close()
    for binary_in in (True, False):
        for binary_out in (True, False):
            res = triton.infer(
                "bytegpt",
                [infer_input("input_ids", ids, binary_in)],
                outputs=[tch.InferRequestedOutput("logits", binary_data=binary_out)],
                request_id="r1",
            )
            got = res.as_numpy("logits")
            assert got.shape == (2, 11, BYTEGPT_VOCAB) and res.get_response()["id"] == "r1"
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _grpc_input(ids: np.ndarray) -> tcg.InferInput:
    x = tcg.InferInput("input_ids", list(ids.shape), "INT64")
    x.set_data_from_numpy(ids)
    return x


def test_raw_json_infer_and_statistics(http_server, triton):
    body = json.dumps(
        {
            "id": "j1",
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [[1, 2, 3]]}],
            "outputs": [{"name": "logits"}],
        }
    ).encode()
    status, headers, data = request(http_server, "POST", "/v2/models/bytegpt/versions/1/infer", body)
    doc = json.loads(data)
    assert status == 200 and headers["content-type"] == "application/json"
    assert (
        doc["id"] == "j1"
        and doc["outputs"][0]["shape"] == [1, 3, BYTEGPT_VOCAB]
        and len(doc["outputs"][0]["data"]) == 3 * BYTEGPT_VOCAB
    )
    stats = triton.get_inference_statistics("bytegpt")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1 and isinstance(stats["inference_count"], int)


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, ["not valid JSON"]),
        (
            json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]}),
            400,
            ["input_ids", "2 values", "needs 3"],
        ),
        (
            json.dumps(
                {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, BYTEGPT_VOCAB]}]}
            ),
            400,
            ["input_ids", str(BYTEGPT_VOCAB), "vocabulary"],
        ),
        (
            json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2.5]}]}),
            400,
            ["integers"],
        ),
        (
            json.dumps({"inputs": [{"name": "input_ids", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
            400,
            ["BYTES"],
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input_ids",
                            "datatype": "INT64",
                            "shape": [1, 2],
                            "data": [1, 2],
                            "parameters": {"shared_memory_region": "r"},
                        }
                    ]
                }
            ),
            400,
            ["shared_memory_region"],
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input_ids",
                            "datatype": "INT64",
                            "shape": [1, 2],
                            "parameters": {"binary_data_size": 16},
                        }
                    ]
                }
            ),
            400,
            ["binary_data_size"],
        ),
    ],
)
def test_bad_infer_bodies_get_400_naming_the_problem(http_server, body, status, words):
    code, _, data = request(
        http_server, "POST", "/v2/models/bytegpt/infer", body if isinstance(body, bytes) else body.encode()
    )
    message = json.loads(data)["error"]
    assert code == status and all(w in message for w in words), message


def test_the_same_message_over_http_as_over_grpc(http_server, triton):
    ids = np.array([[1, BYTEGPT_VOCAB + 43]], np.int64)
    with pytest.raises(InferenceServerException) as over_http:
        triton.infer("bytegpt", [infer_input("input_ids", ids)])
    g = tcg.InferenceServerClient(http_server.address)
    with pytest.raises(InferenceServerException) as over_grpc:
        g.infer("bytegpt", [_grpc_input(ids)])
    g.close()
    assert (
        over_http.value.message() == over_grpc.value.message() and str(BYTEGPT_VOCAB + 43) in over_http.value.message()
    )
    status, _, data = request(http_server, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in json.loads(data)["error"]


def test_binary_header_length_mismatch_is_refused(http_server):
    ids = np.ones((1, 2), np.int64)
    header = json.dumps(
        {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}}
            ]
        }
    ).encode()
    status, _, data = request(
        http_server,
        "POST",
        "/v2/models/bytegpt/infer",
        header + ids.tobytes() + b"xx",
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "2 bytes of binary data no input claims" in json.loads(data)["error"]


# -- OpenAI ----------------------------------------------------------------------------------


def test_openai_models_and_completion(oai):
    assert {"bytegpt", "bytegpt_chat"} <= {m.id for m in oai.models.list().data}
    res = oai.completions.create(model="bytegpt", prompt="def f(x):", max_tokens=12, temperature=0)
    assert res.object == "text_completion" and res.choices[0].finish_reason == "length"
    n = len(bytegpt_tokenizer().encode("def f(x):"))
    assert res.usage.prompt_tokens == n and res.usage.completion_tokens == 12 and res.usage.total_tokens == n + 12
    again = oai.completions.create(model="bytegpt", prompt="def f(x):", max_tokens=12, temperature=0)
    assert again.choices[0].text == res.choices[0].text  # greedy is deterministic


def test_openai_completion_equals_grpc_generation(http_server, oai):
    res = oai.completions.create(model="bytegpt", prompt=[100, 101, 102], max_tokens=10, temperature=0.7, seed=3)
    with grpc.insecure_channel(http_server.address) as ch:
        g = gen_grpc.TextGenerationStub(ch).Generate(
            gen.GenerateRequest(
                model="bytegpt",
                token_ids=gen.TokenIds(ids=[100, 101, 102]),
                max_new_tokens=10,
                sampling=gen.SamplingParameters(temperature=0.7, seed=3),
            ),
            timeout=30,
        )
    assert res.choices[0].text == g.text


def test_openai_min_tokens_as_vllm_takes_it(http_server, oai):
    """`min_tokens` (vLLM's extra parameter) reaches the engine as the gRPC field does: the same
    text, and above max_tokens a 400 naming it."""
    res = oai.completions.create(
        model="bytegpt", prompt="x = 1\n", max_tokens=12, temperature=0, extra_body={"min_tokens": 12}
    )
    with grpc.insecure_channel(http_server.address) as ch:
        g = gen_grpc.TextGenerationStub(ch).Generate(
            gen.GenerateRequest(
                model="bytegpt",
                text="x = 1\n",
                max_new_tokens=12,
                min_tokens=12,
                sampling=gen.SamplingParameters(temperature=0),
            ),
            timeout=30,
        )
    assert res.choices[0].text == g.text and res.usage.completion_tokens == g.usage.generated_tokens == 12
    with pytest.raises(openai.BadRequestError) as too_many:
        oai.completions.create(model="bytegpt", prompt="x", max_tokens=2, extra_body={"min_tokens": 3})
    assert "min_tokens" in too_many.value.body["message"]


def test_openai_streaming_matches_the_whole_answer(oai):
    whole = oai.completions.create(model="bytegpt", prompt="import os\n", max_tokens=24, temperature=0)
    chunks = list(
        oai.completions.create(model="bytegpt", prompt="import os\n", max_tokens=24, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # stream_options.include_usage: one more chunk, with no choices and the usage, as OpenAI sends it
    counted = list(
        oai.completions.create(
            model="bytegpt",
            prompt="import os\n",
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in counted[:-1]) and counted[-2].choices[0].finish_reason == "length"


def test_openai_chat_uses_the_model_chat_template(oai):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    res = oai.chat.completions.create(model="bytegpt_chat", messages=messages, max_tokens=6, temperature=0)
    rendered = "<system>be brief\n<user>hi\n<assistant>"
    assert (
        res.usage.prompt_tokens == len(bytegpt_tokenizer().encode(rendered))
        and res.choices[0].message.role == "assistant"
    )
    plain = oai.completions.create(model="bytegpt", prompt=rendered, max_tokens=6, temperature=0)
    assert res.choices[0].message.content == plain.choices[0].text
    stream = list(
        oai.chat.completions.create(model="bytegpt_chat", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == res.choices[0].message.content


def test_openai_errors_have_openai_shape_and_status(http_server, oai):
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in nf.value.body["message"]
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model="bytegpt", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in chat.value.body["message"] and "/v1/completions" in chat.value.body["message"]
    with pytest.raises(openai.BadRequestError) as n:
        oai.completions.create(model="bytegpt", prompt="x", n=0)
    assert n.value.body["message"].startswith("n: ")
    with pytest.raises(openai.BadRequestError) as temp:
        oai.completions.create(model="bytegpt", prompt="x", temperature=-1)
    assert "temperature" in temp.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long_prompt:
        oai.completions.create(model="bytegpt", prompt=[1] * 300, max_tokens=2)  # the context is 256 tokens
    assert "context" in long_prompt.value.body["message"]
    status, _, data = request(
        http_server, "POST", "/v1/completions", b'{"model": "bytegpt", "prompt": "x", "best_of": 3}'
    )
    error = json.loads(data)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and "logprobs" in error["message"]


def model_logits(triton, ids: list[int]) -> np.ndarray:
    """The served graph's own logits [T, vocab] for these tokens, one ModelInfer."""
    x = np.array([ids], np.int64)
    res = triton.infer("bytegpt", [infer_input("input_ids", x)], outputs=[tch.InferRequestedOutput("logits")])
    return res.as_numpy("logits")[0].astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_openai_completion_logprobs_and_echo_are_the_models(oai, triton):
    """logprobs: 3 with echo (OpenAI's legacy shape): every prompt token after the first and
    every generated one carries log_softmax of the model's logits at the position before it
    (ModelInfer on the same server, within 1e-4), the top 3 best first, text offsets that walk
    the echoed text; the first prompt token has none."""
    prompt = "def fibonacci(n):"
    res = oai.completions.create(model="bytegpt", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True)
    choice, lp = res.choices[0], res.choices[0].logprobs
    ids = bytegpt_tokenizer().encode(prompt) + bytegpt_tokenizer().encode(choice.text[len(prompt) :], False)
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) == res.usage.prompt_tokens + 8
    assert "".join(lp.tokens) == choice.text  # ASCII text: each token's own text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = log_softmax(model_logits(triton, ids))
    got = np.array(lp.token_logprobs[1:])
    np.testing.assert_allclose(got, want[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    generated = res.usage.prompt_tokens
    for pos in range(generated, len(ids)):  # greedy: the chosen token is the most likely
        top = lp.top_logprobs[pos]
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert max(top.values()) == pytest.approx(lp.token_logprobs[pos], abs=1e-6)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    # unechoed and streamed: the same log-probabilities for the generated tokens
    chunks = list(
        oai.completions.create(model="bytegpt", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True)
    )
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    np.testing.assert_allclose(streamed, lp.token_logprobs[generated:], atol=1e-6)
    offsets = [x for c in chunks for x in c.choices[0].logprobs.text_offset]
    assert offsets == [o - len(prompt) for o in lp.text_offset[generated:]]


def test_openai_chat_logprobs_carry_bytes_and_alternatives(oai):
    """Chat's logprobs.content: one entry per token, whose bytes join to the message's text,
    with top_logprobs alternatives; the stream carries the same entries."""
    messages = [{"role": "user", "content": "héllo wörld"}]
    kw = {"model": "bytegpt_chat", "messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True}
    res = oai.chat.completions.create(**kw, top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens == 10
    assert bytes(b for e in content for b in e.bytes).decode() == res.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    stream = list(oai.chat.completions.create(**kw, top_logprobs=2, stream=True))
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in content]
    np.testing.assert_allclose([e.logprob for e in entries], [e.logprob for e in content], atol=1e-6)
    plain = oai.chat.completions.create(**{**kw, "logprobs": False})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == res.choices[0].message.content


def test_openai_penalties_and_logit_bias_give_the_reference_tokens(oai, triton):
    """Greedy with logit_bias, repetition_penalty, frequency_penalty and presence_penalty: each
    token is the argmax of the model's logits (ModelInfer) after those processors as the docs
    give them, recomputed here step by step; the log-probabilities are those of the processed
    distribution."""
    tok = bytegpt_tokenizer()
    prompt = tok.encode("class Stack:\n    def push(self, x):")
    banned = int(np.argmax(model_logits(triton, prompt)[-1]))  # what greedy would pick first
    bias = {banned: -100.0, 7: 3.0}
    kw = {"repetition_penalty": 1.3, "frequency_penalty": 0.6, "presence_penalty": 0.4}
    res = oai.completions.create(
        model="bytegpt",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        logprobs=0,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"repetition_penalty": kw["repetition_penalty"], "ignore_eos": True},
        frequency_penalty=kw["frequency_penalty"],
        presence_penalty=kw["presence_penalty"],
    )
    got = tok.encode(res.choices[0].text, False)
    generated, logprobs = [], []
    for _ in range(12):
        z = model_logits(triton, prompt + generated)[-1].astype(np.float32)
        for t, b in bias.items():
            z[t] += b
        seen = np.zeros(len(z), bool)
        seen[prompt + generated] = True
        z = np.where(seen, np.where(z > 0, z / 1.3, z * 1.3), z)
        counts = np.bincount(generated, minlength=len(z)).astype(np.float32)
        z -= counts * 0.6 + (counts > 0) * 0.4
        generated.append(int(np.argmax(z)))
        logprobs.append(float(log_softmax(z.astype(np.float64))[generated[-1]]))
    assert got == generated and banned not in got
    np.testing.assert_allclose(res.choices[0].logprobs.token_logprobs, logprobs, atol=1e-4)
    plain = oai.completions.create(model="bytegpt", prompt=prompt, max_tokens=12, temperature=0)
    assert tok.encode(plain.choices[0].text, False)[0] == banned  # the bias changed something


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"logit_bias": {"4096": 1}}, ["logit_bias", "4096", "vocabulary"]),
        ({"logit_bias": {"5": 101}}, ["logit_bias", "[-100, 100]"]),
        ({"logit_bias": {"five": 1}}, ["logit_bias", "token id"]),
        ({"logprobs": 21}, ["logprobs"]),
        ({"presence_penalty": 2.5}, ["presence_penalty"]),
        ({"repetition_penalty": 0}, ["repetition_penalty"]),
        ({"min_p": 1.5}, ["min_p"]),
        ({"stream_options": {"include_usage": True}}, ["stream_options", "stream"]),
    ],
)
def test_openai_sampling_parameters_out_of_range_are_refused_by_name(http_server, body, words):
    status, _, data = request(
        http_server, "POST", "/v1/completions", json.dumps({"model": "bytegpt", "prompt": "x", **body}).encode()
    )
    message = json.loads(data)["error"]["message"]
    assert status == 400 and all(w in message for w in words), message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"suffix": "x"}, ["suffix", "fill-in-the-middle"]),
        ({"store": True}, ["store", "stores no completions"]),
        ({"service_tier": "flex"}, ["service_tier"]),
        ({"functions": [{"name": "f"}]}, ["functions", "use tools"]),
        ({"modalities": ["text", "audio"]}, ["modalities"]),
    ],
)
def test_openai_parameters_tserve_does_not_implement_are_refused_with_why(http_server, body, words):
    """Never silently ignored; the values that ask for nothing (store false, modalities
    ["text"]) are accepted."""
    status, _, data = request(
        http_server, "POST", "/v1/completions", json.dumps({"model": "bytegpt", "prompt": "x", **body}).encode()
    )
    message = json.loads(data)["error"]["message"]
    assert status == 400 and all(w in message for w in words), message
    ok = {"model": "bytegpt", "prompt": "x", "max_tokens": 2, "store": False, "modalities": ["text"]}
    assert request(http_server, "POST", "/v1/completions", json.dumps(ok).encode())[0] == 200


def test_openai_chat_top_logprobs_needs_logprobs(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="bytegpt_chat", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert "top_logprobs" in e.value.body["message"] and "logprobs" in e.value.body["message"]


def test_grpc_generation_logprobs_equal_openais(http_server, oai):
    """The gRPC API's logprobs and prompt_logprobs: the same figures as the OpenAI API's."""
    prompt = "import os\n"
    res = oai.completions.create(model="bytegpt", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    with grpc.insecure_channel(http_server.address) as channel:
        g = gen_grpc.TextGenerationStub(channel).Generate(
            gen.GenerateRequest(
                model="bytegpt", text=prompt, max_new_tokens=6, logprobs=2, prompt_logprobs=2, request_id="lp"
            ),
            timeout=30,
        )
    lp = res.choices[0].logprobs
    n = len(g.prompt_logprobs)
    assert n == res.usage.prompt_tokens and not g.prompt_logprobs[0].HasField("logprob")
    assert [r.token_id for r in g.logprobs] == list(g.token_ids) and all(len(r.top) == 2 for r in g.logprobs)
    grpc_lps = [r.logprob for r in list(g.prompt_logprobs)[1:] + list(g.logprobs)]
    np.testing.assert_allclose(grpc_lps, lp.token_logprobs[1:], atol=1e-5)


def test_server_sent_events_framing(http_server):
    body = json.dumps(
        {
            "model": "bytegpt",
            "prompt": "def",
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    status, headers, data = request(http_server, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    docs = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and docs[-1]["usage"]["completion_tokens"] == 5


def _metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


def test_a_client_that_disconnects_mid_stream_frees_its_slot(http_server):
    before = _metric(http_server, "tserve_requests_total", api="generate", protocol="openai", reason="cancelled")
    conn = http.client.HTTPConnection("127.0.0.1", http_server.http_port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({"model": "bytegpt", "prompt": "def", "max_tokens": 200, "stream": True}).encode(),
    )
    res = conn.getresponse()
    assert res.status == 200 and res.readline().startswith(b"data: ")
    conn.sock.close()  # gone mid-stream
    conn.close()
    deadline = time.monotonic() + 10
    while _metric(http_server, "tserve_inflight_requests", api="generate", protocol="openai") > 0:
        assert time.monotonic() < deadline, "the stream was never cancelled"
        time.sleep(0.02)
    assert (
        _metric(http_server, "tserve_requests_total", api="generate", protocol="openai", reason="cancelled")
        == before + 1
    )
    assert _metric(http_server, "tserve_generation_active_sequences", model="bytegpt") == 0


def test_metrics_are_labelled_by_protocol(http_server, triton):
    triton.infer("bytegpt", [infer_input("input_ids", np.ones((1, 2), np.int64))])
    assert _metric(http_server, "tserve_requests_total", api="infer", protocol="http", outcome="success") >= 1


def test_http_needs_the_bearer_token_when_auth_is_on(tmp_path):
    token = "h" * 40
    with ServerProcess(DEFAULT_REPOSITORY, env={"TSERVE_AUTH_TOKEN": token}) as server:
        assert request(server, "GET", "/v2/health/ready")[0] == 200  # probes stay open
        for path, method in [("/v2/models/bytegpt", "GET"), ("/v1/models", "GET"), ("/v2/repository/index", "POST")]:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": token}):
                status, h, data = request(server, method, path, b"{}" if method == "POST" else None, headers)
                assert status == 401 and h["www-authenticate"] == "Bearer", (path, headers, data)
        c = openai.OpenAI(base_url=server.http_url + "/v1", api_key=token, max_retries=0)
        assert c.completions.create(model="bytegpt", prompt="x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.http_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_sigterm_lets_an_http_stream_finish_and_refuses_new_ones(tmp_path):
    server = ServerProcess(DEFAULT_REPOSITORY, "--drain-intake-seconds", "0").start()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(
            {
                "model": "bytegpt",
                "prompt": "def",
                "max_tokens": 150,
                "stream": True,
                "temperature": 0,
                "stream_options": {"include_usage": True},
            }
        ).encode(),
    )
    res = conn.getresponse()
    assert res.readline().startswith(b"data: ")
    server.proc.send_signal(15)
    server.wait_health(2)  # NOT_SERVING: the drain has begun
    status, _, data = request(server, "POST", "/v1/completions", b'{"model": "bytegpt", "prompt": "x"}')
    assert status == 503 and "shutting down" in json.loads(data)["error"]["message"]
    rest = res.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"completion_tokens":150' in rest
    assert server.proc.wait(30) == 0
