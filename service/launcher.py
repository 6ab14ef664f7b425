"""A real tserve process on loopback, for tests and benchmarks: started with port 0, found through
its port file, ready when the gRPC health service says SERVING, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]  # the checkout this module is in
DEFAULT_REPOSITORY = ROOT / "model_repository"


class ServerProcess:
    def __init__(
        self,
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        cores: set[int] | None = None,
        tls_ca: Path | None = None,
        tls_client=None,
        wait_token: str | None = None,
        root: Path = ROOT,
    ) -> None:
        self.repository = repository
        self.root = root  # the checkout whose server runs (a benchmark may run an older one beside this)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.cores = cores  # pin the server to these CPU cores (benchmarks)
        self.tls_ca, self.tls_client = tls_ca, tls_client  # a TLS server: trust this CA (and show this client pair)
        self.wait_token = wait_token  # a server whose health needs a bearer token
        self.proc: subprocess.Popen | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._dir = tempfile.TemporaryDirectory()
        self.log_path = Path(self._dir.name) / "server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, wait_serving: bool = True, timeout: float = 60.0) -> "ServerProcess":
        port_file = Path(self._dir.name) / "ports.json"
        cmd = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model-repository",
            str(self.repository),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--port-file",
            str(port_file),
            *self.args,
        ]
        self._log = open(self.log_path, "w")
        if self.cores:  # taskset, not a preexec_fn: Python code between fork and exec can deadlock
            cmd = ["taskset", "-c", ",".join(map(str, sorted(self.cores))), *cmd]  # in a process with threads
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"tserve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tserve did not listen within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        ports = json.loads(port_file.read_text())
        self.grpc_port, self.http_port, self.metrics_port = ports["grpc"], ports["http"], ports["metrics"]
        if wait_serving:
            self.wait_health(health_pb2.HealthCheckResponse.SERVING, deadline - time.monotonic())
        return self

    def health(self, service: str = "") -> int:
        with self.channel() as ch:
            metadata = [("authorization", f"Bearer {self.wait_token}")] if self.wait_token else None
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=5, metadata=metadata)
                .status
            )

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address)
        pair = self.tls_client
        return grpc.secure_channel(
            self.address,
            grpc.ssl_channel_credentials(
                self.tls_ca.read_bytes(),
                pair.key.read_bytes() if pair else None,
                pair.cert.read_bytes() if pair else None,
            ),
        )

    def wait_health(self, status: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health() == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"health never became {status}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()
        self._log.close()
        self._dir.cleanup()


def outcome_codes(futures) -> list[grpc.StatusCode]:
    """The status each gRPC future ended with (OK for a result)."""
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    return codes


def channel(address: str, own: bool = False) -> grpc.Channel:
    """A client channel that accepts the large logits tensors some tests ask for; `own`: on a
    connection of its own, not shared with the process's other channels to the address (grpc's
    global subchannel pool), so that --workers' kernel balancing sees each as a client."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    return grpc.insecure_channel(address, options=options + ([("grpc.use_local_subchannel_pool", 1)] if own else []))
