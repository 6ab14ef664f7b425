"""What tracing costs: this checkout with tracing off and on (100% sampled) against the commit
before tracing existed, served side by side in one run.

    python -m bench.tracing_bench [--base COMMIT] [--rounds 3]      (make bench-tracing)

Three servers of the shipped repository, each up for the whole run: `none` (the base commit, a
git worktree under runs/engine_ab/, with no tracing code), `off` (this checkout, no OTEL_*
environment) and `on` (this checkout exporting every span over OTLP/gRPC to rotel, a real
collector started here, dropping what it receives). The servers run on core 1, this client on
core 0. Workloads: unary ModelInfer of 8 tokens on bytegpt at concurrency 16 (where a
per-request cost shows most), and 16 generation streams of 64 tokens. Each round measures every
server in a rotating order; printed are off / none and on / none, median and range over rounds.
Writes bench/results/tracing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.engine_ab import worktree
from bench.generation_bench import run_streams
from service.generated import generation_pb2 as gen
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_CORE, CLIENT_CORE = 1, 0


def base_commit() -> str:
    """The commit before service/tracing.py was added."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "service/tracing.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return f"{added[-1]}^"


async def unary(address: str, requests: int, concurrency: int) -> float:
    req = pb.ModelInferRequest(model_name="bytegpt")
    req.inputs.add(name="input_ids", datatype="INT64", shape=[1, 8])
    req.raw_input_contents.append(np.arange(8, dtype=np.int64).tobytes())
    left = requests
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.ModelInfer(req, timeout=30)

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.ModelInfer(req, timeout=30)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def streams() -> list[gen.GenerateRequest]:
    return [
        gen.GenerateRequest(
            model="bytegpt",
            text=f"def f{i}(x):",
            max_new_tokens=64,
            min_tokens=64,
            sampling=gen.SamplingParameters(temperature=0.0),
        )
        for i in range(16)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collector(port: int) -> subprocess.Popen:
    import rotel

    agent = Path(rotel.__file__).parent / "rotel-agent"
    agent.chmod(0o755)
    log = Path(tempfile.mkdtemp()) / "rotel"
    return subprocess.Popen(
        [str(agent), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{port}", "--otlp-http-endpoint",
         f"127.0.0.1:{free_port()}", "--exporter", "blackhole", "--pid-file", f"{log}.pid", "--log-file", f"{log}.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="the commit without tracing (default: the one before it was added)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args()
    base = args.base or base_commit()
    old_root = worktree(base)
    repo = ROOT / "model_repository"
    port = free_port()
    agent = collector(port)
    cores = {SERVER_CORE} if len(os.sched_getaffinity(0)) > 1 else None
    if cores:
        os.sched_setaffinity(0, {CLIENT_CORE})
    env_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
              "OTEL_TRACES_SAMPLER": "always_on"}  # fmt: skip
    results: dict = {"base": base, "rounds": []}
    try:
        with (
            ServerProcess(repo, root=old_root, cores=cores) as none,
            ServerProcess(repo, cores=cores) as off,
            ServerProcess(repo, env=env_on, cores=cores) as on,
        ):
            servers = {"none": none, "off": off, "on": on}
            for s in servers.values():  # warm
                asyncio.run(unary(s.address, 200, 16))
                run_streams(s.address, streams()[:2])
            for k in range(args.rounds):
                order = list(servers)[k % 3 :] + list(servers)[: k % 3]
                r: dict = {}
                for name in order:
                    r.setdefault("infer_per_s", {})[name] = asyncio.run(unary(servers[name].address, args.requests, 16))
                    r.setdefault("stream_tokens_per_s", {})[name] = run_streams(servers[name].address, streams())[
                        "tokens_per_s"
                    ]
                results["rounds"].append(r)
                shown = {m: {n: round(v, 1) for n, v in d.items()} for m, d in r.items()}
                print(f"round {k + 1}: {json.dumps(shown)}")
    finally:
        agent.terminate()
    for metric in ("infer_per_s", "stream_tokens_per_s"):
        rounds = [r[metric] for r in results["rounds"]]
        off = [r["off"] / r["none"] for r in rounds]
        on = [r["on"] / r["none"] for r in rounds]
        results[metric] = {"off_vs_none": off, "on_vs_none": on}
        print(f"{metric}: tracing off / no tracing code {spread(off)}x; on (100% sampled) / none {spread(on)}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracing.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
