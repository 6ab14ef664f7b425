"""tserve against onnxruntime-genai, ONNX Runtime's own generation library, on the same model.

    make bench-genai        (creates .venv-genai, builds the models, runs this)

The model is bench/llama_models.py's tiny Llama (hidden 256, 4 layers, 4 heads, vocabulary
512, random weights after seed 0), exported by Optimum for tserve and by genai's model builder
for genai. Sixteen 32-token prompts cut from this repository's source, greedy, 128 new tokens
each, the end-of-sequence token never chosen before the 128th on any path (transformers'
`min_new_tokens`, genai's `min_length`, tserve's `min_tokens`, the raw loops' own mask), so
each makes exactly 128 and the greedy tokens can be compared token for token, 2 intra-op threads
everywhere, everything on the machine's cores at once as a user's quick run would be. Each
round measures, in this order:

    genai       one stream at a time over the 16 prompts; the 16 as one static batch
    raw loops   plain greedy loops in raw ONNX Runtime, batch 1 and 16: over genai's graph with
                a shared KV buffer (IO binding, as genai runs it), and over Optimum's graph
                (numpy, present fed back as past)
    engine      tserve's GenerationEngine in-process (no gRPC) over each graph, 1 and 16
    tserve      a real server, gRPC streams, serving genai's folder as it is and Optimum's:
                one at a time over the 16 prompts; 16 at once
    tuned       the engine with prompt-lookup speculative decoding, and a second server with it
                and a stream interval (--generation-speculative-tokens 8
                --generation-stream-interval 8) on genai's graph: the same greedy tokens in
                fewer runs where drafts are right (this random model repeats itself a lot,
                which flatters prompt lookup: the acceptance rate is printed; it applies to a
                sequence running alone, so not to 16 streams), and 8 tokens a stream message
                (the first at once), which spares the server's and the client's CPU

and prints tokens/s, time to first token and the ratios to genai (median and range over the
rounds), and whether every path's greedy tokens equal transformers' own `generate`.
Writes bench/results/genai.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import onnx

from bench.generation_bench import engine_alone, one_at_a_time, raw_loop, raw_loop_shared, run_streams
from bench.llama_models import GENAI_PYTHON, ROOT, build
from service.generated import generation_pb2 as gen
from service.launcher import ServerProcess

RESULTS = ROOT / "bench" / "results"
THREADS = 2
SPECULATIVE = 8  # draft tokens a run, when speculating
INTERVAL = 8  # tokens a stream message, when tuned


def counter(server: ServerProcess, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    match = re.search(rf'^{name}_total{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def cut_prompts(source: Path, n: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    text = "".join(p.read_text() for p in sorted((ROOT / "service").rglob("*.py")))
    ids = tokenizer.encode(text).ids
    step = len(ids) // n
    return [ids[i * step : i * step + length] for i in range(n)]


def transformers_greedy(source: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(len(prompts), len(prompts[0]), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, len(prompts[0]) :].tolist()


def run_genai(
    model: Path, prompts: list[list[int]], new_tokens: int, threads: int = THREADS, cores: set[int] | None = None
) -> dict:
    """onnxruntime-genai in its own environment, with `threads` intra-op threads, pinned to
    `cores` if given."""
    pin = ["taskset", "-c", ",".join(map(str, sorted(cores)))] if cores else []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(prompts, f)
        f.flush()
        res = subprocess.run(
            [
                *pin,
                str(GENAI_PYTHON),
                str(ROOT / "bench" / "genai_peer.py"),
                str(model),
                f.name,
                str(new_tokens),
                str(threads),
            ],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def requests(prompts: list[list[int]], new_tokens: int, model: str = "llama") -> list[gen.GenerateRequest]:
    return [
        gen.GenerateRequest(
            model=model,
            token_ids=gen.TokenIds(ids=p),
            max_new_tokens=new_tokens,
            min_tokens=new_tokens,
            sampling=gen.SamplingParameters(temperature=0.0),
        )
        for p in prompts
    ]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "llama", help="where the models are built (once)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--server-args", default="", help="extra tserve serve flags, e.g. '--no-ort-spinning'")
    args = p.parse_args()
    source, optimum, genai = build(args.work)
    prompts = cut_prompts(source, 16, 32)
    new = args.new_tokens
    reference = transformers_greedy(source, prompts, new)
    repo = Path(tempfile.mkdtemp())
    shutil.copytree(optimum, repo / "llama" / "1")
    shutil.copytree(genai, repo / "llama_genai" / "1")  # genai's own folder, served as it is
    genai_config = json.loads((genai / "genai_config.json").read_text())["model"]
    context, head_size = genai_config["context_length"], genai_config["decoder"]["head_size"]
    eos = genai_config["eos_token_id"]
    banned = tuple(eos) if isinstance(eos, list) else (eos,)
    rounds, agree = [], {}
    extra = args.server_args.split()
    with (
        ServerProcess(repo, "--generation-max-sequences", "16", *extra) as server,
        ServerProcess(
            repo,
            "--generation-max-sequences",
            "16",
            "--generation-speculative-tokens",
            str(SPECULATIVE),
            "--generation-stream-interval",
            str(INTERVAL),
            *extra,
        ) as spec_server,
    ):
        for model in ("llama", "llama_genai"):
            run_streams(server.address, requests(prompts[:2], 8, model))  # warm
        run_streams(spec_server.address, requests(prompts[:2], 8, "llama_genai"))
        for k in range(args.rounds):
            r: dict = {}
            peer = run_genai(genai, prompts, new)
            r["genai_1"], r["genai_16"] = peer["one_stream_tokens_per_s"], peer["batch_tokens_per_s"]
            r["genai_ttft_1_ms"], r["genai_ttft_16_ms"] = peer["one_stream_ttft_ms"], peer["batch_ttft_ms"]
            loop_1, loop_16, seconds = [], [], 0.0
            for q in prompts:  # one stream at a time, as genai's one-stream figure
                t: list = []
                seconds += new / raw_loop(optimum / "model.onnx", [q], new, THREADS, rounds=1, tokens=t, banned=banned)
                loop_1 += t
            r["raw_loop_1"] = len(prompts) * new / seconds
            r["raw_loop_16"] = raw_loop(
                optimum / "model.onnx", prompts, new, THREADS, rounds=1, tokens=loop_16, banned=banned
            )
            shared_1, shared_16, seconds = [], [], 0.0
            for q in prompts:
                t = []
                seconds += new / raw_loop_shared(
                    genai / "model.onnx", [q], new, THREADS, context, head_size, rounds=1, tokens=t, banned=banned
                )
                shared_1 += t
            r["raw_shared_1"] = len(prompts) * new / seconds
            r["raw_shared_16"] = raw_loop_shared(
                genai / "model.onnx",
                prompts,
                new,
                THREADS,
                context,
                head_size,
                rounds=1,
                tokens=shared_16,
                banned=banned,
            )
            alone = engine_alone(
                repo,
                {
                    "1": ("continuous", 1, [(q, new) for q in prompts]),  # one at a time
                    "16": ("continuous", 16, [(q, new) for q in prompts]),
                },
                model="llama",
                banned=banned,
            )
            r["engine_1"], r["engine_16"] = alone["1"], alone["16"]
            alone = engine_alone(
                repo,
                {
                    "1": ("continuous", 1, [(q, new) for q in prompts]),
                    "16": ("continuous", 16, [(q, new) for q in prompts]),
                },
                model="llama_genai",
                banned=banned,
            )
            r["engine_shared_1"], r["engine_shared_16"] = alone["1"], alone["16"]
            r["engine_spec_1"] = engine_alone(
                repo,
                {"1": ("continuous", 1, [(q, new) for q in prompts])},
                model="llama_genai",
                speculative_tokens=SPECULATIVE,
                banned=banned,
            )["1"]
            single = one_at_a_time(server.address, requests(prompts, new))
            together = run_streams(server.address, requests(prompts, new), keep_tokens=True)
            r["tserve_1"], r["tserve_ttft_1_ms"] = single["tokens_per_s"], single["ttft_ms"]
            r["tserve_16"], r["tserve_ttft_16_ms"] = together["tokens_per_s"], together["ttft_p50_ms"]
            single_shared = one_at_a_time(server.address, requests(prompts, new, "llama_genai"))
            together_shared = run_streams(server.address, requests(prompts, new, "llama_genai"), keep_tokens=True)
            r["tserve_shared_1"], r["tserve_shared_ttft_1_ms"] = single_shared["tokens_per_s"], single_shared["ttft_ms"]
            r["tserve_shared_16"] = together_shared["tokens_per_s"]
            r["tserve_shared_ttft_16_ms"] = together_shared["ttft_p50_ms"]
            counters = ("draft_tokens", "accepted_draft_tokens", "tokens", "steps")
            before = [counter(spec_server, f"tserve_generation_{c}", "llama_genai") for c in counters]
            single_spec = one_at_a_time(spec_server.address, requests(prompts, new, "llama_genai"))
            drafted = [
                counter(spec_server, f"tserve_generation_{c}", "llama_genai") - b for c, b in zip(counters, before)
            ]
            together_spec = run_streams(spec_server.address, requests(prompts, new, "llama_genai"), keep_tokens=True)
            r["tserve_spec_1"], r["tserve_spec_ttft_1_ms"] = single_spec["tokens_per_s"], single_spec["ttft_ms"]
            r["tserve_spec_16"], r["tserve_spec_ttft_16_ms"] = (
                together_spec["tokens_per_s"],
                together_spec["ttft_p50_ms"],
            )
            r["spec_acceptance"] = drafted[1] / drafted[0] if drafted[0] else 0.0
            r["spec_tokens_per_step"] = drafted[2] / drafted[3] if drafted[3] else 0.0
            print(f"round {k + 1}: " + ", ".join(f"{name} {value:.1f}" for name, value in r.items()), flush=True)
            rounds.append(r)
            this_round = {
                "genai one stream": peer["tokens_one_stream"] == reference,
                "genai batch 16": peer["tokens_batch"] == reference,
                "raw loop batch 1": loop_1 == reference,
                "raw loop batch 16": loop_16 == reference,
                "raw shared-buffer loop batch 1": shared_1 == reference,
                "raw shared-buffer loop batch 16": shared_16 == reference,
                "tserve one stream": single["token_ids"] == reference,
                "tserve 16 streams": together["token_ids"] == reference,
                "tserve (genai's graph) one stream": single_shared["token_ids"] == reference,
                "tserve (genai's graph) 16 streams": together_shared["token_ids"] == reference,
                "tserve tuned one stream": single_spec["token_ids"] == reference,
                "tserve tuned 16 streams": together_spec["token_ids"] == reference,
            }
            agree = {k: agree.get(k, True) and v for k, v in this_round.items()}  # equal in every round
    shutil.rmtree(repo)

    def ratios(a: str, b: str) -> list[float]:
        return [r[a] / r[b] for r in rounds]

    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    figures = {
        "tserve tuned / genai, 1 stream, genai's graph": ratios("tserve_spec_1", "genai_1"),
        "tserve tuned / genai, 16 streams, genai's graph": ratios("tserve_spec_16", "genai_16"),
        "tserve / genai, 1 stream, genai's graph": ratios("tserve_shared_1", "genai_1"),
        "tserve / genai, 16 streams (genai: static batch 16), genai's graph": ratios("tserve_shared_16", "genai_16"),
        "tserve / genai, 1 stream, Optimum's graph": ratios("tserve_1", "genai_1"),
        "tserve / genai, 16 streams, Optimum's graph": ratios("tserve_16", "genai_16"),
        "raw shared-buffer loop / genai, batch 1 (same graph)": ratios("raw_shared_1", "genai_1"),
        "raw shared-buffer loop / genai, batch 16 (same graph)": ratios("raw_shared_16", "genai_16"),
        "engine alone / raw loop, batch 1, genai's graph": ratios("engine_shared_1", "raw_shared_1"),
        "engine alone speculative / raw loop, batch 1, genai's graph": ratios("engine_spec_1", "raw_shared_1"),
        "engine alone / raw loop, batch 16, genai's graph": ratios("engine_shared_16", "raw_shared_16"),
        "engine alone / raw loop, batch 1, Optimum's graph": ratios("engine_1", "raw_loop_1"),
        "engine alone / raw loop, batch 16, Optimum's graph": ratios("engine_16", "raw_loop_16"),
        "tserve / engine alone, 1 stream, genai's graph (the gRPC stream's cost)": ratios(
            "tserve_shared_1", "engine_shared_1"
        ),
        "tserve / engine alone, 16 streams, genai's graph": ratios("tserve_shared_16", "engine_shared_16"),
    }
    nodes = {
        name: len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)
        for name, folder in (("Optimum", optimum), ("genai", genai))
    }
    print(
        f"\ntiny Llama, greedy, 16 prompts x 32 tokens, {new} new tokens, {THREADS} threads, {args.rounds} rounds "
        f"(onnxruntime-genai {peer['onnxruntime_genai']}); graph nodes: Optimum's {nodes['Optimum']}, "
        f"genai's {nodes['genai']}:"
    )
    print("\n| path | 1 stream, tokens/s | 16 streams, tokens/s | TTFT 1 stream ms | TTFT 16 streams ms |")
    print("|---|---|---|---|---|")
    print(
        f"| onnxruntime-genai (builder graph, static batch 16) | {med['genai_1']:.0f} | {med['genai_16']:.0f} | "
        f"{med['genai_ttft_1_ms']:.1f} | {med['genai_ttft_16_ms']:.1f} |"
    )
    print(
        f"| raw ORT loop, genai's graph, shared buffer (IO binding) | {med['raw_shared_1']:.0f} | "
        f"{med['raw_shared_16']:.0f} | | |"
    )
    print(
        f"| tserve engine in-process, genai's graph | {med['engine_shared_1']:.0f} | "
        f"{med['engine_shared_16']:.0f} | | |"
    )
    print(
        f"| **tserve, gRPC streams, genai's graph** | {med['tserve_shared_1']:.0f} | {med['tserve_shared_16']:.0f} | "
        f"{med['tserve_shared_ttft_1_ms']:.1f} | {med['tserve_shared_ttft_16_ms']:.1f} |"
    )
    print(
        f"| tserve engine in-process, genai's graph, prompt lookup ({SPECULATIVE}) | {med['engine_spec_1']:.0f} | | | |"
    )
    print(
        f"| **tserve, gRPC streams, genai's graph, tuned: prompt lookup ({SPECULATIVE}), stream interval "
        f"({INTERVAL})** | {med['tserve_spec_1']:.0f} | "
        f"{med['tserve_spec_16']:.0f} | {med['tserve_spec_ttft_1_ms']:.1f} | {med['tserve_spec_ttft_16_ms']:.1f} |"
    )
    print(
        f"| raw ORT loop, Optimum's graph (numpy, present fed back) | {med['raw_loop_1']:.0f} | "
        f"{med['raw_loop_16']:.0f} | | |"
    )
    print(f"| tserve engine in-process, Optimum's graph | {med['engine_1']:.0f} | {med['engine_16']:.0f} | | |")
    print(
        f"| tserve, gRPC streams, Optimum's graph | {med['tserve_1']:.0f} | {med['tserve_16']:.0f} | "
        f"{med['tserve_ttft_1_ms']:.1f} | {med['tserve_ttft_16_ms']:.1f} |"
    )
    print("\n| figure | median (range over rounds) |\n|---|---|")
    for name, values in figures.items():
        print(f"| {name} | {spread(values)} |")
    print(
        f"\nprompt lookup at one stream: {statistics.median(r['spec_acceptance'] for r in rounds):.0%} of draft tokens "
        f"kept, {statistics.median(r['spec_tokens_per_step'] for r in rounds):.2f} tokens per engine step (median over "
        f"rounds); of 16 streams, a row speculates only when it runs alone"
    )
    print(
        "\ngreedy tokens equal transformers' generate in every round: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in agree.items())
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "genai.json").write_text(
        json.dumps(
            {
                "rounds": rounds,
                "median": med,
                "ratios": figures,
                "graph_nodes": nodes,
                "tokens_agree": agree,
                "new_tokens": new,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
