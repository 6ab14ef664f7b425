"""Start-up, failed loads, readiness, queue bounds, deadlines, draining and settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY, ROOT
from service.launcher import ServerProcess, channel, outcome_codes

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def infer_request(ids: np.ndarray, model: str = "bytegpt", output: str = "logits") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    req.raw_input_contents.append(ids.astype(np.int64).tobytes())
    req.outputs.add(name=output)
    return req


# A slow request: the largest batch at the full context. It asks for the last layer's value cache,
# about a twentieth the size of its logits (32 x 256 x 4,096 floats would exceed the 64 MiB message bound).
BIG_OUTPUT = "present.3.value"
BIG_SHAPE = [32, 4, 256, 48]


def copy_model(repo, name: str, new_name: str | None = None) -> None:
    new_name = new_name or name
    shutil.copytree(DEFAULT_REPOSITORY / name, repo / new_name)
    config = repo / new_name / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{name}"', f'name: "{new_name}"', 1))


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("broken_repo")
    copy_model(repo, "bytegpt")
    copy_model(repo, "bytegpt_int8", "corrupt")
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "corrupt" / "1" / "manifest.json").unlink()
    copy_model(repo, "bytegpt_int8", "bad_config")
    (repo / "bad_config" / "config.pbtxt").write_text('name: "bad_config"\nmax_batch_size: [oops\n')
    copy_model(repo, "bytegpt_int8", "missing_file")
    (repo / "missing_file" / "1" / "model.onnx").unlink()
    copy_model(repo, "bytegpt_int8", "golden_mismatch")
    manifest_path = repo / "golden_mismatch" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["golden"][0]["outputs"]["logits"]["data"][0] += 1.0
    manifest_path.write_text(json.dumps(manifest))
    copy_model(repo, "bytegpt_int8", "checksum_mismatch")
    manifest_path = repo / "checksum_mismatch" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.onnx"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    copy_model(repo, "bytegpt_int8", "other_tokenizer")  # the graph intact, its tokenizer.json not
    tokenizer = repo / "other_tokenizer" / "1" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|endoftext|>"', '"<|end|>"'))
    copy_model(repo, "bytegpt_int8", "missing_tokenizer")
    (repo / "missing_tokenizer" / "1" / "tokenizer.json").unlink()
    return repo


def test_failed_models_are_reported_and_the_rest_keep_serving(broken_repository):
    with ServerProcess(broken_repository) as server, channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert index["bytegpt"].state == "READY"
        reasons = {
            "corrupt": "could not load",
            "bad_config": "does not parse",
            "missing_file": "missing",
            "golden_mismatch": "golden",
            "checksum_mismatch": "sha256",
            "other_tokenizer": "tokenizer.json does not match the sha256",
            "missing_tokenizer": "tokenizer.json is missing",
        }
        for name, words in reasons.items():
            assert index[name].state == "UNAVAILABLE", name
            assert words in index[name].reason, (name, index[name].reason)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="corrupt"), timeout=5).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request(np.ones((1, 3)), "golden_mismatch"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "golden" in info.value.details()
        res = stub.ModelInfer(infer_request(np.ones((1, 3))), timeout=10)
        assert res.outputs[0].shape == [1, 3, BYTEGPT_VOCAB]
        assert server.health("corrupt") == NOT_SERVING and server.health("bytegpt") == SERVING
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        assert 'tserve_model_state{model="golden_mismatch",state="UNAVAILABLE",version="1"} 1.0' in metrics
        ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
        assert [m.name for m in ready_only] == ["bytegpt"]


def test_strict_readiness_stays_not_serving_while_a_model_is_broken(broken_repository):
    server = ServerProcess(broken_repository, "--strict-readiness").start(wait_serving=False)
    try:
        deadline = time.monotonic() + 30
        with channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            while not any(
                m.state == "READY" for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.2)
            assert server.health() == NOT_SERVING
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert server.health("bytegpt") == NOT_SERVING  # the server as a whole is not serving
    finally:
        assert server.terminate() == 0


def test_health_never_serves_before_loading_finished(tmp_path):
    """From the moment the port is open: whenever health says SERVING, no model is LOADING."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    copy_model(repo, "bytegpt_int8")
    server = ServerProcess(repo).start(wait_serving=False)
    try:
        observations = []
        with channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # health first: once it said SERVING, nothing read after it may still be loading
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                states = {m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models}
                observations.append((status, states))
                if status == SERVING:
                    break
        assert observations[-1][0] == SERVING
        assert all("LOADING" not in states for status, states in observations if status == SERVING)
    finally:
        assert server.terminate() == 0


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    server = ServerProcess(repo, "--drain-grace-seconds", "20").start()
    big = np.random.default_rng(0).integers(0, 256, (32, 256))
    results, errors = [], []

    def slow_call():
        with channel(server.address) as ch:
            try:
                res = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request(big, output=BIG_OUTPUT), timeout=60)
                results.append(res.outputs[0].shape)
            except grpc.RpcError as e:
                errors.append(e)

    watch_channel = channel(server.address)
    statuses = []
    watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    watcher = threading.Thread(target=lambda: [statuses.append(r.status) for r in _until_error(watch)])
    watcher.start()
    callers = [threading.Thread(target=slow_call) for _ in range(3)]
    for t in callers:
        t.start()
    _wait_inflight(server, 3)
    code = server.terminate()
    for t in callers:
        t.join(60)
    watch_channel.close()
    watcher.join(10)
    assert code == 0
    assert not errors and results == [BIG_SHAPE] * 3, (errors, server.log())
    assert statuses[0] == SERVING and NOT_SERVING in statuses
    assert "draining" in server.log()


def test_sigterm_lets_generation_streams_finish(tmp_path):
    """Streams go through the same data plane as ModelInfer: drain waits for every one of them
    to send its last token, new streams are refused, and the server exits 0. One slot makes
    the streams run one after another, so the later ones are still queued at SIGTERM."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    server = ServerProcess(
        repo, "--drain-grace-seconds", "60", "--drain-intake-seconds", "0", "--generation-max-sequences", "1"
    ).start()
    n, new_tokens = 4, 200
    request = gen.GenerateRequest(model="bytegpt", text="def f(x):", max_new_tokens=new_tokens)
    with channel(server.address) as ch:
        stub = gen_grpc.TextGenerationStub(ch)
        streams = [stub.GenerateStream(request, timeout=120) for _ in range(n)]
        # the server may take the four in any order; with one slot, two in flight means at least
        # one is still queued behind a whole 200-token generation
        _wait_inflight(server, 2, api="generate")
        server.proc.send_signal(15)
        server.wait_health(NOT_SERVING)  # the server has begun to drain
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.GenerateStream(request, timeout=10))
        messages = [list(s) for s in streams]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for stream in messages:
        assert stream[-1].finish_reason == gen.FINISH_REASON_LENGTH, server.log()
        assert sum(len(m.token_ids) for m in stream) == new_tokens
    assert server.proc.wait(60) == 0
    in_flight = int(re.search(r"draining: (\d+) requests in flight", server.log()).group(1))
    assert in_flight >= 1  # the signal came while streams were running or queued


def _until_error(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


def _wait_inflight(server: ServerProcess, n: int, timeout: float = 20, api: str = "infer") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        for line in text.splitlines():
            if line.startswith("tserve_inflight_requests{") and f'api="{api}"' in line and float(line.split()[-1]) >= n:
                return
        time.sleep(0.01)
    raise TimeoutError("no request in flight")


def test_new_requests_during_drain_get_unavailable(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    server = ServerProcess(repo, "--drain-grace-seconds", "20").start()
    big = np.random.default_rng(1).integers(0, 256, (32, 256))
    ch = channel(server.address)
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    futures = [stub.ModelInfer.future(infer_request(big, output=BIG_OUTPUT), timeout=60) for _ in range(4)]
    _wait_inflight(server, 4)
    server.proc.send_signal(15)
    deadline = time.monotonic() + 10
    code = None
    while time.monotonic() < deadline:
        try:
            stub.ModelInfer(infer_request(np.ones((1, 2))), timeout=5)
        except grpc.RpcError as e:
            code = e.code()
            break
        time.sleep(0.01)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert all(f.result().outputs[0].shape == BIG_SHAPE for f in futures)
    assert server.proc.wait(30) == 0
    ch.close()


def test_queue_bound_answers_resource_exhausted_at_once(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt", "small_queue")
    config = repo / "small_queue" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_queue_size: 512", "max_queue_size: 2"))
    big = np.random.default_rng(2).integers(0, 256, (32, 128))
    with ServerProcess(repo) as server, channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        futures = [
            stub.ModelInfer.future(infer_request(big, "small_queue", output=BIG_OUTPUT), timeout=120) for _ in range(12)
        ]
        codes = outcome_codes(futures)
        assert all("max_queue_size 2" in f.exception().details() for f in futures if f.exception())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        assert 'tserve_queue_depth{model="small_queue",version="1"} 0.0' in metrics


def test_concurrent_rpc_bound_refuses_at_the_door(tmp_path):
    """Beyond max_concurrent_rpcs, gRPC refuses at once with RESOURCE_EXHAUSTED; every RPC it
    took gets its own full answer."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    big = np.random.default_rng(2).integers(0, 256, (32, 256))
    with ServerProcess(repo, "--max-concurrent-rpcs", "2") as server, channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        futures = [stub.ModelInfer.future(infer_request(big, output=BIG_OUTPUT), timeout=120) for _ in range(24)]
        codes = outcome_codes(futures)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1 and codes.count(grpc.StatusCode.OK) >= 2
        assert all(f.result().outputs[0].shape == BIG_SHAPE for f, c in zip(futures, codes) if c == grpc.StatusCode.OK)
        deadline = time.monotonic() + 10  # normal service once the burst has drained
        while True:
            try:
                assert stub.ModelInfer(infer_request(np.ones((1, 2))), timeout=30).outputs[0].shape == [
                    1,
                    2,
                    BYTEGPT_VOCAB,
                ]
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)


def test_expired_requests_are_dropped_before_compute(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt")
    big = np.random.default_rng(3).integers(0, 256, (32, 256))
    with ServerProcess(repo) as server, channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        slow = [stub.ModelInfer.future(infer_request(big, output=BIG_OUTPUT), timeout=120) for _ in range(3)]
        _wait_inflight(server, 1)
        hurried = [stub.ModelInfer.future(infer_request(np.ones((1, 4))), timeout=0.05) for _ in range(20)]
        codes = outcome_codes(hurried)
        for f in slow:
            assert f.result().outputs[0].shape == BIG_SHAPE
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="bytegpt"), timeout=10).model_stats[0]
        assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
        # requests whose deadline passed in the queue were never computed
        ok = codes.count(grpc.StatusCode.OK)
        assert 96 + ok <= stats.inference_count < 96 + len(hurried)
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        assert 'tserve_queue_depth{model="bytegpt",version="1"} 0.0' in text


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_wrong_settings_fail_at_startup_naming_the_setting(tmp_path):
    res = run_cli("--grpc-port", "99999")
    assert res.returncode == 2 and "grpc_port" in res.stderr
    res = run_cli("--model-repository", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "model_repository" in res.stderr
    res = run_cli(env={"TSERVE_EXECUTION_PROVIDER": "tpu"})
    assert res.returncode == 2 and "execution_provider" in res.stderr
    settings = tmp_path / "tserve.toml"
    settings.write_text('log_format = "yaml"\n')
    res = run_cli("--settings-file", str(settings))
    assert res.returncode == 2 and "log_format" in res.stderr


def test_a_taken_port_stops_start_up_naming_it():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = run_cli("--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0")
    assert res.returncode == 1 and f"could not bind HTTP to 127.0.0.1:{port}" in res.stderr


def test_settings_file_and_environment_are_applied(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt_int8")
    settings = tmp_path / "tserve.toml"
    settings.write_text(f'model_repository = "{repo}"\nlog_format = "json"\n')
    server = ServerProcess(DEFAULT_REPOSITORY, "--settings-file", str(settings), env={"TSERVE_LOG_LEVEL": "debug"})
    # the CLI's --model-repository (DEFAULT_REPOSITORY) outranks the file's
    with server, channel(server.address) as ch:
        names = {
            m.name for m in pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest()).models
        }
        assert names == {p.name for p in DEFAULT_REPOSITORY.iterdir() if p.is_dir()} != {"bytegpt_int8"}
        assert server.log().lstrip().startswith("{")  # json from the file
        assert '"level": "debug"' in server.log()  # debug from the environment


def test_execution_provider_fallback_policy(tmp_path):
    """This machine has no CUDA provider: fallback=cpu serves on CPU and says so; fail refuses."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt_int8")
    with ServerProcess(repo, "--execution-provider", "cuda", "--provider-fallback", "cpu") as server:
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        assert (
            'tserve_execution_provider{model="bytegpt_int8",provider="CPUExecutionProvider",version="1"} 1.0' in metrics
        )
        assert "CUDAExecutionProvider is not available" in server.log() and "falling back to CPU" in server.log()
    with ServerProcess(repo, "--execution-provider", "cuda", "--provider-fallback", "fail") as server:
        with channel(server.address) as ch:
            index = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
        assert index[0].state == "UNAVAILABLE" and "provider_fallback=fail" in index[0].reason


def test_model_config_sets_its_own_sessions(tmp_path):
    """instance_group and Triton's intra/inter_op_thread_count parameters reach ONNX Runtime."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_model(repo, "bytegpt_int8", "tuned")
    config = repo / "tuned" / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "instance_group [ { count: 1 kind: KIND_CPU } ]", "instance_group [ { count: 2 kind: KIND_CPU } ]"
        )
        + 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        + 'parameters { key: "tserve.latency_target_ms" value: { string_value: "20" } }\n'
    )
    copy_model(repo, "bytegpt_int8", "bad_target")
    config = repo / "bad_target" / "config.pbtxt"
    config.write_text(
        config.read_text() + 'parameters { key: "tserve.latency_target_ms" value: { string_value: "-5" } }\n'
    )
    copy_model(repo, "bytegpt_int8", "bad_threads")
    config = repo / "bad_threads" / "config.pbtxt"
    config.write_text(
        config.read_text() + 'parameters { key: "intra_op_thread_count" value: { string_value: "two" } }\n'
    )
    with ServerProcess(repo, "--intra-op-threads", "2") as server, channel(server.address) as ch:
        assert "model tuned version 1 ready" in server.log()
        assert "2 instance(s), 1 intra-op / 1 inter-op thread(s) each" in server.log()
        index = {
            m.name: m for m in pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest()).models
        }
        assert index["tuned"].state == "READY"
        assert index["bad_threads"].state == "UNAVAILABLE" and "intra_op_thread_count" in index["bad_threads"].reason
        assert (
            index["bad_target"].state == "UNAVAILABLE"
            and "latency_target_ms must be above 0" in index["bad_target"].reason
        )
