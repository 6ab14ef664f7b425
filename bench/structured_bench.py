"""What structured output and log-probabilities cost, on a model of realistic size.

    python -m bench.structured_bench        (make bench-structured)

The SmolLM-135M-shaped Llama of bench/llama_models.py (random weights, its Optimum export,
served as a user's folder is), 16 concurrent streams of 64 new tokens each after 32-token
prompts, sampled (temperature 1, a seed per stream), end-of-sequence banned. The server is
pinned to core 1, the client (one asyncio loop) to core 0. Each round runs, interleaved:

    free         16 unconstrained streams
    constrained  the same 16, 8 of them held to a JSON schema (an array of short strings, at
                 least 200 of them: it outlasts the 64 tokens, so the batch keeps its 16 rows)
    logprobs     the same 16 unconstrained, each asking for its tokens' log-probabilities and
                 the 5 most likely alternatives

and prints, as the median (range) over the rounds: the unconstrained 8's tokens/s beside 8
constrained ÷ in the free run (target >= 0.9x), the constrained streams' time per token ÷ the
free streams' in the same run, and 16 streams with logprobs ÷ without (target >= 0.95x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from bench.llama_models import build_smol
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_CORE, CLIENT_CORE = 1, 0
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 200}
STREAMS, NEW_TOKENS, PROMPT_TOKENS = 16, 64, 32


def requests(prompts: list[list[int]], constrained: int = 0, logprobs: int | None = None) -> list:
    out = []
    for i, prompt in enumerate(prompts):
        req = gen.GenerateRequest(
            model="smol",
            token_ids=gen.TokenIds(ids=prompt),
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
            sampling=gen.SamplingParameters(temperature=1.0, seed=i),
            request_id=f"s{i}",
        )
        if i >= len(prompts) - constrained:
            req.structured_output.json_schema = json.dumps(SCHEMA)
        if logprobs is not None:
            req.logprobs = logprobs
        out.append(req)
    return out


def run(address: str, reqs: list) -> list[dict]:
    """All streams at once; each stream's tokens and its first and last token's times."""

    async def call(stub, req) -> dict:
        start, times, tokens = time.perf_counter(), [], 0
        async for message in stub.GenerateStream(req, timeout=600):
            if message.token_ids:
                times.append(time.perf_counter())
                tokens += len(message.token_ids)
        return {"start": start, "first": times[0], "end": times[-1], "tokens": tokens}

    async def main() -> list[dict]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            await channel.channel_ready()
            return await asyncio.gather(*(call(stub, r) for r in reqs))

    return asyncio.run(main())


def rate(streams: list[dict]) -> float:
    """Aggregate tokens/s of these streams, from the first start to the last token."""
    return sum(s["tokens"] for s in streams) / (max(s["end"] for s in streams) - min(s["start"] for s in streams))


def per_token_ms(streams: list[dict]) -> float:
    """Median time between a stream's first and last token, per token after the first."""
    return statistics.median((s["end"] - s["first"]) / max(1, s["tokens"] - 1) for s in streams) * 1e3


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "smol")
    args = p.parse_args()
    source, export = build_smol(args.model_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    ids = tokenizer.encode(Path(os.__file__).read_text()).ids  # the standard library's os.py
    step = (len(ids) - PROMPT_TOKENS) // STREAMS
    prompts = [ids[i * step : i * step + PROMPT_TOKENS] for i in range(STREAMS)]
    pinned = {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "smol").mkdir()
        os.symlink(export, repo / "smol" / "1")
        flags = ["--generation-max-sequences", str(STREAMS)]
        with ServerProcess(repo, *flags, cores={SERVER_CORE} if pinned else None) as server:
            if pinned:
                os.sched_setaffinity(0, {CLIENT_CORE})
            run(server.address, requests(prompts[:2]))  # warm-up: the first runs allocate
            run(server.address, requests(prompts[:2], constrained=1))  # and the grammar's tokenizer
            rounds = []
            for r in range(args.rounds):
                free = run(server.address, requests(prompts))
                constrained = run(server.address, requests(prompts, constrained=8))
                logprobs = run(server.address, requests(prompts, logprobs=5))
                point = {
                    "free_tokens_per_s": rate(free),
                    "free_first8_tokens_per_s": rate(free[:8]),
                    "beside_constrained_first8_tokens_per_s": rate(constrained[:8]),
                    "constrained_tokens_per_s": rate(constrained[8:]),
                    "free_ms_per_token": per_token_ms(free[8:]),
                    "constrained_ms_per_token": per_token_ms(constrained[8:]),
                    "unconstrained_ms_per_token_beside": per_token_ms(constrained[:8]),
                    "logprobs_tokens_per_s": rate(logprobs),
                }
                rounds.append(point)
                print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in point.items()), flush=True)
    ratios = {
        "unconstrained8_beside_8_constrained_vs_free": [
            p["beside_constrained_first8_tokens_per_s"] / p["free_first8_tokens_per_s"] for p in rounds
        ],
        "constrained_vs_free_time_per_token": [p["constrained_ms_per_token"] / p["free_ms_per_token"] for p in rounds],
        "logprobs_on_vs_off_16_streams": [p["logprobs_tokens_per_s"] / p["free_tokens_per_s"] for p in rounds],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps({"rounds": rounds, "ratios": ratios}, indent=1) + "\n")
    where = f"server on core {SERVER_CORE}, client on core {CLIENT_CORE}" if pinned else "unpinned"
    print(
        f"\nSmolLM-135M-shaped Llama (random weights, Optimum export), {STREAMS} streams x {NEW_TOKENS} tokens, "
        f"{where}, median (range) over {len(rounds)} rounds:"
    )
    free8 = statistics.median(p["free_first8_tokens_per_s"] for p in rounds)
    print(
        f"unconstrained 8 beside 8 schema-constrained / the same 8 with none constrained: "
        f"{spread(ratios['unconstrained8_beside_8_constrained_vs_free'])} (target >= 0.9x; {free8:.1f} tokens/s free)"
    )
    ms = statistics.median(p["constrained_ms_per_token"] for p in rounds)
    print(
        f"constrained streams' time per token / the free run's: {spread(ratios['constrained_vs_free_time_per_token'])} "
        f"({ms:.1f} ms a token)"
    )
    logprobs = spread(ratios["logprobs_on_vs_off_16_streams"])
    print(f"16 streams with logprobs (top 5) / without: {logprobs} (target >= 0.95x)")


if __name__ == "__main__":
    main()
