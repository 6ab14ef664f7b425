"""Replicas behind nginx's grpc_pass and a real Prometheus scraping them, all on loopback."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc

from deploy.local import cluster
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY


@pytest.fixture
def running_cluster():
    state = cluster.up(2, cluster.free_port(), cluster.free_port(), DEFAULT_REPOSITORY, scrape_interval="1s")
    try:
        yield state
    finally:
        cluster.down()


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success"
    return body["data"]["result"]


def test_load_through_nginx_reaches_every_replica_and_prometheus(running_cluster):
    state = running_cluster
    client = tc.InferenceServerClient(f"127.0.0.1:{state['port']}")
    deadline = time.monotonic() + 30
    while not client.is_server_ready():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ids = np.arange(8, dtype=np.int64)[None]
    x = tc.InferInput("input_ids", list(ids.shape), "INT64")
    x.set_data_from_numpy(ids)
    for _ in range(40):
        assert client.infer("bytegpt", [x]).as_numpy("logits").shape == (1, 8, BYTEGPT_VOCAB)
    client.close()

    for replica in state["replicas"]:  # each replica, asked directly, served some of them
        direct = tc.InferenceServerClient(f"127.0.0.1:{replica['grpc']}")
        served = direct.get_inference_statistics("bytegpt").model_stats[0].inference_stats.success.count
        direct.close()
        assert served > 0, f"replica {replica} served nothing"

    deadline = time.monotonic() + 30
    while True:
        result = prometheus_query(
            state["prometheus_port"], 'sum by (instance) (tserve_requests_total{model="bytegpt",outcome="success"})'
        )
        total = sum(float(r["value"][1]) for r in result)
        if len(result) == 2 and total >= 40:
            break
        assert time.monotonic() < deadline, f"Prometheus saw {result}"
        time.sleep(0.5)
    up = prometheus_query(state["prometheus_port"], 'up{job="tserve"}')
    assert len(up) == 2 and all(r["value"][1] == "1" for r in up)


def test_cluster_down_stops_every_process():
    state = cluster.up(1, cluster.free_port(), cluster.free_port(), DEFAULT_REPOSITORY)
    cluster.down()
    import os

    for pid in state["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
