"""Triton's perf_analyzer, unchanged, against a real tserve."""

from __future__ import annotations

import json
import re
import subprocess

import grpc
import pytest

from bench import perf_analyzer
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def perf_analyzer_cmd() -> list[str]:
    return perf_analyzer.ensure()


def successes(server) -> int:
    with grpc.insecure_channel(server.address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="bytegpt"))
    return stats.model_stats[0].inference_stats.success.count


REQUESTS = 200


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_the_shipped_model(server, perf_analyzer_cmd, tmp_path, protocol):
    """A fixed request count, not time windows: the run never depends on the machine being
    quiet enough for a stable measurement. Over HTTP it reads the model config and statistics
    as JSON and sends binary tensors."""
    data = perf_analyzer.token_input_file(tmp_path / "input.json", 16)
    before = successes(server)
    url = server.address if protocol == "grpc" else server.http_address
    res = subprocess.run(
        [
            *perf_analyzer_cmd,
            "-m",
            "bytegpt",
            "-i",
            protocol,
            "-u",
            url,
            "--input-data",
            str(data),
            "--concurrency-range",
            "2",
            "--request-count",
            str(REQUESTS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    throughputs = [float(x) for x in re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", res.stdout)]
    assert len(throughputs) == 1 and throughputs[0] > 0, res.stdout
    assert "Server:" in res.stdout  # it read ModelStatistics before and after the measurement
    # every request it sent was answered with success (perf_analyzer fails on any error)
    assert successes(server) - before >= REQUESTS


def test_out_of_range_token_ids_are_refused_not_crashing(server, perf_analyzer_cmd, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps({"data": [{"input_ids": {"content": [1, 70000, 3], "shape": [3]}}]}))
    res = subprocess.run(
        [
            *perf_analyzer_cmd,
            "-m",
            "bytegpt",
            "-i",
            "grpc",
            "-u",
            server.address,
            "--input-data",
            str(data),
            "--request-count",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "vocabulary" in res.stdout + res.stderr
    assert server.health() == 1  # still SERVING
