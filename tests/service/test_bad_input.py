"""Bad input: a clear status and a message naming the problem, and nothing lost for others."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import BYTEGPT_VOCAB

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def request(
    model: str = "bytegpt", inputs: dict | None = None, version: str = "", outputs=("logits",)
) -> pb.ModelInferRequest:
    inputs = {"input_ids": np.ones((1, 4), np.int64)} if inputs is None else inputs
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, a in inputs.items():
        datatype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[a.dtype]
        req.inputs.add(name=name, datatype=datatype, shape=list(a.shape))
        req.raw_input_contents.append(a.tobytes())
    for o in outputs:
        req.outputs.add(name=o)
    return req


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def expect(stub, req: pb.ModelInferRequest, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=30)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    for w in words:
        assert w in details, f"{w!r} not in {details!r}"
    # the next request is served normally
    ok = stub.ModelInfer(request(), timeout=30)
    assert ok.outputs[0].name == "logits"
    return details


def with_raw(req: pb.ModelInferRequest, index: int, raw: bytes) -> pb.ModelInferRequest:
    req.raw_input_contents[index] = raw
    return req


CASES = {
    "unknown model": (lambda: request(model="nope"), grpc.StatusCode.NOT_FOUND, ["nope"]),
    "unknown version": (lambda: request(version="7"), grpc.StatusCode.NOT_FOUND, ["version"]),
    "bad version string": (lambda: request(version="latest"), grpc.StatusCode.NOT_FOUND, ["version"]),
    "unknown input": (
        lambda: request(inputs={"input_ids": np.ones((1, 2), np.int64), "tokens": np.ones((1, 2), np.int64)}),
        INVALID,
        ["'tokens'"],
    ),
    "missing input": (lambda: request(inputs={"attention_mask": np.ones((1, 2), np.int64)}), INVALID, ["input_ids"]),
    "wrong dtype": (
        lambda: request(inputs={"input_ids": np.ones((1, 2), np.int32)}),
        INVALID,
        ["input_ids", "INT32", "INT64"],
    ),
    "wrong rank": (lambda: request(inputs={"input_ids": np.ones((4,), np.int64)}), INVALID, ["input_ids", "rank"]),
    "byte length": (lambda: with_raw(request(), 0, b"\x00" * 12), INVALID, ["input_ids", "12 bytes", "needs 32"]),
    "zero-size dim": (
        lambda: request(inputs={"input_ids": np.ones((1, 0), np.int64)}),
        INVALID,
        ["input_ids", "zero-size"],
    ),
    "token id above vocab": (
        lambda: request(inputs={"input_ids": np.array([[1, BYTEGPT_VOCAB]], np.int64)}),
        INVALID,
        ["input_ids", str(BYTEGPT_VOCAB), "vocabulary"],
    ),
    "negative token id": (lambda: request(inputs={"input_ids": np.array([[-3, 1]], np.int64)}), INVALID, ["-3"]),
    "batch above max": (
        lambda: request(inputs={"input_ids": np.ones((33, 2), np.int64)}),
        INVALID,
        ["input_ids", "33", "max_batch_size"],
    ),
    "sequence above max": (
        lambda: request(inputs={"input_ids": np.ones((1, 300), np.int64)}),
        INVALID,
        ["input_ids", "300", "maximum sequence length"],
    ),
    "mask length": (
        lambda: request(inputs={"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 5), np.int64)}),
        INVALID,
        ["attention_mask", "[1, 3]"],
    ),
    "unknown output": (lambda: request(outputs=("scores",)), INVALID, ["scores"]),
    "unsupported datatype": (lambda: _datatype("BF16"), INVALID, ["BF16"]),
    "BYTES not in Triton's encoding": (lambda: _datatype("BYTES"), INVALID, ["BYTES", "past its end"]),
    "text to a model with no task": (lambda: _text("bytegpt"), INVALID, ["bytegpt", "no BYTES inputs"]),
    "garbage datatype": (lambda: _datatype("x" * 500), INVALID, ["..."]),
    "long input name is quoted short": (
        lambda: request(inputs={"n" * 5000: np.ones((1, 2), np.int64)}),
        INVALID,
        ["..."],
    ),
}


def _text(model: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="text", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(len(b"hello").to_bytes(4, "little") + b"hello")
    return req


def _datatype(dt: str) -> pb.ModelInferRequest:
    req = request()
    req.inputs[0].datatype = dt
    return req


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_answered_with_a_clear_status(stub, case):
    make, code, words = CASES[case]
    details = expect(stub, make(), code, *words)
    assert len(details) < 400  # client strings are quoted in short form


def test_negative_and_huge_dims(stub):
    req = request()
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([1, -4])
    expect(stub, req, INVALID, "negative")
    req = request()
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([1 << 40, 1 << 40])  # must not allocate: refused on the shape alone
    expect(stub, req, INVALID, "input_ids", "at most 16 dimensions of at most 2147483647 each")
    req = request()
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([1, 1 << 30])  # a possible shape: the byte count disagrees
    expect(stub, req, INVALID, "input_ids", "bytes")


def test_message_over_the_size_limit(stub):
    big = np.ones((1, 300_000), np.int64)  # 2.4 MB against the server's 1 MiB limit
    expect(stub, request(inputs={"input_ids": big}), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_bad_requests_never_harm_requests_batched_with_them(server, stub):
    """Good and bad requests sent together: every good one gets its correct result."""
    rng = np.random.default_rng(7)
    good = [rng.integers(0, BYTEGPT_VOCAB, (1, int(rng.integers(2, 20))), dtype=np.int64) for _ in range(24)]
    reference = [
        np.frombuffer(stub.ModelInfer(request(inputs={"input_ids": g}), timeout=30).raw_output_contents[0], np.float32)
        for g in good
    ]
    bad = [np.array([[5, BYTEGPT_VOCAB + 1]], np.int64), np.ones((1, 300), np.int64), np.ones((1, 0), np.int64)]
    results: dict[int, np.ndarray] = {}
    codes: list[grpc.StatusCode] = []
    barrier = threading.Barrier(len(good) + len(bad))

    def good_call(i):
        barrier.wait()
        res = stub.ModelInfer(request(inputs={"input_ids": good[i]}), timeout=30)
        results[i] = np.frombuffer(res.raw_output_contents[0], np.float32)

    def bad_call(a):
        barrier.wait()
        try:
            stub.ModelInfer(request(inputs={"input_ids": a}), timeout=30)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=good_call, args=(i,)) for i in range(len(good))]
    threads += [threading.Thread(target=bad_call, args=(a,)) for a in bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [INVALID] * len(bad)
    assert len(results) == len(good)
    for i in range(len(good)):
        np.testing.assert_allclose(results[i], reference[i], atol=1e-4)
