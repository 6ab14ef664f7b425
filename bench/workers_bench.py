"""--workers 2 against --workers 1: what a second serving process buys (make bench-workers).

Two models over gRPC ModelInfer, driven by Triton's perf_analyzer at concurrency 16, 32 tokens a
request:

    bert       a BERT-style encoder (hidden 256, 4 layers, 4 heads; random weights after seed 0,
               an Optimum feature-extraction export): a small response (last_hidden_state,
               32 KB) and a few milliseconds of compute
    bytegpt    the shipped decoder's logits: a 720 KB response, whose protobuf and copies cost
               the front end ~1.6 ms of a core each

Each round runs both worker counts on each model, interleaved, the server pinned to the same
cores either way. This machine has two: the servers get both, and perf_analyzer shares them
(it cannot have a core of its own without leaving the server one). With --intra-op-threads
unset the cores are shared out, so one worker runs 2-thread sessions and each of two runs
1-thread sessions. A py-spy profile of the one-worker server at the same load says where its
process time goes (the event loop's share is what a second worker can take on another core).
Prints throughput, p50 and the ratio (median and range over rounds); writes
bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import perf_analyzer
from bench.serve_bench import measure
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / "runs" / "workers"
LENGTH = 32
CONCURRENCY = 16


def build_bert(out: Path) -> Path:
    """The encoder's Optimum export (built once)."""
    exported = out / "optimum"
    if (exported / "model.onnx").exists():
        return exported
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
    )
    BertModel(config).eval().save_pretrained(out / "source")
    subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(out / "source")]
        + ["--task", "feature-extraction", str(exported)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    return exported


def bert_input(path: Path) -> Path:
    ids = [101] + [(7 * i) % 8000 + 100 for i in range(LENGTH - 2)] + [102]
    row = {  # the model batches (its config says so), so shapes leave the batch axis out
        "input_ids": {"content": ids, "shape": [LENGTH]},
        "attention_mask": {"content": [1] * LENGTH, "shape": [LENGTH]},
        "token_type_ids": {"content": [0] * LENGTH, "shape": [LENGTH]},
    }
    path.write_text(json.dumps({"data": [row]}))
    return path


def profile_share(server: ServerProcess, pa: list[str], data: Path, model: str, cores: set[int]) -> dict:
    """py-spy on a one-worker server under the same load: the share of its sampled time per part."""
    from bench.profile_breakdown import breakdown

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.proc.pid), "--rate", "200", "--duration", "5", "--nonblocking"]
            + ["--format", "raw", "--output", raw.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        measure(server, pa, data, model, CONCURRENCY, 600, cores)
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            return {"error": err.strip()[-300:]}
        return breakdown(Path(raw.name).read_text())


def spread(values: list[float], digits: int = 2, unit: str = "x") -> str:
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=800, help="requests per measurement window")
    args = p.parse_args()
    pa = perf_analyzer.ensure()
    cores = set(sorted(os.sched_getaffinity(0))[:2])
    repo = Path(tempfile.mkdtemp())
    shutil.copytree(build_bert(BUILD / "bert"), repo / "bert" / "1")
    shutil.copytree(ROOT / "model_repository" / "bytegpt", repo / "bytegpt")
    data = {
        "bert": bert_input(repo / "bert.json"),
        "bytegpt": perf_analyzer.token_input_file(repo / "bytegpt.json", LENGTH),
    }
    rounds: list[dict] = []
    profiles: dict = {}
    for k in range(args.rounds):
        r: dict = {}
        for workers in (1, 2):
            with ServerProcess(repo, "--workers", str(workers), "--log-level", "warning", cores=cores) as server:
                for model in data:
                    measure(server, pa, data[model], model, CONCURRENCY, 200, cores)  # warm
                    point = measure(server, pa, data[model], model, CONCURRENCY, args.requests, cores)
                    if "error" in point:
                        print(f"round {k + 1}, {model}, {workers} worker(s): {point['error']}", flush=True)
                        continue
                    r[f"{model}_{workers}"] = point["infer_per_s"]
                    r[f"{model}_{workers}_p50_ms"] = point["p50_ms"]
                if workers == 1 and k == 0:
                    profiles = {model: profile_share(server, pa, data[model], model, cores) for model in data}
        print(f"round {k + 1}: " + ", ".join(f"{n} {v:.1f}" for n, v in r.items()), flush=True)
        rounds.append(r)
    shutil.rmtree(repo)

    print(
        f"\n--workers 2 / --workers 1, gRPC ModelInfer, {LENGTH} tokens, concurrency {CONCURRENCY}, "
        f"server and perf_analyzer on cores {sorted(cores)}, {args.rounds} rounds:\n"
    )
    print("| model | 1 worker infer/s | 2 workers infer/s | 2 / 1 | p50 1 / 2 workers ms |\n|---|---|---|---|---|")
    ratios = {}
    for model in data:
        ok = [r for r in rounds if f"{model}_1" in r and f"{model}_2" in r]
        if not ok:
            continue
        ratios[model] = [r[f"{model}_2"] / r[f"{model}_1"] for r in ok]
        one = statistics.median(r[f"{model}_1"] for r in ok)
        two = statistics.median(r[f"{model}_2"] for r in ok)
        p50 = (
            statistics.median(r[f"{model}_1_p50_ms"] for r in ok),
            statistics.median(r[f"{model}_2_p50_ms"] for r in ok),
        )
        print(f"| {model} | {one:.0f} | {two:.0f} | {spread(ratios[model])} | {p50[0]:.1f} / {p50[1]:.1f} |")
    for model, parts in profiles.items():
        if "error" in parts:
            print(f"\nprofile of one worker, {model}: {parts['error']}")
            continue
        top = ", ".join(f"{name} {share:.0%}" for name, share in list(parts.items())[:5])
        print(f"\nprofile of one worker, {model}, concurrency {CONCURRENCY} (share of sampled time): {top}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workers.json").write_text(
        json.dumps({"rounds": rounds, "ratios": ratios, "profiles": profiles, "cores": sorted(cores)}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
