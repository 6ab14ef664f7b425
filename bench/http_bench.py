"""HTTP beside gRPC: what the second front end costs and how it compares.

    python -m bench.http_bench [--rounds 3] [--concurrency 8] [--requests 800]

Three figures, each a same-round ratio with its spread over interleaved rounds (the server on
core 1, the load generators on core 0):
  - KServe v2 over HTTP ÷ gRPC: perf_analyzer `-i http` (binary tensors) against `-i grpc`, the
    same server, model (bytegpt, 32-token requests) and concurrency;
  - gRPC with the HTTP server on ÷ off (`--no-http`): whether HTTP in the same event loop gets
    in the hot path's way;
  - OpenAI streaming ÷ the gRPC stream: 8 streams of 64 greedy tokens at once, tokens/s, through
    the real `openai` client against tserve's own generation stub.
Figures go to bench/results/http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import openai

from bench import perf_analyzer
from bench.generation_bench import request as grpc_request
from bench.generation_bench import run_streams
from bench.serve_bench import CLIENT_CORE, RESULTS, SERVER_CORE, fmt, measure, summary
from service.launcher import DEFAULT_REPOSITORY
from service.launcher import ServerProcess

PROMPTS = ["def main():", "import os\n", "class A:", "# utils\n", "for i in", "return x", "with open(", "if x:"]


def openai_streams(url: str, new_tokens: int) -> dict:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> int:
        tokens = 0
        stream = await client.completions.create(
            model="bytegpt", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    async def all_streams() -> tuple[int, float]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
            await client.models.list()  # connected
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(client, p) for p in PROMPTS))
            return sum(counts), time.perf_counter() - t0

    tokens, wall = asyncio.run(all_streams())
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    pa = perf_analyzer.ensure()
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = perf_analyzer.token_input_file(Path(tempfile.mkdtemp()) / "input.json", 32)
    os.sched_setaffinity(0, {CLIENT_CORE})
    rounds = []
    with (
        ServerProcess(DEFAULT_REPOSITORY, cores={SERVER_CORE}) as on,
        ServerProcess(DEFAULT_REPOSITORY, "--no-http", cores={SERVER_CORE}) as off,
    ):
        for r in range(args.rounds):
            point = {}
            for name, server, protocol in (("grpc", on, "grpc"), ("http", on, "http"), ("grpc_no_http", off, "grpc")):
                point[name] = measure(
                    server, pa, data, "bytegpt", args.concurrency, args.requests, {CLIENT_CORE}, protocol
                )
            point["grpc_stream"] = run_streams(
                on.address, [grpc_request(pr, args.new_tokens, i) for i, pr in enumerate(PROMPTS)]
            )
            point["openai_stream"] = openai_streams(on.http_url, args.new_tokens)
            rounds.append(point)
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{k} {v.get('infer_per_s', v.get('tokens_per_s', float('nan'))):.0f}"
                    if "error" not in v
                    else f"{k} error: {v['error']}"
                    for k, v in point.items()
                ),
                flush=True,
            )

    def ratio(a: str, b: str, key: str) -> dict:
        return summary([r[a][key] / r[b][key] for r in rounds if key in r[a] and key in r[b]])

    figures = {
        "http_over_grpc": ratio("http", "grpc", "infer_per_s"),
        "grpc_http_on_over_off": ratio("grpc", "grpc_no_http", "infer_per_s"),
        "openai_stream_over_grpc_stream": ratio("openai_stream", "grpc_stream", "tokens_per_s"),
        "http_p50_ms": summary([r["http"].get("p50_ms") for r in rounds]),
        "grpc_p50_ms": summary([r["grpc"].get("p50_ms") for r in rounds]),
    }
    print(
        f"\nbytegpt, 32-token requests, concurrency {args.concurrency}, server on core {SERVER_CORE}, "
        f"clients on core {CLIENT_CORE}, {args.rounds} rounds:"
    )
    print(f"  KServe v2 HTTP ÷ gRPC throughput:        {fmt(figures['http_over_grpc'])}")
    print(
        f"  p50 latency HTTP / gRPC:                 {fmt(figures['http_p50_ms'], ' ms')} / "
        f"{fmt(figures['grpc_p50_ms'], ' ms')}"
    )
    print(f"  gRPC throughput, HTTP on ÷ off:          {fmt(figures['grpc_http_on_over_off'])}")
    print(
        f"  OpenAI stream ÷ gRPC stream, tokens/s:   {fmt(figures['openai_stream_over_grpc_stream'])} "
        f"({len(PROMPTS)} streams of {args.new_tokens} tokens)"
    )
    out = RESULTS / "http.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds, "figures": figures}, indent=2) + "\n")
    print(f"written: {out.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
