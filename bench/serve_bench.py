"""Serving benchmark: tserve against raw in-process ONNX Runtime, measured in one run.

    python -m bench.serve_bench            (make bench-serve)

1. Raw ONNX Runtime in-process (the baseline): throughput at each batch size the batcher
   forms, and batch-1 latency.
2. tserve under Triton's perf_analyzer at concurrency 1, 4, 16 and 64, with dynamic
   batching on and off (off = the same repository with dynamic_batching removed): throughput,
   p50/p99 latency, and the mean batch size the server formed (from ModelStatistics).
3. Start-up time to health SERVING and the server's RSS idle and after the sweep.

Prints every figure as a ratio against the baseline and writes bench/results/serve.json and
bench/results/serve.png (throughput vs p99 latency across the concurrency sweep).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import perf_analyzer
from service.settings import available_cores
from tests.service.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONCURRENCY = (1, 4, 16, 64)


def raw_ort(model: Path, batch_sizes: list[int], length: int, threads: int, seconds: float = 2.0) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    rng = np.random.default_rng(0)
    out = {}
    for b in batch_sizes:
        feeds = {"input_ids": rng.integers(0, 256, (b, length)), "attention_mask": np.ones((b, length), np.int64),
                 "position_ids": np.tile(np.arange(length), (b, 1))}
        feeds.update({n: np.zeros((b, s[1], 0, s[3]), np.float32) for n, s in past.items()})
        session.run(["logits"], feeds)
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t0 = time.perf_counter()
            session.run(["logits"], feeds)
            times.append(time.perf_counter() - t0)
        out[b] = {"infer_per_s": b * len(times) / sum(times), "p50_ms": statistics.median(times) * 1e3}
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def without_batching(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    for config in dest.glob("*/config.pbtxt"):
        config.write_text(re.sub(r"dynamic_batching \{[^}]*\{[^}]*\}[^}]*\}\n", "", config.read_text()))
    return dest


def server_stats(server: ServerProcess, model: str) -> tuple[int, int]:
    import grpc

    from service.generated import grpc_service_pb2 as pb
    from service.generated import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as ch:
        s = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    return s.inference_count, s.execution_count


def sweep(server: ServerProcess, pa: list[str], data: Path, model: str, interval_ms: int) -> list[dict]:
    rows = []
    for c in CONCURRENCY:
        before = server_stats(server, model)
        with tempfile.NamedTemporaryFile(suffix=".csv") as report:
            subprocess.run([*pa, "-m", model, "-i", "grpc", "-u", server.address, "--input-data", str(data),
                            "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval_ms),
                            "--stability-percentage", "25", "--max-trials", "6", "-f", report.name],
                           check=True, capture_output=True, text=True, timeout=600)
            record = next(csv.DictReader(open(report.name)))
        after = server_stats(server, model)
        rows.append({
            "concurrency": c,
            "infer_per_s": float(record["Inferences/Second"]),
            "p50_ms": float(record["p50 latency"]) / 1e3,
            "p99_ms": float(record["p99 latency"]) / 1e3,
            "mean_batch": (after[0] - before[0]) / max(1, after[1] - before[1]),
        })
        print(f"  concurrency {c:>2}: {rows[-1]['infer_per_s']:8.1f} infer/s, p50 {rows[-1]['p50_ms']:6.2f} ms, "
              f"p99 {rows[-1]['p99_ms']:6.2f} ms, mean batch {rows[-1]['mean_batch']:.2f}", flush=True)
    return rows


def start_measured(repo: Path) -> tuple[ServerProcess, float]:
    t0 = time.perf_counter()
    server = ServerProcess(repo).start()
    return server, time.perf_counter() - t0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (("batching_on", "dynamic batching on"), ("batching_off", "batching off")):
        rows = results[key]
        ax.plot([r["p99_ms"] for r in rows], [r["infer_per_s"] for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(f"c={r['concurrency']}", (r["p99_ms"], r["infer_per_s"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    raw1 = results["raw_ort"]["1"]["infer_per_s"]
    ax.axhline(raw1, color="grey", linestyle="--", linewidth=1, label="raw ORT, batch 1, one stream")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (inferences/s)")
    ax.set_xscale("log")
    ax.set_title(f"tserve, {results['model']}, {results['length']} tokens/request, {results['cores']} cores")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--model", default="bytegpt")
    p.add_argument("--length", type=int, default=32, help="tokens per request")
    p.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer measurement window")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    pa = perf_analyzer.ensure()
    threads = available_cores()

    with tempfile.TemporaryDirectory() as tmp:
        data = perf_analyzer.token_input_file(Path(tmp) / "input.json", args.length)
        print("tserve, dynamic batching on:", flush=True)
        server, startup_s = start_measured(args.repository)
        try:
            rss_idle = rss_mb(server.proc.pid)
            on = sweep(server, pa, data, args.model, args.interval_ms)
            rss_after = rss_mb(server.proc.pid)
        finally:
            server.terminate()
        print("tserve, batching off:", flush=True)
        server = ServerProcess(without_batching(args.repository, Path(tmp) / "nobatch")).start()
        try:
            off = sweep(server, pa, data, args.model, args.interval_ms)
        finally:
            server.terminate()

    batch_sizes = sorted({1, 2, 4, 8, 16, 32} | {max(1, round(r["mean_batch"])) for r in on})
    print("raw ONNX Runtime in-process:", flush=True)
    raw = raw_ort(args.repository / args.model / "1" / "model.onnx", batch_sizes, args.length, threads)
    for b, r in raw.items():
        print(f"  batch {b:>2}: {r['infer_per_s']:8.1f} infer/s, p50 {r['p50_ms']:.2f} ms")

    c16_on = next(r for r in on if r["concurrency"] == 16)
    c16_off = next(r for r in off if r["concurrency"] == 16)
    c1 = next(r for r in on if r["concurrency"] == 1)
    raw_same_batch = raw[max(1, round(c16_on["mean_batch"]))]["infer_per_s"]
    ratios = {
        "c16_served_vs_raw_same_batch": c16_on["infer_per_s"] / raw_same_batch,
        "c16_batching_on_vs_off": c16_on["infer_per_s"] / c16_off["infer_per_s"],
        "c16_served_vs_raw_batch1": c16_on["infer_per_s"] / raw[1]["infer_per_s"],
        "c1_p50_overhead_ms": c1["p50_ms"] - raw[1]["p50_ms"],
    }
    results = {
        "model": args.model, "length": args.length, "cores": threads, "raw_ort": {str(k): v for k, v in raw.items()},
        "batching_on": on, "batching_off": off, "ratios": ratios,
        "startup_s": startup_s, "rss_idle_mb": rss_idle, "rss_after_sweep_mb": rss_after,
    }
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "serve.png")

    print("\n| concurrency | batching on: infer/s | p50 ms | p99 ms | mean batch | batching off: infer/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(on, off):
        print(f"| {a['concurrency']} | {a['infer_per_s']:.1f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['mean_batch']:.2f} "
              f"| {b['infer_per_s']:.1f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} |")
    print(f"\nbaseline (raw ORT in-process, batch 1, one stream): {raw[1]['infer_per_s']:.1f} infer/s, "
          f"p50 {raw[1]['p50_ms']:.2f} ms")
    print(f"concurrency 16: served / raw ORT at the same mean batch ({c16_on['mean_batch']:.1f}): "
          f"{ratios['c16_served_vs_raw_same_batch']:.2f}x (target >= 0.85x)")
    print(f"concurrency 16: batching on / off: {ratios['c16_batching_on_vs_off']:.2f}x (target >= 1.5x)")
    print(f"concurrency 16: served / baseline: {ratios['c16_served_vs_raw_batch1']:.2f}x")
    print(f"concurrency 1: p50 overhead over raw ORT: {ratios['c1_p50_overhead_ms']:.2f} ms (target <= 0.5 ms)")
    print(f"start-up to SERVING: {startup_s:.2f} s (target <= 3 s); RSS idle {rss_idle:.0f} MB (target <= 300 MB), "
          f"after the sweep {rss_after:.0f} MB")


if __name__ == "__main__":
    main()
