"""The inference service through a real server and real clients (tritonclient, raw stubs)."""

from __future__ import annotations

import json
import threading
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import BYTEGPT_VOCAB
from tests.service.conftest import ENCODER_VOCAB, random_ids

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def session_of(repository, name: str) -> ort.InferenceSession:
    """The same model run in-process by ONNX Runtime: the reference for served results."""
    return ort.InferenceSession(str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def decoder_feeds(session: ort.InferenceSession, ids: np.ndarray) -> dict:
    """A prompt pass (empty cache) for any decoder-with-past graph."""
    B, T = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((B, T), np.int64),
        "position_ids": np.tile(np.arange(T, dtype=np.int64), (B, 1)),
    }
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((B, inp.shape[1], 0, inp.shape[3]), np.float32)
    return feeds


def infer_input(name: str, array: np.ndarray) -> tc.InferInput:
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[array.dtype]
    x = tc.InferInput(name, list(array.shape), datatype)
    x.set_data_from_numpy(array)
    return x


@pytest.fixture(scope="module")
def client(server):
    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


def test_server_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("bytegpt") and client.is_model_ready("encoder")
    meta = client.get_server_metadata()
    assert meta.name == "tserve" and "statistics" in meta.extensions
    m = client.get_model_metadata("bytegpt")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in m.inputs}
    assert inputs["input_ids"] == ("INT64", [-1, -1])
    past = inputs["past_key_values.0.key"]
    assert past[0] == "FP32" and past[1][0] == -1 and past[1][2] == -1 and len(past[1]) == 4
    assert [t.name for t in m.outputs][0] == "logits"
    config = client.get_model_config("bytegpt").config
    assert config.max_batch_size == 32 and list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.parameters["tserve.vocab_size"].string_value == str(BYTEGPT_VOCAB)


def test_autocompleted_model_without_config(client):
    m = client.get_model_metadata("encoder_auto")
    assert {t.name for t in m.inputs} == {"input_ids", "attention_mask", "token_type_ids"}
    assert [t.name for t in m.outputs] == ["last_hidden_state"]
    config = client.get_model_config("encoder_auto").config
    assert config.max_batch_size > 0 and len(config.input) == 3


def test_decoder_infer_equals_direct_onnx_runtime(client, repository):
    ids = random_ids(np.random.default_rng(0), 3, 17, BYTEGPT_VOCAB)
    res = client.infer(
        "bytegpt", [infer_input("input_ids", ids)], request_id="req-1", outputs=[tc.InferRequestedOutput("logits")]
    )
    assert res.get_response().id == "req-1"
    session = session_of(repository, "bytegpt")
    (want,) = session.run(["logits"], decoder_feeds(session, ids))
    np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-4)


def test_encoder_infer_equals_direct_onnx_runtime(client, repository):
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2, 9, ENCODER_VOCAB)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": rng.integers(0, 2, ids.shape)}
    res = client.infer("encoder", [infer_input(k, v) for k, v in feeds.items()])
    (want,) = session_of(repository, "encoder").run(["last_hidden_state"], feeds)
    np.testing.assert_allclose(res.as_numpy("last_hidden_state"), want, atol=1e-4)


def test_typed_contents_equal_raw_bytes(server, client):
    ids = random_ids(np.random.default_rng(2), 1, 6, BYTEGPT_VOCAB)
    raw = client.infer("bytegpt", [infer_input("input_ids", ids)], outputs=[tc.InferRequestedOutput("logits")])
    request = pb.ModelInferRequest(model_name="bytegpt", id="typed")
    t = request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    t.contents.int64_contents.extend(ids.ravel().tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(server.address) as ch:
        res = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    got = np.frombuffer(res.raw_output_contents[0], np.float32).reshape(res.outputs[0].shape)
    assert res.id == "typed"
    np.testing.assert_allclose(got, raw.as_numpy("logits"), atol=1e-5)


def test_64_concurrent_clients_each_get_their_own_rows(server, client, repository):
    """Random inputs of mixed lengths, sent at once: every caller's result must equal an
    unbatched run of its own input — a row sent to the wrong caller fails here."""
    rng = np.random.default_rng(3)
    # up to 2 x 31 tokens: their logits stay under the fixture server's 1 MiB message bound
    requests = [random_ids(rng, int(rng.integers(1, 3)), int(rng.integers(1, 32)), BYTEGPT_VOCAB) for _ in range(64)]
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(64)

    def call(i: int) -> None:
        c = tc.InferenceServerClient(server.address)
        try:
            barrier.wait()
            r = c.infer("bytegpt", [infer_input("input_ids", requests[i])], outputs=[tc.InferRequestedOutput("logits")])
            results[i] = r.as_numpy("logits")
        except Exception as e:
            errors.append(e)
        finally:
            c.close()

    before = client.get_inference_statistics("bytegpt").model_stats[0]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 64, [str(e)[:300] for e in errors[:3]]
    session = session_of(repository, "bytegpt")
    for i, ids in enumerate(requests):
        (want,) = session.run(["logits"], decoder_feeds(session, ids))
        assert results[i].shape == want.shape
        np.testing.assert_allclose(results[i], want, atol=1e-4, err_msg=f"request {i}")
    after = client.get_inference_statistics("bytegpt").model_stats[0]
    executions = after.execution_count - before.execution_count
    assert executions < 64, "no two requests were batched together"
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'tserve_batch_padding_efficiency_count{model="bytegpt",version="1"}' in text


def test_statistics_count_requests(client):
    ids = random_ids(np.random.default_rng(4), 1, 4, ENCODER_VOCAB)
    before = client.get_inference_statistics("encoder").model_stats[0]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    client.infer("encoder", [infer_input(k, v) for k, v in feeds.items()])
    after = client.get_inference_statistics("encoder").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns


def test_repository_index_load_and_unload(server, client):
    index = {(m.name, m.state) for m in client.get_model_repository_index().models}
    assert ("bytegpt", "READY") in index and ("encoder_auto", "READY") in index
    assert server.health("encoder_auto") == SERVING
    client.unload_model("encoder_auto")
    assert not client.is_model_ready("encoder_auto")
    assert server.health("encoder_auto") == NOT_SERVING and server.health("bytegpt") == SERVING
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        ids = np.ones((1, 3), np.int64)
        client.infer(
            "encoder_auto",
            [infer_input("input_ids", ids), infer_input("attention_mask", ids), infer_input("token_type_ids", ids * 0)],
        )
    client.load_model("encoder_auto")
    assert client.is_model_ready("encoder_auto") and server.health("encoder_auto") == SERVING
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.load_model("no_such_model")


def test_stream_infer_answers_each_request(server):
    c = tc.InferenceServerClient(server.address)
    answers: list = []
    done = threading.Event()

    def callback(result, error):
        answers.append((result, error))
        if len(answers) == 2:
            done.set()

    c.start_stream(callback)
    c.async_stream_infer("bytegpt", [infer_input("input_ids", np.ones((1, 3), np.int64))], request_id="s1")
    c.async_stream_infer(
        "bytegpt", [infer_input("input_ids", np.full((1, 3), BYTEGPT_VOCAB, np.int64))], request_id="s2"
    )
    assert done.wait(30)
    c.stop_stream()
    c.close()
    assert answers[0][1] is None and answers[0][0].as_numpy("logits").shape == (1, 3, BYTEGPT_VOCAB)
    assert answers[0][0].get_response().id == "s1"
    assert answers[1][1] is not None and "vocabulary" in str(answers[1][1])


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_exports_the_documented_series(server, client):
    client.infer("bytegpt", [infer_input("input_ids", np.ones((1, 2), np.int64))])
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for name in (
        "tserve_requests_total",
        "tserve_request_duration_seconds_bucket",
        "tserve_queue_duration_seconds_bucket",
        "tserve_compute_duration_seconds_bucket",
        "tserve_batch_size_bucket",
        "tserve_queue_depth",
        "tserve_queue_capacity",
        "tserve_inflight_requests",
        "tserve_model_load_duration_seconds",
        "tserve_model_state",
        "tserve_execution_provider",
        "tserve_server_ready",
    ):
        assert f"\n{name}" in text, name
    assert 'tserve_execution_provider{model="bytegpt",provider="CPUExecutionProvider",version="1"} 1.0' in text
    assert 'tserve_model_state{model="bytegpt",state="READY",version="1"} 1.0' in text


def test_json_logs_carry_the_request_id(server, client):
    client.infer("bytegpt", [infer_input("input_ids", np.ones((1, 2), np.int64))], request_id="trace-me-42")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "trace-me-42" for entry in lines)
