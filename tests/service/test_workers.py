"""--workers: serving processes sharing the ports under a supervisor (service/workers.py), run
for real with the shipped models: connections spread over the workers, /metrics sums them,
repository calls reach every worker, a worker killed is restarted while the other serves.
(SIGTERM under load with two workers: tests/chaos, scenario sigterm_workers.)"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.launcher import ServerProcess
from service.settings import Settings
from service.workers import Supervisor, Worker, worker_count
from tests.conftest import BYTEGPT_VOCAB, DEFAULT_REPOSITORY

CONNECTIONS = 24
# a channel of its own connection: grpc shares one connection between the channels of a process
# to the same address (its global subchannel pool), which would keep every call on one worker
OWN = [("grpc.use_local_subchannel_pool", 1)]


def infer(stub, n: int = 8, wait_for_ready: bool = False) -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(model_name="bytegpt")
    req.inputs.add(name="input_ids", datatype="INT64", shape=[1, n])
    req.raw_input_contents.append(np.arange(1, n + 1, dtype=np.int64).tobytes())
    return stub.ModelInfer(req, timeout=30, wait_for_ready=wait_for_ready)


def worker_pids(server: ServerProcess) -> list[int]:
    """The supervisor's worker processes (multiprocessing's spawned children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid and b"multiprocessing.spawn" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def metric(server: ServerProcess, pattern: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def worker_views(server: ServerProcess) -> set[tuple[int, int]]:
    """bytegpt's (inference count, last inference time) as CONNECTIONS fresh connections see
    them: each is answered by the worker the kernel gave that connection, which counts only
    what it served itself."""
    seen = set()
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(server.address, options=OWN) as ch:
            stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name="bytegpt"), timeout=10
            )
            seen.add((stats.model_stats[0].inference_count, stats.model_stats[0].last_inference))
    return seen


@pytest.fixture(scope="module")
def server():
    with ServerProcess(DEFAULT_REPOSITORY, "--workers", "2") as s:
        yield s


def test_two_workers_share_the_ports_and_the_metrics_sum_them():
    served = r'tserve_requests_total\{[^}]*model="bytegpt"[^}]*outcome="success"[^}]*\}'
    with ServerProcess(DEFAULT_REPOSITORY, "--workers", "2") as server:
        assert len(worker_pids(server)) == 2
        for _ in range(CONNECTIONS):  # each call on a connection of its own
            with grpc.insecure_channel(server.address, options=OWN) as ch:
                res = infer(pb_grpc.GRPCInferenceServiceStub(ch))
                assert list(res.outputs[0].shape) == [1, 8, BYTEGPT_VOCAB]
        # both served, and each counted only its own (the kernel hashes connections over the
        # two listening sockets: all 24 on one would happen once in 2^23)
        views = worker_views(server)
        assert len(views) == 2 and sum(count for count, _ in views) == CONNECTIONS
        assert metric(server, served) == CONNECTIONS  # /metrics: the sum over the workers
        assert metric(server, "tserve_workers") == 2 and metric(server, "tserve_server_ready") == 1


def test_a_repository_unload_and_load_reach_every_worker(server):
    with grpc.insecure_channel(server.address, options=OWN) as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="bytegpt_int8"), timeout=30
        )

    def ready_everywhere() -> set[bool]:
        answers = set()
        for _ in range(CONNECTIONS):
            with grpc.insecure_channel(server.address, options=OWN) as ch:
                res = pb_grpc.GRPCInferenceServiceStub(ch).ModelReady(
                    pb.ModelReadyRequest(name="bytegpt_int8"), timeout=10
                )
                answers.add(res.ready)
        return answers

    assert ready_everywhere() == {False}
    with grpc.insecure_channel(server.address, options=OWN) as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="bytegpt_int8"), timeout=60
        )
    assert ready_everywhere() == {True}


def test_a_killed_worker_is_restarted_and_the_other_serves_meanwhile(tmp_path):
    with ServerProcess(DEFAULT_REPOSITORY, "--workers", "2") as s:
        first, second = worker_pids(s)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        served = 0
        while time.monotonic() < deadline and (
            metric(s, "tserve_worker_restarts_total") < 1 or len(worker_pids(s)) < 2
        ):
            # new connections: only the live worker listens (one racing the killed worker's socket as it
            # closes is refused, and connects again: wait_for_ready)
            with grpc.insecure_channel(s.address, options=OWN) as ch:
                res = infer(pb_grpc.GRPCInferenceServiceStub(ch), wait_for_ready=True)
                served += list(res.outputs[0].shape) == [1, 8, BYTEGPT_VOCAB]
            time.sleep(0.05)
        pids = worker_pids(s)
        assert metric(s, "tserve_worker_restarts_total") == 1 and len(pids) == 2
        assert second in pids and first not in pids and served > 0
        deadline = time.monotonic() + 60  # the new one joins once loaded: both serve again
        while len(worker_views(s)) < 2 and time.monotonic() < deadline:
            for _ in range(4):
                with grpc.insecure_channel(s.address, options=OWN) as ch:
                    infer(pb_grpc.GRPCInferenceServiceStub(ch))
        assert len(worker_views(s)) == 2
        while metric(s, "tserve_server_ready") != 1 and time.monotonic() < deadline:  # every worker says so
            time.sleep(0.05)
        assert metric(s, "tserve_server_ready") == 1


@pytest.mark.unit
def test_every_worker_is_ready_before_any_says_so_and_a_restart_is_not_waited_for():
    sup = Supervisor.__new__(Supervisor)
    sup.workers = [Worker(0), Worker(1)]
    for w in sup.workers:
        w.listening, w.conn = True, object()
    assert not sup.all_ready()  # loading
    sup.workers[0].ready = True
    assert not sup.all_ready()  # one is not
    sup.workers[1].ready = True
    assert sup.all_ready()
    restarted = sup.workers[1]
    restarted.ready, restarted.listening = False, False  # restarted: loads before it listens
    assert sup.all_ready()
    restarted.listening = True  # listening but not ready (draining): every worker says NOT_SERVING
    assert not sup.all_ready()


@pytest.mark.unit
def test_auto_workers_are_the_cores_over_the_intra_op_threads(monkeypatch):
    monkeypatch.setattr("service.workers.available_cores", lambda: 8)
    assert worker_count(Settings(workers="auto", intra_op_threads=2)) == 4
    assert worker_count(Settings(workers="auto")) == 8
    assert worker_count(Settings(workers="3")) == 3
    with pytest.raises(ValueError):
        Settings(workers="0")
