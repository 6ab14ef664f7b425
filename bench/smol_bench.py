"""Generation at a realistic size: the SmolLM-135M-shaped Llama of bench/llama_models.py.

    make bench-smol        (creates .venv-genai, builds the models once, runs this)

The model: hidden 576, MLP 1536, 30 layers, 9 heads, 3 KV heads, vocabulary 8,192 with its own
byte-level BPE, ~111 M parameters, random weights after seed 0, fp32; exported by Optimum (what
a user brings: tserve derives a fused graph from it at load) and by onnxruntime-genai's model
builder (genai's own folder). A decode step costs milliseconds here, so this measures serving,
not Python's per-call cost (bench/genai_bench.py's tiny Llama does that). Three parts, each
repeated over rounds (medians, ranges):

    peer       onnxruntime-genai 0.18 in-process (one stream at a time over 16 prompts; the
               16 as one static batch) against a real tserve serving the Optimum export and
               genai's folder over gRPC streams (one at a time; 16 at once): 32-token prompts,
               64 new tokens, greedy, end-of-sequence banned; every path's greedy ids compared
               with transformers' own generate. tserve runs with prefix caching off here: the
               same prompts come back on every path and in every round
    prefix     prefix caching on (the default) and off: the time to first token of a request
               whose 1,024-token prefix an earlier request computed, over the earlier one's;
               16 chat-like requests sharing a 512-token system prompt, all at once (64 new
               tokens each): tokens/s with the cache over without, and their ids equal
    join       15 streams decoding when a 1,500-token prompt joins: their inter-token gaps
               while it is prefilled (from its arrival to its first token), p99 over the
               median of their gaps before it arrived, and over the median of the same gaps

Everything shares the machine's cores, as a user's quick run would (genai has no client beside
it; tserve's client is an asyncio loop). With --pinned, the fair limit instead: this process
(the client) on core 0, genai and the tserve server on core 1 with one intra-op thread each, so
the client's CPU is no one's but its own; it runs the peer part alone. Writes
bench/results/smol.json (smol_pinned.json with --pinned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.generation_bench import one_at_a_time, run_streams
from bench.genai_bench import cut_prompts, run_genai, spread, transformers_greedy
from bench.llama_models import ROOT, build_smol, export_genai
from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess

RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 64
EOS = 0  # the BPE's <|endoftext|>: banned until the last token on every path


def source_ids(source: Path) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    text = "".join(p.read_text() for p in sorted((ROOT / "service").rglob("*.py")))
    return [i for i in tokenizer.encode(text).ids if i != EOS]


def greedy(prompt: list[int], n: int, model: str = "smol") -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model=model,
        token_ids=gen.TokenIds(ids=prompt),
        max_new_tokens=n,
        min_tokens=n,
        sampling=gen.SamplingParameters(temperature=0.0),
    )


def ttft_ms(address: str, prompt: list[int]) -> float:
    return run_streams(address, [greedy(prompt, 1)])["ttft_p50_ms"]


def join_run(address: str, short: list[list[int]], long: list[int], new_tokens: int) -> dict:
    """15 streams; once each has 8 tokens, the long prompt joins. Gaps of the 15 before it
    arrived, and while it was prefilled (its arrival to its first token)."""
    arrivals: dict[int, list[float]] = {i: [] for i in range(len(short))}
    joined: dict[str, float] = {}

    async def stream(stub, i: int) -> None:
        async for message in stub.GenerateStream(greedy(short[i], new_tokens), timeout=600):
            arrivals[i].extend(time.perf_counter() for _ in message.token_ids)

    async def joiner(stub) -> None:
        while min(len(a) for a in arrivals.values()) < 8:
            await asyncio.sleep(0.005)
        joined["at"] = time.perf_counter()
        async for _ in stub.GenerateStream(greedy(long, 4), timeout=600):
            joined.setdefault("first", time.perf_counter())

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            await channel.channel_ready()
            await asyncio.gather(joiner(stub), *(stream(stub, i) for i in range(len(short))))

    asyncio.run(main())
    at, first = joined["at"], joined["first"]
    before, during = [], []
    for times in arrivals.values():
        for a, b in zip(times, times[1:]):
            (before if b <= at else during if a >= at and b <= first else []).append(b - a)
    median, p99 = statistics.median(before), float(np.percentile(during, 99))
    return {
        "itl_before_p50_ms": median * 1e3,
        "itl_during_p50_ms": statistics.median(during) * 1e3,
        "itl_during_p99_ms": p99 * 1e3,
        "p99_during_over_median_before": p99 / median,
        "p99_during_over_median_during": p99 / statistics.median(during),
        "gaps_during": len(during),
        "joiner_ttft_ms": (first - at) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "smol", help="where the models are built (once)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", default="peer,prefix,join")
    p.add_argument("--pinned", action="store_true", help="client on core 0, genai and tserve on core 1 (peer part)")
    args = p.parse_args()
    parts = {"peer"} if args.pinned else set(args.parts.split(","))
    server_cores = {1} if args.pinned else None
    if args.pinned:  # before any thread starts: every thread of the client inherits it
        os.sched_setaffinity(0, {0})
    source, optimum = build_smol(args.work)
    genai = export_genai(source, args.work)
    ids = source_ids(source)
    prompts = cut_prompts(source, 16, 32)
    repo = Path(tempfile.mkdtemp())
    shutil.copytree(optimum, repo / "smol" / "1")
    shutil.copytree(genai, repo / "smol_genai" / "1")
    cache = Path(tempfile.mkdtemp())  # a cold derivation cache: the first load derives, as a user's
    env = {"TSERVE_CACHE_DIR": str(cache)}
    rounds: list[dict] = []
    agree: dict[str, bool] = {}
    reference = transformers_greedy(source, prompts, NEW_TOKENS) if "peer" in parts else None
    t0 = time.perf_counter()
    with (
        ServerProcess(repo, env=env, cores=server_cores) as server,
        ServerProcess(repo, "--generation-prefix-cache-bytes", "0", env=env, cores=server_cores) as no_cache,
    ):
        print(f"two servers loaded in {time.perf_counter() - t0:.1f} s (the first derives the fused graph)", flush=True)
        for model in ("smol", "smol_genai"):  # warm
            run_streams(server.address, [greedy(prompts[0], 4, model)])
            run_streams(no_cache.address, [greedy(prompts[0], 4, model)])
        for k in range(args.rounds):
            r: dict = {}
            checks: dict[str, bool] = {}
            if "peer" in parts:
                peer = run_genai(genai, prompts, NEW_TOKENS, *((1, server_cores) if args.pinned else ()))
                r["genai_1"], r["genai_16"] = peer["one_stream_tokens_per_s"], peer["batch_tokens_per_s"]
                r["genai_ttft_16_ms"] = peer["batch_ttft_ms"]
                for name, model in (("optimum", "smol"), ("genai_folder", "smol_genai")):
                    # on the server with prefix caching off: the same prompts run on every path
                    # and in every round, and genai keeps nothing between its runs
                    reqs = [greedy(q, NEW_TOKENS, model) for q in prompts]
                    single = one_at_a_time(no_cache.address, reqs)
                    together = run_streams(no_cache.address, reqs, keep_tokens=True)
                    r[f"tserve_{name}_1"], r[f"tserve_{name}_16"] = single["tokens_per_s"], together["tokens_per_s"]
                    r[f"tserve_{name}_ttft_16_ms"] = together["ttft_p50_ms"]
                    checks[f"tserve {name} 1 stream"] = single["token_ids"] == reference
                    checks[f"tserve {name} 16 streams"] = together["token_ids"] == reference
                checks["genai 1 stream"] = peer["tokens_one_stream"] == reference
                checks["genai batch 16"] = peer["tokens_batch"] == reference
            if "prefix" in parts:
                offset = 4096 * (k + 1)  # each round its own prefixes: the first request is cold
                prefix = ids[offset : offset + 1024]
                first = ttft_ms(server.address, prefix + ids[:16])
                second = ttft_ms(server.address, prefix + ids[16:32])
                r["prefix_ttft_first_ms"], r["prefix_ttft_second_ms"] = first, second
                r["prefix_ttft_ratio"] = second / first
                system = ids[offset + 2048 : offset + 2048 + 512]
                chats = [greedy(system + ids[100 + 32 * i : 132 + 32 * i], NEW_TOKENS) for i in range(16)]
                on = run_streams(server.address, chats, keep_tokens=True)
                off = run_streams(no_cache.address, chats, keep_tokens=True)
                r["chat_cache_on"], r["chat_cache_off"] = on["tokens_per_s"], off["tokens_per_s"]
                r["chat_ttft_on_ms"], r["chat_ttft_off_ms"] = on["ttft_p50_ms"], off["ttft_p50_ms"]
                checks["chat ids equal with and without prefix caching"] = on["token_ids"] == off["token_ids"]
            if "join" in parts:
                long = ids[20000 + 2000 * k : 20000 + 2000 * k + 1500]
                joined = join_run(server.address, [ids[32 * i : 32 * i + 32] for i in range(15)], long, 160)
                r.update({f"join_{key}": value for key, value in joined.items()})
            print(f"round {k + 1}: " + ", ".join(f"{n} {v:.2f}" for n, v in r.items()), flush=True)
            rounds.append(r)
            agree = {name: agree.get(name, True) and ok for name, ok in checks.items()}
    shutil.rmtree(repo)
    shutil.rmtree(cache, ignore_errors=True)

    def ratio(a: str, b: str) -> list[float]:
        return [r[a] / r[b] for r in rounds]

    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    figures: dict[str, list[float]] = {}
    if "peer" in parts:
        where = "client on core 0, genai and tserve on core 1, one thread" if args.pinned else "all cores shared"
        print(f"\n{where}:\n| path | 1 stream tok/s | 16 streams tok/s | TTFT at 16 ms |\n|---|---|---|---|")
        print(
            f"| onnxruntime-genai 0.18, static batch | {med['genai_1']:.1f} | {med['genai_16']:.1f} | "
            f"{med['genai_ttft_16_ms']:.0f} |"
        )
        for name, label in (("genai_folder", "genai's own folder"), ("optimum", "the Optimum export (derived graph)")):
            print(
                f"| tserve serving {label} | {med[f'tserve_{name}_1']:.1f} | {med[f'tserve_{name}_16']:.1f} | "
                f"{med[f'tserve_{name}_ttft_16_ms']:.0f} |"
            )
        figures["tserve Optimum export / genai, 1 stream"] = ratio("tserve_optimum_1", "genai_1")
        figures["tserve Optimum export / genai, 16 streams"] = ratio("tserve_optimum_16", "genai_16")
        figures["tserve genai folder / genai, 1 stream"] = ratio("tserve_genai_folder_1", "genai_1")
        figures["tserve genai folder / genai, 16 streams"] = ratio("tserve_genai_folder_16", "genai_16")
    if "prefix" in parts:
        figures["prefix: 2nd request's TTFT / 1st's, 1,024-token shared prefix"] = [
            r["prefix_ttft_ratio"] for r in rounds
        ]
        figures["prefix: 16 chats sharing a 512-token system prompt, tok/s cache on / off"] = ratio(
            "chat_cache_on", "chat_cache_off"
        )
    if "join" in parts:
        figures["join: 15 streams' inter-token p99 while a 1,500-token prompt prefills / their median before"] = [
            r["join_p99_during_over_median_before"] for r in rounds
        ]
        figures["join: the same p99 / their median while it prefills"] = [
            r["join_p99_during_over_median_during"] for r in rounds
        ]
    print("\n| figure | median (range over rounds) |\n|---|---|")
    for name, values in figures.items():
        print(f"| {name} | {spread(values)} |")
    if "prefix" in parts:
        print(
            f"\nprefix TTFT: first {med['prefix_ttft_first_ms']:.0f} ms, second {med['prefix_ttft_second_ms']:.0f} ms; "
            f"chats: {med['chat_cache_on']:.1f} tok/s on, {med['chat_cache_off']:.1f} off, TTFT p50 "
            f"{med['chat_ttft_on_ms']:.0f} / {med['chat_ttft_off_ms']:.0f} ms"
        )
    if "join" in parts:
        print(
            f"join: inter-token p50 before {med['join_itl_before_p50_ms']:.1f} ms, during p50 "
            f"{med['join_itl_during_p50_ms']:.1f} / p99 {med['join_itl_during_p99_ms']:.1f} ms over "
            f"{med['join_gaps_during']:.0f} gaps; the joiner's TTFT {med['join_joiner_ttft_ms']:.0f} ms"
        )
    if agree:
        print("greedy ids equal: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in agree.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("smol_pinned.json" if args.pinned else "smol.json")).write_text(
        json.dumps({"rounds": rounds, "median": med, "ratios": figures, "ids_agree": agree}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
