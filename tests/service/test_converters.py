"""Protobuf <-> domain conversion, in-process: round trips for every datatype, both content
encodings, and the wire-level checks made before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.generated import generation_pb2 as gen
from service.generated import grpc_service_pb2 as pb
from service.generation.requests import GenerationConfig, to_sequence
from service.generation.sequence import Event, FinishReason
from service.servicers import converters
from service.types import DATATYPES, InferResponse

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

TYPED = [dt for dt in DATATYPES if dt in converters.CONTENTS_FIELD]


def array_of(datatype: str, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=shape) * 50).astype(DATATYPES[datatype]) if datatype != "BOOL" else rng.random(shape) > 0.5


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_raw_contents_round_trip(datatype):
    a = array_of(datatype)
    req = pb.ModelInferRequest(model_name="m", id="x")
    req.inputs.add(name="t", datatype=datatype, shape=a.shape)
    req.raw_input_contents.append(a.tobytes())
    got = converters.infer_request_from_proto(req).inputs["t"]
    assert got.dtype == a.dtype and np.array_equal(got, a)

    res = converters.infer_response_to_proto(InferResponse("m", "1", "x", {"t": got}))
    out = res.outputs[0]
    assert out.datatype == datatype and list(out.shape) == list(a.shape)
    assert np.array_equal(np.frombuffer(res.raw_output_contents[0], DATATYPES[datatype]).reshape(a.shape), a)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_contents_decode(datatype):
    a = array_of(datatype)
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="t", datatype=datatype, shape=a.shape)
    getattr(t.contents, converters.CONTENTS_FIELD[datatype]).extend(a.ravel().tolist())
    got = converters.infer_request_from_proto(req).inputs["t"]
    assert got.dtype == a.dtype and np.array_equal(got, a)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), "holds 7 bytes"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -1), "negative dimension"),
        (lambda r: setattr(r.inputs[0], "datatype", "BF17"), "unsupported datatype"),
        (lambda r: r.raw_input_contents.append(b""), "2 entries for 1 inputs"),
        (
            lambda r: (r.inputs.add(name="t", datatype="INT64", shape=[1]), r.raw_input_contents.append(b"\0" * 8)),
            "appears twice",
        ),
    ],
)
def test_malformed_requests_are_refused(mutate, message):
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="t", datatype="INT64", shape=[1, 2])
    req.raw_input_contents.append(np.ones((1, 2), np.int64).tobytes())
    mutate(req)
    with pytest.raises(InvalidInput, match=message):
        converters.infer_request_from_proto(req)


def test_requested_outputs_come_back_in_the_order_asked():
    res = InferResponse("m", "1", "x", {"a": np.zeros(1, np.float32), "b": np.ones(2, np.int64)})
    assert [o.name for o in converters.infer_response_to_proto(res, ("b", "a")).outputs] == ["b", "a"]


def test_generate_request_round_trip():
    req = gen.GenerateRequest(
        model="m",
        text="hi",
        max_new_tokens=5,
        stop=["\n"],
        request_id="r",
        sampling=gen.SamplingParameters(temperature=0.5, top_k=3, seed=9),
    )
    got = converters.generate_input_from_proto(req)
    assert (got.model, got.text, got.token_ids, got.max_new_tokens, got.stop) == ("m", "hi", None, 5, ["\n"])
    assert (got.temperature, got.top_k, got.top_p, got.seed) == (0.5, 3, None, 9)
    req = gen.GenerateRequest(model="m", token_ids=gen.TokenIds(ids=[1, 2]))
    got = converters.generate_input_from_proto(req)
    assert got.text is None and got.token_ids == [1, 2] and got.max_new_tokens is None and got.temperature is None
    assert not got.ignore_eos


def test_ignore_eos_reaches_the_sequence():
    """`ignore_eos` (vLLM's name): the sequence gets no end-of-sequence ids, so it runs to its
    max_new_tokens (the engine test shows an eos id ending a sequence)."""
    config = GenerationConfig(tokenizer=None, eos_token_ids=frozenset({0}), max_context=64, vocab_size=10)
    for flag, eos in ((False, {0}), (True, set())):
        req = converters.generate_input_from_proto(
            gen.GenerateRequest(model="m", token_ids=gen.TokenIds(ids=[1, 2]), max_new_tokens=5, ignore_eos=flag)
        )
        seq = to_sequence(config, req, default_max_new_tokens=8, deadline=None)
        assert req.ignore_eos == flag and seq.eos_token_ids == eos and seq.max_new_tokens == 5


def test_min_tokens_reaches_the_sequence_within_max_new_tokens():
    config = GenerationConfig(tokenizer=None, eos_token_ids=frozenset({0}), max_context=64, vocab_size=10)

    def sequence(min_tokens: int):
        req = converters.generate_input_from_proto(
            gen.GenerateRequest(model="m", token_ids=gen.TokenIds(ids=[1, 2]), max_new_tokens=5, min_tokens=min_tokens)
        )
        return to_sequence(config, req, default_max_new_tokens=8, deadline=None)

    assert sequence(5).min_tokens == 5 and sequence(0).min_tokens == 0
    with pytest.raises(InvalidInput, match="min_tokens"):
        sequence(6)


def test_stream_chunks_and_the_final_response():
    events = [
        Event("a", [97]),
        Event("b", [98]),
        Event("c", [99], FinishReason.LENGTH, prompt_tokens=2, generated_tokens=3, ttft_s=0.5, total_s=1.0),
    ]
    chunk = converters.stream_chunk_to_proto(events[:2])[0]
    assert chunk.text == "ab" and list(chunk.token_ids) == [97, 98] and chunk.finish_reason == 0
    last = converters.stream_chunk_to_proto(events[2:])[0]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH and last.usage.generated_tokens == 3
    whole = converters.generate_response_to_proto("m", "r", events)
    assert whole.text == "abc" and list(whole.token_ids) == [97, 98, 99] and whole.usage.prompt_tokens == 2
    assert whole.timings.time_to_first_token_seconds == 0.5


@pytest.mark.parametrize("where", ["request", "input", "output"])
def test_unsupported_triton_parameters_are_refused_not_ignored(where):
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="t", datatype="INT64", shape=[1])
    req.raw_input_contents.append(np.ones(1, np.int64).tobytes())
    o = req.outputs.add(name="logits")
    target = {"request": req, "input": t, "output": o}[where]
    target.parameters["shared_memory_region"].string_param = "region0"
    with pytest.raises(InvalidInput, match="shared_memory_region.*does not support shared memory"):
        converters.infer_request_from_proto(req)
