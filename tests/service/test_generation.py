"""Streaming generation through a real server: order, determinism, reference parity,
cancellation, concurrency, bounds and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from model.transformer import load_checkpoint
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess, outcome_codes
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_CHECKPOINT, DEFAULT_REPOSITORY, ROOT, bytegpt_text, bytegpt_tokenizer

EOS = json.loads((DEFAULT_REPOSITORY / "bytegpt" / "1" / "manifest.json").read_text())["generation"]["eos_token_id"]

PROMPT = "def fibonacci(n):"


def make(prompt: str | list[int] = PROMPT, model: str = "bytegpt", **kw) -> gen.GenerateRequest:
    sampling = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in kw}
    req = gen.GenerateRequest(model=model, sampling=gen.SamplingParameters(**sampling), **kw)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield gen_grpc.TextGenerationStub(channel)
    channel.close()


def metric(server, name: str, model: str = "bytegpt") -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"'):
            return float(line.split()[-1])
    raise KeyError(name)


def test_stream_is_ordered_and_complete(stub):
    messages = list(stub.GenerateStream(make(max_new_tokens=40, temperature=0.8, seed=3), timeout=60))
    assert all(len(m.token_ids) >= 1 for m in messages)
    assert [m.finish_reason for m in messages[:-1]] == [gen.FINISH_REASON_UNSPECIFIED] * (len(messages) - 1)
    last = messages[-1]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(
        bytegpt_tokenizer().encode(PROMPT)
    ) and last.usage.generated_tokens == 40 == sum(len(m.token_ids) for m in messages)
    assert (
        last.timings.time_to_first_token_seconds > 0
        and last.timings.total_seconds >= last.timings.time_to_first_token_seconds
    )
    unary = stub.Generate(make(max_new_tokens=40, temperature=0.8, seed=3), timeout=60)
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert unary.text == bytegpt_text(unary.token_ids)


def test_greedy_equals_the_pytorch_reference(stub):
    model, _ = load_checkpoint(str(DEFAULT_CHECKPOINT))
    for prompt in (PROMPT, "import os\n", "class Stack:"):
        ids = bytegpt_tokenizer().encode(prompt)
        reference = model.generate(ids, 48)
        served = stub.Generate(make(prompt, max_new_tokens=48), timeout=60)
        assert list(served.token_ids) == reference, prompt


def test_seeded_request_is_identical_alone_and_in_a_busy_batch(server, stub):
    request = make("class Stack:", max_new_tokens=48, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = stub.Generate(request, timeout=60).token_ids
    results: dict[int, list[int]] = {}
    noise = [make(f"x = {i}\n" * (i + 1), max_new_tokens=60 - i, temperature=1.0, seed=i) for i in range(12)]

    def call(i, req):
        results[i] = stub.Generate(req, timeout=120)

    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate(noise)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # join while the others are mid-flight
    busy = stub.Generate(request, timeout=120).token_ids
    for t in threads:
        t.join(120)
    assert list(busy) == list(alone)
    for i in range(12):  # each ran to its own length, or ended on the end-of-text token
        r = results[i]
        assert (r.finish_reason, len(r.token_ids)) == (gen.FINISH_REASON_LENGTH, 60 - i) or (
            r.finish_reason == gen.FINISH_REASON_EOS and r.token_ids[-1] == 256
        )


def test_32_concurrent_streams_finish_with_the_right_lengths(server, stub):
    lengths = {i: 8 + (i * 7) % 50 for i in range(32)}
    eos_ended: list[int] = []
    errors: list[Exception] = []

    def call(i):
        try:
            msgs = list(
                stub.GenerateStream(
                    make(f"# {i}\n", max_new_tokens=lengths[i], temperature=0.7, top_k=40, seed=i), timeout=120
                )
            )
            tokens = [t for m in msgs for t in m.token_ids]
            assert msgs[-1].usage.generated_tokens == len(tokens)
            if msgs[-1].finish_reason == gen.FINISH_REASON_EOS:  # sampled <|endoftext|>: shorter, ends on it
                assert len(tokens) <= lengths[i] and tokens[-1] == EOS and EOS not in tokens[:-1], f"stream {i}"
                eos_ended.append(i)
            else:
                assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH and len(tokens) == lengths[i], f"stream {i}"
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert len(eos_ended) <= 8  # most run to their own length (seeded: the same every run)
    assert metric(server, "tserve_generation_active_sequences") == 0


def test_cancelling_a_stream_frees_its_slot(server, stub):
    call = stub.GenerateStream(make(max_new_tokens=200, temperature=0.8, seed=5), timeout=60)
    for i, _ in enumerate(call):
        if i == 2:
            assert metric(server, "tserve_generation_active_sequences") >= 1
            call.cancel()
            break
    deadline = time.monotonic() + 5
    while metric(server, "tserve_generation_active_sequences") != 0:
        assert time.monotonic() < deadline, "the cancelled sequence kept its slot"
        time.sleep(0.01)
    assert metric(server, "tserve_generation_kv_cache_bytes") == 0
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'tserve_generation_finished_total{model="bytegpt",reason="cancelled",version="1"}' in text


def test_deadline_stops_the_sequence(server, stub):
    # keep the engine busy so the request cannot finish inside its deadline
    busy = [stub.Generate.future(make(max_new_tokens=200, temperature=0.5, seed=i), timeout=60) for i in range(8)]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(make(max_new_tokens=230, temperature=0.5, seed=2), timeout=0.05))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(f.result().usage.generated_tokens > 0 for f in busy)
    deadline = time.monotonic() + 5
    while metric(server, "tserve_generation_active_sequences") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_stop_sequences_end_the_text_before_them(stub):
    full = stub.Generate(make(max_new_tokens=60), timeout=60).text
    stop = full[20:23]
    cut = full.find(stop)
    res = stub.Generate(make(max_new_tokens=60, stop=[stop]), timeout=60)
    assert res.finish_reason == gen.FINISH_REASON_STOP
    assert res.text == full[:cut] and stop not in res.text


def test_token_id_prompts_and_the_int8_model(stub):
    ids = bytegpt_tokenizer().encode(PROMPT)
    res = stub.Generate(make(ids, model="bytegpt_int8", max_new_tokens=10), timeout=60)
    assert len(res.token_ids) == 10 and res.usage.prompt_tokens == len(ids)


BAD = {
    "empty prompt": (make(""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "empty token ids": (make([]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "prompt longer than the context": (make([1] * 300), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    "max_new_tokens beyond the context": (make(max_new_tokens=250), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    "max_new_tokens zero": (make(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    "negative temperature": (make(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "top_p zero": (make(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "top_p above one": (make(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "negative top_k": (make(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "min_tokens above max_new_tokens": (
        make(max_new_tokens=4, min_tokens=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_tokens",
    ),
    "token id outside the vocabulary": (
        make([1, 2, BYTEGPT_VOCAB + 7]),
        grpc.StatusCode.INVALID_ARGUMENT,
        str(BYTEGPT_VOCAB + 7),
    ),
    "unknown model": (make(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "not a decoder": (make(model="encoder"), grpc.StatusCode.FAILED_PRECONDITION, "decoder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generation_requests(stub, case):
    req, code, word = BAD[case]
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(req, timeout=30)
        assert info.value.code() == code and word in info.value.details(), info.value.details()
    assert stub.Generate(make(max_new_tokens=3), timeout=30).usage.generated_tokens == 3


def test_generation_queue_bound(tmp_path):
    with ServerProcess(DEFAULT_REPOSITORY, "--generation-max-sequences", "1", "--generation-max-queue", "1") as server:
        with grpc.insecure_channel(server.address) as ch:
            stub = gen_grpc.TextGenerationStub(ch)
            calls = [
                stub.Generate.future(make(max_new_tokens=200, temperature=0.5, seed=i), timeout=60) for i in range(4)
            ]
            codes = outcome_codes(calls)
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes


def test_cli_streams_a_completion(server):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "generate",
            PROMPT,
            "--url",
            server.address,
            "--max-new-tokens",
            "12",
            "--seed",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(PROMPT) and len(res.stdout.encode()) > len(PROMPT)
    assert f"length: {len(bytegpt_tokenizer().encode(PROMPT))} prompt + 12 generated tokens" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "service", "generate", "", "--url", server.address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "INVALID_ARGUMENT" in res.stderr


def test_speculative_decoding_serves_greedys_tokens_several_a_message():
    """--generation-speculative-tokens: prompt-lookup drafts checked by the fused graph. Each
    stream alone gives PyTorch's greedy tokens; a step's kept draft arrives as one message; the
    draft counters say how many were proposed and kept."""
    model, _ = load_checkpoint(str(DEFAULT_CHECKPOINT))
    with ServerProcess(DEFAULT_REPOSITORY, "--generation-speculative-tokens", "8") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            for prompt in (PROMPT, "import os\n", "class Stack:"):
                messages = list(stub.GenerateStream(make(prompt, max_new_tokens=64, ignore_eos=True), timeout=60))
                assert [t for m in messages for t in m.token_ids] == model.generate(
                    bytegpt_tokenizer().encode(prompt), 64
                )
                assert max(len(m.token_ids) for m in messages) > 1, prompt
        kept, proposed = (
            metric(server, f"tserve_generation_{name}_total") for name in ("accepted_draft_tokens", "draft_tokens")
        )
        assert 0 < kept <= proposed


def test_stream_interval_sends_tokens_several_a_message():
    """--generation-stream-interval 4: messages of at least 4 tokens after the first (more if
    the reader fell behind), the last with the finish; the same tokens. (The first token going
    at once is the engine test's: a slow reader may take it with the next four.)"""
    with ServerProcess(DEFAULT_REPOSITORY, "--generation-stream-interval", "4") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            messages = list(stub.GenerateStream(make(max_new_tokens=30, ignore_eos=True), timeout=60))
            unary = stub.Generate(make(max_new_tokens=30, ignore_eos=True), timeout=60)
    sizes = [len(m.token_ids) for m in messages]
    assert all(n >= 4 for n in sizes[1:-1]) and len(messages) <= 2 + 29 // 4
    assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text


def test_prefix_caching_is_on_by_default_and_changes_no_output():
    """The defaults: a request whose prompt starts like an earlier one's restores that prefix
    (the metrics count it) and gets what a server with prefix caching off gives, greedy and
    seeded; the tokens of the shared preamble are prefilled once."""
    preamble = "# utils.py: small helpers over strings and lists, each with a docstring and a test.\n" * 2
    asks = [
        make(preamble + "def first(xs):", max_new_tokens=24, temperature=0.0),
        make(preamble + "def last(xs):", max_new_tokens=24, temperature=0.0),
        make(preamble + "def middle(xs):", max_new_tokens=24, temperature=0.9, seed=3),
    ]
    outputs = {}
    for name, args in (("on", ()), ("off", ("--generation-prefix-cache-bytes", "0"))):
        with ServerProcess(DEFAULT_REPOSITORY, *args) as s, grpc.insecure_channel(s.address) as ch:
            stub = gen_grpc.TextGenerationStub(ch)
            outputs[name] = [list(stub.Generate(req, timeout=60).token_ids) for req in asks]
            outputs[name + " restored"] = metric(s, "tserve_generation_prefix_cache_hit_tokens_total")
            outputs[name + " queried"] = metric(s, "tserve_generation_prefix_cache_queried_tokens_total")
    assert outputs["on"] == outputs["off"]
    tokenizer = bytegpt_tokenizer()
    prompts = [tokenizer.encode(r.text, False) for r in asks]
    common = min(next(i for i, (a, b) in enumerate(zip(prompts[0], p)) if a != b) for p in prompts[1:])
    assert common >= 32  # the preamble is two blocks of 16 at least
    assert outputs["on restored"] == 2 * (common // 16 * 16)  # the full blocks of the shared start, twice
    assert outputs["on queried"] == sum(map(len, prompts))
    assert outputs["off restored"] == outputs["off queried"] == 0
