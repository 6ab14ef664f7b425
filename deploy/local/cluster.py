"""Several tserve replicas behind nginx (grpc_pass) and a Prometheus scraping them, on loopback.

    python -m deploy.local.cluster up [--replicas 3] [--port 8001] [--prometheus-port 9090]
    python -m deploy.local.cluster down

Needs Debian's nginx and prometheus (`apt-get install nginx prometheus`). State (ports, PIDs,
configs, logs) lives in runs/cluster/; `down` stops every process it lists, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ROOT / "runs" / "cluster"

NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/nginx-tmp;
    proxy_temp_path {dir}/nginx-tmp;
    fastcgi_temp_path {dir}/nginx-tmp;
    uwsgi_temp_path {dir}/nginx-tmp;
    scgi_temp_path {dir}/nginx-tmp;
    # gRPC needs HTTP/2 end to end; nginx balances per request (per stream), round-robin
    upstream tserve {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        client_max_body_size 64m;
        location / {{
            grpc_pass grpc://tserve;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""

PROMETHEUS_CONF = """global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
rule_files: [{rules}]
scrape_configs:
  - job_name: tserve
    static_configs:
      - targets: [{targets}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def wait_serving(grpc_port: int, timeout: float = 120.0) -> None:
    """Until the replica's gRPC health service says SERVING (models loaded and warmed up)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"replica on port {grpc_port} did not become SERVING within {timeout:.0f}s")


def up(replicas: int, port: int, prometheus_port: int, repository: Path, scrape_interval: str = "2s") -> dict:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / "nginx-tmp").mkdir(exist_ok=True)
    state: dict = {"replicas": [], "pids": []}

    def spawn(cmd: list[str], log: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=open(STATE_DIR / log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        state["pids"].append(proc.pid)
        return proc

    for i in range(replicas):
        port_file = STATE_DIR / f"replica{i}.ports.json"
        port_file.unlink(missing_ok=True)
        spawn(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--model-repository",
                str(repository),
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--metrics-port",
                "0",
                "--port-file",
                str(port_file),
            ],
            f"replica{i}.log",
        )
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {i} did not start; see {STATE_DIR / f'replica{i}.log'}")
            time.sleep(0.05)
        state["replicas"].append(json.loads(port_file.read_text()))
    for replica in state["replicas"]:  # nginx must not route to a replica that is still loading
        wait_serving(replica["grpc"])

    servers = "\n".join(f"        server 127.0.0.1:{r['grpc']};" for r in state["replicas"])
    user = "user root;" if os.geteuid() == 0 else ""
    (STATE_DIR / "nginx.conf").write_text(NGINX_CONF.format(dir=STATE_DIR, servers=servers, port=port, user=user))
    spawn(["nginx", "-c", str(STATE_DIR / "nginx.conf"), "-p", str(STATE_DIR)], "nginx.log")

    targets = ", ".join(f'"127.0.0.1:{r["metrics"]}"' for r in state["replicas"])
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    (STATE_DIR / "prometheus.yml").write_text(
        PROMETHEUS_CONF.format(interval=scrape_interval, rules=json.dumps(str(rules)), targets=targets)
    )
    spawn(
        [
            "prometheus",
            f"--config.file={STATE_DIR / 'prometheus.yml'}",
            f"--storage.tsdb.path={STATE_DIR / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        "prometheus.log",
    )
    state.update(port=port, prometheus_port=prometheus_port)
    (STATE_DIR / "state.json").write_text(json.dumps(state, indent=1))
    wait_port(port)
    wait_port(prometheus_port)
    return state


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        return done == 0
    except ChildProcessError:  # started by another process (`make cluster-up`)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def down() -> None:
    path = STATE_DIR / "state.json"
    if not path.exists():
        return
    state = json.loads(path.read_text())
    for pid in reversed(state["pids"]):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    for pid in state["pids"]:
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up")
    u.add_argument("--replicas", type=int, default=3)
    u.add_argument("--port", type=int, default=8001, help="nginx's gRPC port, in front of the replicas")
    u.add_argument("--prometheus-port", type=int, default=9090)
    u.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    sub.add_parser("down")
    args = p.parse_args()
    if args.command == "up":
        down()
        state = up(args.replicas, args.port, args.prometheus_port, args.repository)
        print(
            f"{len(state['replicas'])} replicas behind nginx at 127.0.0.1:{state['port']}; "
            f"Prometheus at http://127.0.0.1:{state['prometheus_port']}; `make cluster-down` stops them"
        )
    else:
        down()


if __name__ == "__main__":
    main()
