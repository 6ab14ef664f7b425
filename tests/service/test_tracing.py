"""OpenTelemetry tracing against a real OTLP collector: rotel's agent, started here on loopback
(stopped by PID), printing every span it receives. tserve is started with only the standard
OTEL_* environment; requests carry a W3C traceparent over gRPC infer, HTTP infer and an OpenAI
stream, and each shows up at the collector under that trace id, the child of the caller's span,
with its queue and compute (or prefill and decode) spans."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rotel

from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.launcher import ServerProcess, channel
from tests.conftest import DEFAULT_REPOSITORY

AGENT = Path(rotel.__file__).parent / "rotel-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    """rotel on loopback: OTLP over gRPC and HTTP in, every span printed to its output."""
    out = tmp_path_factory.mktemp("rotel") / "spans.log"
    grpc_port, http_port = free_port(), free_port()
    AGENT.chmod(0o755)
    with out.open("w") as log:
        proc = subprocess.Popen(
            [str(AGENT), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}"]
            + ["--otlp-http-endpoint", f"127.0.0.1:{http_port}", "--exporter", "blackhole"]
            + ["--debug-log", "traces", "--debug-log-verbosity", "detailed"]
            + ["--pid-file", str(out.with_suffix(".pid")), "--log-file", str(out.with_suffix(".agent"))],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", grpc_port), 1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield out, grpc_port, http_port
    proc.terminate()
    proc.wait(10)


def spans(log: Path, trace: str, timeout: float = 20.0) -> list[dict]:
    """The spans of one trace the collector printed: name, parent id and attributes."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for block in log.read_text().split("Span #")[1:]:
            if f"Trace ID       : {trace}" not in block:
                continue
            field = lambda name: (re.search(rf"{name}\s*: (\S*)", block) or [None, ""])[1]  # noqa: E731
            attributes = dict(re.findall(r"-> ([\w.]+): \w+\((.*)\)", block.split("Attributes:", 1)[-1]))
            found.append(
                {
                    "name": re.search(r"Name\s*: (.*)", block)[1].strip(),
                    "parent": field("Parent ID"),
                    "attributes": attributes,
                }
            )
        names = {s["name"] for s in found}
        if ("queue" in names and ("compute" in names or "decode" in names)) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def traceparent() -> tuple[str, str, str]:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace, parent, f"00-{trace}-{parent}-01"


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def server(request, collector):
    _, grpc_port, http_port = collector
    endpoint = f"http://127.0.0.1:{grpc_port if request.param == 'grpc' else http_port}"
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": request.param,
        "OTEL_SERVICE_NAME": "tserve-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with ServerProcess(DEFAULT_REPOSITORY, "--log-format", "json", "--access-log", env=env) as s:
        yield s


def check(found: list[dict], parent: str, children: tuple[str, ...]) -> dict:
    roots = [s for s in found if s["parent"] == parent]
    assert len(roots) == 1, found
    root = roots[0]
    ids = {s["name"] for s in found if s["parent"] != parent}
    assert set(children) <= ids, found
    return root


def test_grpc_infer_is_traced_under_the_callers_trace(server, collector):
    trace, parent, header = traceparent()
    req = pb.ModelInferRequest(model_name="bytegpt", id="traced-1")
    ids = np.arange(8, dtype=np.int64)[None]
    req.inputs.add(name="input_ids", datatype="INT64", shape=[1, 8])
    req.raw_input_contents.append(ids.tobytes())
    with channel(server.address) as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("traceparent", header)], timeout=30)
    root = check(spans(collector[0], trace), parent, ("queue", "compute"))
    assert root["name"] == "infer bytegpt"
    assert root["attributes"]["tserve.protocol"] == "grpc" and root["attributes"]["tserve.request_id"] == "traced-1"


def test_http_infer_is_traced_under_the_callers_trace(server, collector):
    trace, parent, header = traceparent()
    body = {"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    req = urllib.request.Request(
        server.http_url + "/v2/models/bytegpt/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "traceparent": header},
    )
    with urllib.request.urlopen(req, timeout=30) as res:
        assert res.status == 200
    root = check(spans(collector[0], trace), parent, ("queue", "compute"))
    assert root["attributes"]["tserve.protocol"] == "http"


def test_an_openai_stream_is_traced_with_genai_attributes(server, collector):
    from openai import OpenAI

    trace, parent, header = traceparent()
    client = OpenAI(base_url=server.http_url + "/v1", api_key="none")
    stream = client.completions.create(
        model="bytegpt", prompt="def f(x):", max_tokens=6, stream=True, extra_headers={"traceparent": header}
    )
    assert len([c for c in stream]) >= 1
    root = check(spans(collector[0], trace), parent, ("queue", "prefill", "decode"))
    a = root["attributes"]
    assert a["gen_ai.request.model"] == "bytegpt" and a["gen_ai.request.max_tokens"] == "6"
    assert int(a["gen_ai.usage.input_tokens"]) > 0 and int(a["gen_ai.usage.output_tokens"]) >= 1


def test_json_access_logs_carry_the_request_and_trace_ids(server, collector):
    trace, _, header = traceparent()
    req = urllib.request.Request(
        server.http_url + "/v2/models/bytegpt/infer",
        json.dumps(
            {"id": "logged-7", "inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]}]}
        ).encode(),
        {"Content-Type": "application/json", "traceparent": header},
    )
    urllib.request.urlopen(req, timeout=30).read()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = [e for e in lines if e["logger"] == "tserve.access" and e.get("request_id") == "logged-7"]
        if access:
            break
        time.sleep(0.1)
    assert access and access[0]["trace_id"] == trace, lines[-5:]
