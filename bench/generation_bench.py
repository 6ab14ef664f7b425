"""Generation benchmark: streaming throughput, latency and scheduling, measured in one run.

    python -m bench.generation_bench        (make bench-generation)

1. Aggregate tokens/s at 1, 4, 16 and 32 concurrent streams (greedy, 128 new tokens each, the
   median of 3 rounds),
   time to first token and inter-token latency p50/p99, as ratios to one stream.
2. Scheduling on a mixed-length workload (64 requests, 8-128 new tokens, 16 slots):
   continuous batching vs static batching (a batch runs until its longest member ends) vs
   one request at a time, each a real server with that scheduling.
3. Decode step latency in raw ONNX Runtime at position 16 vs 240 (one token, batch 1), and
   what a batch of 16 costs against batch 1 at position 90 (the ceiling on batching's gain).
4. The same stream counts and scheduling comparison on the engine alone, in-process (no gRPC,
   no client): what the scheduler does, apart from what the transport costs; and a plain greedy
   loop in raw ONNX Runtime over the same prompts and graph (model.onnx, the fused graph, with
   a shared buffer), against which the engine and two servers are set: one as shipped, one tuned
   (prompt-lookup speculation, 8 draft tokens; 8 tokens a stream message), one stream (8 prompts
   one after another) and 16 at once.

Writes bench/results/generation.json and bench/results/generation.png.
"""

from __future__ import annotations

import argparse
import json
import asyncio
import statistics
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from service.generated import generation_pb2 as gen
from service.generation.tokenizer import HFTokenizer
from service.settings import available_cores
from service.generated import generation_pb2_grpc as gen_grpc
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STREAMS = (1, 4, 16, 32)


def run_streams(address: str, requests: list[gen.GenerateRequest], keep_tokens: bool = False) -> dict:
    """Send all requests at once and record every token's arrival. One asyncio loop drives all
    the streams: Python threads, one per stream, cost the two shared cores more than the server."""
    arrivals: dict[int, list[float]] = {}
    starts: dict[int, float] = {}
    ids: dict[int, list[int]] = {}

    async def call(stub, i: int) -> None:
        starts[i] = time.perf_counter()
        times, got = arrivals.setdefault(i, []), ids.setdefault(i, [])
        async for message in stub.GenerateStream(requests[i], timeout=600):
            now = time.perf_counter()
            times.extend(now for _ in message.token_ids)
            got.extend(message.token_ids)

    async def all_streams() -> float:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            await channel.channel_ready()
            t0 = time.perf_counter()
            await asyncio.gather(*(call(stub, i) for i in range(len(requests))))
            return time.perf_counter() - t0

    wall = asyncio.run(all_streams())
    ttft = [arrivals[i][0] - starts[i] for i in arrivals if arrivals[i]]
    itl = [b - a for times in arrivals.values() for a, b in zip(times, times[1:])]
    tokens = sum(len(t) for t in arrivals.values())
    return {
        "streams": len(requests),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": np.percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": np.percentile(ttft, 99) * 1e3,
        "itl_p50_ms": np.percentile(itl, 50) * 1e3 if itl else 0.0,
        "itl_p99_ms": np.percentile(itl, 99) * 1e3 if itl else 0.0,
        **({"token_ids": [ids.get(i, []) for i in range(len(requests))]} if keep_tokens else {}),
    }


def one_at_a_time(address: str, reqs: list[gen.GenerateRequest]) -> dict:
    """Streams one after another: aggregate tokens/s, the median TTFT, every stream's tokens."""
    runs = [run_streams(address, [r], keep_tokens=True) for r in reqs]
    return {
        "tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs),
        "ttft_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
        "token_ids": [r["token_ids"][0] for r in runs],
    }


def request(prompt: str, max_new: int, seed: int) -> gen.GenerateRequest:
    # greedy on distinct prompts; end-of-text could stop a stream early, which the counts include
    return gen.GenerateRequest(
        model="bytegpt",
        text=prompt,
        max_new_tokens=max_new,
        sampling=gen.SamplingParameters(temperature=0.0, seed=seed),
    )


def engine_alone(
    repository: Path,
    workloads: dict[str, tuple[str, int, list[tuple[list[int], int]]]],
    model: str = "bytegpt",
    speculative_tokens: int = 0,
    banned: tuple[int, ...] = (),
) -> dict:
    """tokens/s of each workload (scheduling, slots, [(prompt, new tokens)]) run straight
    against a GenerationEngine; `banned`: end-of-sequence ids never chosen (min_tokens)."""
    from prometheus_client import CollectorRegistry

    from service.generation.engine import EngineLimits, GenerationEngine
    from service.generation.sampling import SamplingParams
    from service.generation.sequence import Sequence
    from service.metrics import Metrics
    from service.models import ModelManager
    from service.settings import Settings

    async def main() -> dict:
        manager = ModelManager(Settings(model_repository=repository), Metrics(CollectorRegistry()))
        await manager.load(model)
        mv = manager.get(model)
        out = {}
        for name, (scheduling, slots, jobs) in workloads.items():
            # the graph the server generates with: the fused one where it matched at load
            engine = GenerationEngine(
                mv.name,
                mv.make_cache,
                EngineLimits(max_sequences=slots, scheduling=scheduling, speculative_tokens=speculative_tokens),
            )
            engine.start()
            warm = Sequence("warm", jobs[0][0], SamplingParams(), 4)  # untimed: first runs allocate
            engine.submit(warm)
            while not (await warm.events.get()).finish_reason:
                pass
            seqs = [
                Sequence(str(i), prompt, SamplingParams(), n, min_tokens=n, eos_token_ids=frozenset(banned))
                for i, (prompt, n) in enumerate(jobs)
            ]  # each makes n tokens
            t0 = time.perf_counter()
            for s in seqs:
                engine.submit(s)
            tokens = 0
            for s in seqs:
                while True:
                    event = await s.events.get()
                    tokens += len(event.token_ids)
                    if event.finish_reason:
                        break
            out[name] = tokens / (time.perf_counter() - t0)
            await engine.close()
        await manager.close()
        return out

    return asyncio.run(main())


def decode_step_latency(model: Path, shapes: list[tuple[int, int]], repeats: int = 200) -> dict:
    """Median ms of one decode step (one new token per row) for each (batch, position)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    out = {}
    for batch, pos in shapes:
        feeds = {
            "input_ids": np.full((batch, 1), 65, np.int64),
            "attention_mask": np.ones((batch, pos + 1), np.int64),
            "position_ids": np.full((batch, 1), pos, np.int64),
        }
        feeds.update(
            {
                p.name: np.random.default_rng(0)
                .standard_normal((batch, p.shape[1], pos, p.shape[3]))
                .astype(np.float32)
                for p in pasts
            }
        )
        for _ in range(10):
            session.run(["logits"], feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(["logits"], feeds)
            times.append(time.perf_counter() - t0)
        out[(batch, pos)] = statistics.median(times) * 1e3
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["streams"]
    x = [r["streams"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, [r["tokens_per_s"] for r in rows], marker="o", color="tab:blue", label="aggregate tokens/s")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax2 = ax.twinx()
    ax2.plot(x, [r["itl_p99_ms"] for r in rows], marker="s", color="tab:red", label="inter-token p99 (ms)")
    ax2.set_ylabel("inter-token latency p99 (ms)", color="tab:red")
    ax.set_title("tserve generation, bytegpt, 128 new tokens per stream")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def raw_loop(
    model: Path,
    prompts: list[list[int]],
    new_tokens: int,
    threads: int,
    rounds: int = 3,
    tokens: list | None = None,
    banned: tuple[int, ...] = (),
) -> float:
    """tokens/s (the best of `rounds`) of a plain greedy loop in raw ONNX Runtime: the prompts left-padded into one
    batch, one prefill run, then one decode run per token with `present` fed back as `past` —
    the least any engine has to do for the same tokens on the same graph."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = ["logits"] + [p.name.replace("past_key_values.", "present.") for p in pasts]
    B, T = len(prompts), max(map(len, prompts))
    ids = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    best = 0.0
    prefill = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)}
    prefill.update({p.name: np.zeros((B, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts})
    session.run(outputs, prefill)  # untimed: a session's first run allocates
    for _ in range(rounds):
        t0 = time.perf_counter()
        feeds = prefill
        m, positions, made = mask, mask.sum(1, keepdims=True), []
        for _step in range(new_tokens):
            out = session.run(outputs, feeds)
            logits = out[0][:, -1]
            logits[:, list(banned)] = -np.inf  # end-of-sequence never chosen (min_tokens)
            token = logits.argmax(-1)[:, None]
            made.append(token)
            m = np.concatenate([m, np.ones((B, 1), np.int64)], axis=1)
            feeds = {"input_ids": token, "attention_mask": m, "position_ids": positions}
            feeds.update(zip((p.name for p in pasts), out[1:]))
            positions = positions + 1
        best = max(best, B * new_tokens / (time.perf_counter() - t0))
    if tokens is not None:  # the greedy tokens, one list per prompt
        tokens[:] = np.concatenate(made, axis=1).tolist()
    return best


def raw_loop_shared(
    model: Path,
    prompts: list[list[int]],
    new_tokens: int,
    threads: int,
    max_length: int,
    head_dim: int,
    rounds: int = 3,
    tokens: list | None = None,
    banned: tuple[int, ...] = (),
) -> float:
    """The same plain greedy loop for a fused graph (GroupQueryAttention): one buffer per past
    input, bound as past and present, each prompt prefilled into its own row, then one batched
    run per token with right-padded masks — what onnxruntime-genai does, in Python. The buffers
    are as wide as the longest prompt plus the new tokens (genai's `max_length`), at most
    `max_length`."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    with_positions = any(i.name == "position_ids" for i in session.get_inputs())
    B, heads = len(prompts), pasts[0].shape[1]
    width = min(max_length, max(map(len, prompts)) + new_tokens)
    buffers = [np.zeros((B, heads, width, head_dim), np.float32) for _ in pasts]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    rows = [[ort.OrtValue.ortvalue_from_numpy(b[r : r + 1]) for b in buffers] for r in range(B)]

    def binding(bound: list) -> ort.IOBinding:
        io = session.io_binding()
        io.bind_output("logits")  # first, so that get_outputs()[0] is the logits
        for p, value in zip(pasts, bound):
            io.bind_ortvalue_input(p.name, value)
            io.bind_ortvalue_output(p.name.replace("past_key_values.", "present."), value)
        return io

    def run(io, ids, mask, positions) -> np.ndarray:
        io.bind_output("logits")
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        if with_positions:
            io.bind_cpu_input("position_ids", positions)
        session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    prefill, decode = [binding(r) for r in rows], binding(values)
    run(
        prefill[0],
        np.array([prompts[0]], np.int64),
        np.ones((1, len(prompts[0])), np.int64),
        np.arange(len(prompts[0]), dtype=np.int64)[None],
    )  # untimed: the first run allocates
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        nxt = []
        for r, p in enumerate(prompts):
            logits = run(
                prefill[r],
                np.array([p], np.int64),
                np.ones((1, len(p)), np.int64),
                np.arange(len(p), dtype=np.int64)[None],
            )
            logits[0, -1, list(banned)] = -np.inf
            nxt.append(int(logits[0, -1].argmax()))
        lengths, made = np.array([len(p) for p in prompts]), [nxt]
        token = np.array(nxt, np.int64)[:, None]
        for _step in range(new_tokens - 1):
            mask = (np.arange(lengths.max() + 1)[None] <= lengths[:, None]).astype(np.int64)
            logits = run(decode, token, mask, lengths[:, None].astype(np.int64))[:, -1]
            logits[:, list(banned)] = -np.inf
            token = logits.argmax(-1)[:, None]
            made.append(token[:, 0].tolist())
            lengths = lengths + 1
        best = max(best, B * new_tokens / (time.perf_counter() - t0))
    if tokens is not None:
        tokens[:] = np.array(made).T.tolist()
    return best


TUNED = ["--generation-speculative-tokens", "8", "--generation-stream-interval", "8"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="runs per concurrency level; the median is reported")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):"]

    print("concurrent streams (continuous batching, 32 slots):", flush=True)
    sweep = []
    with ServerProcess(args.repository) as server:
        run_streams(server.address, [request("warm up", 8, 0)])
        for n in STREAMS:
            rounds = [
                run_streams(
                    server.address,
                    [request(f"{prompts[i % 4]}  # {i}\n", args.new_tokens, i + 100 * k) for i in range(n)],
                )
                for k in range(args.rounds)
            ]
            r = sorted(rounds, key=lambda x: x["tokens_per_s"])[len(rounds) // 2]  # the median round
            sweep.append(r)
            print(
                f"  {n:>2} streams: {r['tokens_per_s']:7.1f} tokens/s, TTFT p50 {r['ttft_p50_ms']:6.1f} ms "
                f"p99 {r['ttft_p99_ms']:6.1f} ms, inter-token p50 {r['itl_p50_ms']:5.1f} ms p99 "
                f"{r['itl_p99_ms']:6.1f} ms",
                flush=True,
            )

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 129, 64)
    workload = [request(f"{prompts[i % 4]}  # job {i}\n", int(n), i) for i, n in enumerate(lengths)]
    scheduling = {}
    for name, flags in (
        ("continuous", ["--generation-max-sequences", "16"]),
        ("static", ["--generation-max-sequences", "16", "--generation-scheduling", "static"]),
        ("one_at_a_time", ["--generation-max-sequences", "1"]),
    ):
        with ServerProcess(args.repository, *flags) as server:
            run_streams(server.address, [request("warm up", 8, 0)])
            scheduling[name] = run_streams(server.address, workload)
        print(
            f"mixed workload, {name}: {scheduling[name]['tokens']} tokens in {scheduling[name]['wall_s']:.2f} s = "
            f"{scheduling[name]['tokens_per_s']:.1f} tokens/s",
            flush=True,
        )

    step_ms = decode_step_latency(
        args.repository / "bytegpt" / "1" / "model.onnx", [(1, 16), (1, 240), (1, 90), (16, 90)]
    )
    steps = {16: step_ms[(1, 16)], 240: step_ms[(1, 240)]}

    tokenizer = HFTokenizer(args.repository / "bytegpt" / "1" / "tokenizer.json")

    def jobs(n: int, new: int) -> list[tuple[list[int], int]]:
        return [(tokenizer.encode(f"{prompts[i % 4]}  # {i}\n"), new) for i in range(n)]

    mixed = [(tokenizer.encode(f"{prompts[i % 4]}  # job {i}\n"), int(n)) for i, n in enumerate(lengths)]

    def served(flags: list[str]) -> dict[int, float]:
        """tokens/s over gRPC for the raw loops' workloads: 8 prompts one after another, and 16
        at once; end-of-sequence ignored, as the loops ignore it."""

        def streams(n: int) -> list[gen.GenerateRequest]:
            return [
                gen.GenerateRequest(
                    model="bytegpt",
                    token_ids=gen.TokenIds(ids=p),
                    max_new_tokens=m,
                    ignore_eos=True,
                    sampling=gen.SamplingParameters(temperature=0.0),
                )
                for p, m in jobs(n, args.new_tokens)
            ]

        with ServerProcess(args.repository, *flags) as server:
            run_streams(server.address, [request("warm up", 8, 0)])
            one = [run_streams(server.address, [r]) for r in streams(8)]
            return {
                1: sum(r["tokens"] for r in one) / sum(r["wall_s"] for r in one),
                16: run_streams(server.address, streams(16))["tokens_per_s"],
            }

    through_grpc = {"default": served([]), "tuned": served(TUNED)}
    print(
        "served, the raw loops' workloads: "
        + ", ".join(f"{k} {v[1]:.0f} tokens/s at 1 stream, {v[16]:.0f} at 16" for k, v in through_grpc.items()),
        flush=True,
    )
    alone = engine_alone(
        args.repository,
        {
            # one stream: 8 sequences one after another, as the raw batch-1 loop below
            "streams_1": ("continuous", 1, jobs(8, args.new_tokens)),
            **{f"streams_{n}": ("continuous", 32, jobs(n, args.new_tokens)) for n in STREAMS if n > 1},
            "continuous": ("continuous", 16, mixed),
            "static": ("static", 16, mixed),
            "one_at_a_time": ("continuous", 1, mixed),
        },
    )
    alone["streams_1_speculative"] = engine_alone(
        args.repository, {"streams_1": ("continuous", 1, jobs(8, args.new_tokens))}, speculative_tokens=8
    )["streams_1"]
    print("engine alone, in-process: " + ", ".join(f"{k} {v:.0f} tokens/s" for k, v in alone.items()), flush=True)
    fused_file = args.repository / "bytegpt" / "1" / "model.onnx"  # the fused graph, shipped alone
    manifest = json.loads((args.repository / "bytegpt" / "1" / "manifest.json").read_text())
    context, head_dim = (
        manifest["model_config"]["block_size"],
        manifest["model_config"]["d_model"] // manifest["model_config"]["n_head"],
    )
    threads = available_cores()
    one_by_one = [p for p, _ in jobs(8, args.new_tokens)]
    # one timed pass each (after an untimed warm-up run), as the engine's
    shared = {
        1: len(one_by_one)
        / sum(
            1 / raw_loop_shared(fused_file, [p], args.new_tokens, threads, context, head_dim, rounds=1)
            for p in one_by_one
        ),
        16: raw_loop_shared(
            fused_file, [p for p, _ in jobs(16, args.new_tokens)], args.new_tokens, threads, context, head_dim, rounds=1
        ),
    }
    print(
        f"raw ORT greedy loop, model.onnx (shared buffer): batch 1 {shared[1]:.0f} tokens/s, "
        f"batch 16 {shared[16]:.0f} tokens/s",
        flush=True,
    )
    base = sweep[0]["tokens_per_s"]
    ratios = {
        "streams16_vs_1": next(r for r in sweep if r["streams"] == 16)["tokens_per_s"] / base,
        "continuous_vs_static": scheduling["continuous"]["tokens_per_s"] / scheduling["static"]["tokens_per_s"],
        "continuous_vs_one_at_a_time": scheduling["continuous"]["tokens_per_s"]
        / scheduling["one_at_a_time"]["tokens_per_s"],
        "step_240_vs_16": steps[240] / steps[16],
        "step_batch16_vs_batch1": step_ms[(16, 90)] / step_ms[(1, 90)],
    }
    ratios["engine_alone_streams16_vs_1"] = alone["streams_16"] / alone["streams_1"]
    ratios["engine_alone_continuous_vs_static"] = alone["continuous"] / alone["static"]
    ratios["engine_alone_vs_raw_loop_batch1"] = alone["streams_1"] / shared[1]  # the same (fused) graph
    ratios["engine_alone_vs_raw_loop_batch16"] = alone["streams_16"] / shared[16]
    ratios["engine_alone_speculative_vs_raw_loop_batch1"] = alone["streams_1_speculative"] / shared[1]
    for name, rates in through_grpc.items():
        for n in (1, 16):
            ratios[f"served_{name}_vs_raw_loop_batch{n}"] = rates[n] / shared[n]
    results = {
        "streams": sweep,
        "scheduling": scheduling,
        "engine_alone_tokens_per_s": alone,
        "raw_shared_loop_tokens_per_s": {str(k): v for k, v in shared.items()},
        "decode_step_ms": {str(k): v for k, v in steps.items()},
        "served_tokens_per_s": {k: {str(n): v for n, v in rates.items()} for k, rates in through_grpc.items()},
        "ratios": ratios,
        "workload_new_tokens": lengths.tolist(),
    }
    (RESULTS / "generation.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "generation.png")

    print(
        "\n| streams | tokens/s | vs 1 stream | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in sweep:
        print(
            f"| {r['streams']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['ttft_p50_ms']:.1f} | "
            f"{r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |"
        )
    print(f"\n16 streams / 1 stream, aggregate tokens/s: {ratios['streams16_vs_1']:.2f}x (target >= 5x)")
    print(
        f"mixed workload: continuous / static batching: {ratios['continuous_vs_static']:.2f}x (target >= 1.5x); "
        f"continuous / one at a time: {ratios['continuous_vs_one_at_a_time']:.2f}x"
    )
    print(
        f"engine alone (no gRPC): 16 streams / 1 stream {ratios['engine_alone_streams16_vs_1']:.2f}x; "
        f"continuous / static {ratios['engine_alone_continuous_vs_static']:.2f}x"
    )
    print(
        f"engine alone / raw ORT greedy loop, same graph (model.onnx) and batch: batch 1 "
        f"{ratios['engine_alone_vs_raw_loop_batch1']:.2f}x, batch 16 {ratios['engine_alone_vs_raw_loop_batch16']:.2f}x "
        f"(target >= 0.9x); with prompt lookup (8 draft tokens), batch 1 "
        f"{ratios['engine_alone_speculative_vs_raw_loop_batch1']:.2f}x"
    )
    print(
        f"tserve over gRPC / raw ORT greedy loop, same graph (model.onnx), prompts and batch: default "
        f"{ratios['served_default_vs_raw_loop_batch1']:.2f}x at 1 stream, "
        f"{ratios['served_default_vs_raw_loop_batch16']:.2f}x "
        f"at 16; tuned (prompt lookup 8, stream interval 8) {ratios['served_tuned_vs_raw_loop_batch1']:.2f}x at 1, "
        f"{ratios['served_tuned_vs_raw_loop_batch16']:.2f}x at 16"
    )
    print(
        f"decode step (raw ORT) at position 90: batch 16 {step_ms[(16, 90)]:.2f} ms, batch 1 "
        f"{step_ms[(1, 90)]:.2f} ms: "
        f"16 rows cost {ratios['step_batch16_vs_batch1']:.2f}x one row"
    )
    print(
        f"decode step (raw ORT, batch 1): position 16 {steps[16]:.2f} ms, position 240 {steps[240]:.2f} ms: "
        f"{ratios['step_240_vs_16']:.2f}x (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
