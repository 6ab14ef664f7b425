"""What a user gets without tuning a setting, over the wire: a third-party GPT whose position
limit is declared nowhere is bounded by the table found in its graph; ONNX Runtime's failure on
one input is that input's INVALID_ARGUMENT while its batch-mates get their own results; HTTP
bodies, nesting and in-flight requests are bounded like gRPC's, with 413 and 429; the server
publishes a valid OpenAPI document."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.launcher import ServerProcess, channel
from tests.chaos import third_party
from tests.chaos.scenarios import gpt2_request, logits
from tests.conftest import DEFAULT_REPOSITORY


@pytest.fixture(scope="module")
def server():
    with ServerProcess(third_party.repository(DEFAULT_REPOSITORY)) as s:  # default settings
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with channel(server.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def test_the_position_limit_comes_from_the_graph(server, stub):
    assert list(stub.ModelInfer(gpt2_request(64), timeout=30).outputs[0].shape) == [1, 64, third_party.VOCAB]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(gpt2_request(65), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum sequence length 64" in e.value.details()
    assert "position table" in server.log()


def test_a_run_that_fails_on_one_input_fails_that_input_alone(stub):
    """A mask shorter than the ids (the graph takes longer ones, as a cache's): ONNX Runtime's
    Gather fails inside the batch; the batch re-runs apart, the culprit gets INVALID_ARGUMENT with
    ORT's words, the others their exact results. Positions past the table are refused earlier."""
    good = [gpt2_request(n, seed=n) for n in (3, 9, 17, 30)]
    expected = [logits(stub.ModelInfer(r, timeout=30)) for r in good]
    bad = gpt2_request(9)
    bad.inputs[1].shape[1] = 4
    bad.raw_input_contents[1] = np.ones((1, 4), np.int64).tobytes()
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(gpt2_request(9, positions=np.arange(9)[None] + 60), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside model 'gpt2''s positions [0, 64)" in (
        e.value.details()
    )
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stub.ModelInfer, r, timeout=30) for r in [*good, bad, *good]]
            outcomes = []
            for c in calls:
                try:
                    outcomes.append(logits(c.result()))
                except grpc.RpcError as e:
                    outcomes.append(e)
        error = outcomes[len(good)]
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ONNX Runtime says" in error.details() and "out of data bounds" in error.details()
        for got, want in zip(outcomes[: len(good)] + outcomes[len(good) + 1 :], expected * 2):
            np.testing.assert_allclose(got, want, atol=1e-5)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_1_gib_body_is_refused_with_413_before_it_is_read(server):
    before = _rss_kib(server.proc.pid)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /v2/models/gpt2/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n" + b"[" * 65536
        )
        answer = b""
        while b"max_message_bytes" not in answer and b"}" not in answer.partition(b"\r\n\r\n")[2]:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        took = time.monotonic() - started
        try:  # the server closes the connection: the rest of the gigabyte is never taken in
            for _ in range(256):
                sock.sendall(b"0" * (1 << 20))
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_message_bytes" in answer
    assert took < 1.0
    assert _rss_kib(server.proc.pid) - before < 50 * 1024


def test_a_chunked_body_over_the_bound_is_refused_with_413(server):
    """No Content-Length: counted as it arrives, refused at the first byte past 64 MiB. The body
    is sent from a thread while the answer is read, as a client streaming an upload would."""
    chunk = b" " * (1 << 20)
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)

    def send() -> None:
        try:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(80):  # 80 MiB, past the 64 MiB default
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the rest is never taken in

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while b"max_message_bytes" not in answer:
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            answer += part
    finally:
        sock.close()
        sender.join(30)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_message_bytes" in answer


def test_json_nested_too_deep_is_a_400(server):
    req = urllib.request.Request(
        server.http_url + "/v2/models/gpt2/infer", b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "nested too deeply" in json.loads(e.value.read())["error"]


def test_the_openapi_document_is_valid_and_names_the_routes(server):
    from openapi_spec_validator import validate

    with urllib.request.urlopen(server.http_url + "/openapi.json", timeout=10) as res:
        doc = json.loads(res.read())
    validate(doc)
    assert {"/v2/models/{model}/infer", "/v1/chat/completions", "/v1/embeddings", "/rerank"} <= set(doc["paths"])


def test_http_beyond_the_in_flight_bound_is_429_with_retry_after():
    """Two requests held in flight (their bodies never finish arriving) fill a bound of 2; the
    third is refused at once with 429 and Retry-After, and health probes are never refused."""
    with ServerProcess(DEFAULT_REPOSITORY, "--max-concurrent-rpcs", "2") as s:
        held = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", s.http_port), timeout=5)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            held.append(sock)
        try:
            deadline = time.monotonic() + 5
            while True:
                req = urllib.request.Request(
                    s.http_url + "/v1/completions", b"{}", {"Content-Type": "application/json"}
                )
                try:
                    urllib.request.urlopen(req, timeout=5)
                    status, headers = 200, {}
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, json.loads(e.read())
                if status == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # the held requests may not have reached the app yet
            assert status == 429 and headers.get("Retry-After") == "1"
            assert "max_concurrent_rpcs 2" in body["error"]["message"]
            with urllib.request.urlopen(s.http_url + "/v2/health/ready", timeout=5) as res:
                assert res.status == 200
            text = urllib.request.urlopen(s.metrics_url, timeout=5).read().decode()
            assert 'tserve_admission_refusals_total{cause="concurrency",model="",version=""}' in text
        finally:
            for sock in held:
                sock.close()
