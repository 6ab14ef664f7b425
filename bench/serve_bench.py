"""Serving benchmark: tserve against raw in-process ONNX Runtime, measured in one run.

    python -m bench.serve_bench [--rounds 3] [--profile]        (make bench-serve)

1. The baseline first: raw ONNX Runtime in-process at batch sizes 1-32 (throughput, and batch-1
   p50 latency). "Pinned": on the one core the server gets, intra-op 1. "Unpinned": every core.
2. tserve under Triton's perf_analyzer at concurrency 1, 4, 16 and 64, dynamic batching on and
   off (off = the same repository with dynamic_batching removed). Each point is three windows of
   a fixed request count, so a busy machine never makes a point fail for want of a stable window. Pinned: the
   server on core 1, perf_analyzer on core 0 (a fair limit: each has its own core, and raw ORT
   had the server's). Unpinned: everything shares every core, as a quick local run would.
3. Rounds interleave the two servers and the baseline, so drift on a shared machine hits all of
   them; every figure is a same-round ratio, printed as the median and the range over rounds.
4. With --profile: py-spy samples the pinned server at concurrency 16 (batching on) and
   bench/profile_breakdown.py sorts the samples into where the time goes.

A point that fails is recorded with perf_analyzer's own error and the run goes on; results
are written to bench/results/serve.json (and serve.png) whatever happened.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONCURRENCY = (1, 4, 16, 64)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SERVER_CORE, CLIENT_CORE = 1, 0
PINNED_CORES = f"server on core {SERVER_CORE}, perf_analyzer on core {CLIENT_CORE}, raw ORT on core {SERVER_CORE}"


def raw_ort(model: Path, length: int, cores: set[int], seconds: float) -> dict[int, dict]:
    """In-process ONNX Runtime on `cores` (intra-op threads = their count): infer/s per batch
    size, and p50 latency."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # ORT's threads are created below, and inherit it
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = len(cores)
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
        rng = np.random.default_rng(0)
        out = {}
        for b in BATCH_SIZES:
            feeds = {
                "input_ids": rng.integers(0, 256, (b, length)),
                "attention_mask": np.ones((b, length), np.int64),
                "position_ids": np.tile(np.arange(length), (b, 1)),
            }
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
    finally:
        os.sched_setaffinity(0, previous)


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


def measure(
    server: ServerProcess,
    pa: list[str],
    data: Path,
    model: str,
    concurrency: int,
    requests: int,
    cores: set[int] | None,
    protocol: str = "grpc",
) -> dict:
    """One perf_analyzer point: windows of a fixed request count (not of time), and a stability
    bound wide enough that three windows always do: a busy machine slows a point, never fails it.
    (perf_analyzer's --request-count was not used: its throughput came out rounded to whole
    seconds of run time, e.g. 199.8 and 393.0 infer/s where windows measured 251 and 456.)"""
    before = server_stats(server, model)
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        url = server.address if protocol == "grpc" else server.http_address
        cmd = [
            *pa,
            "-m",
            model,
            "-i",
            protocol,
            "-u",
            url,
            "--input-data",
            str(data),
            "--concurrency-range",
            str(concurrency),
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            str(max(requests, 4 * concurrency)),
            "--stability-percentage",
            "999",
            "--max-trials",
            "3",
            "-f",
            report.name,
        ]
        if cores:  # taskset, not a preexec_fn: this process has ORT's threads, and a fork can deadlock in one
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cores))), *cmd]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"concurrency": concurrency, "error": "perf_analyzer ran past 600 s"}
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
            return {"concurrency": concurrency, "error": " | ".join(tail)}
        record = next(csv.DictReader(open(report.name)))
    after = server_stats(server, model)
    return {
        "concurrency": concurrency,
        "infer_per_s": float(record["Inferences/Second"]),
        "p50_ms": float(record["p50 latency"]) / 1e3,
        "p99_ms": float(record["p99 latency"]) / 1e3,
        "mean_batch": (after[0] - before[0]) / max(1, after[1] - before[1]),
    }


def profile(server: ServerProcess, pa: list[str], data: Path, model: str, requests: int) -> dict:
    """py-spy on the server while perf_analyzer (pinned apart) drives concurrency 16."""
    from bench.profile_breakdown import breakdown

    py_spy = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
    raw = RESULTS / "serve_profile_c16.txt"
    svg = RESULTS / "serve_profile_c16.svg"
    common = [py_spy, "record", "--pid", str(server.proc.pid), "--rate", "250", "--duration", "6", "--nonblocking"]
    out = {}
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        spy = subprocess.Popen(
            [*common, "--format", fmt, "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        point = measure(server, pa, data, model, 16, requests, {CLIENT_CORE})
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            return {"error": f"py-spy: {err.strip()[-300:]}"}
        out[fmt] = point
    return {"breakdown": breakdown(raw.read_text()), "flamegraph": str(svg.relative_to(ROOT)), "during": out["raw"]}


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, unit: str = "x", digits: int = 2) -> str:
    if s["median"] is None:
        return "n/a (every round failed)"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f} over {s['n']})"


def round_ratios(raw: dict, on: list[dict], off: list[dict]) -> dict:
    """The issue's figures from one round, or None where a point failed."""

    def point(rows, c):
        r = next(r for r in rows if r["concurrency"] == c)
        return None if "error" in r else r

    c1, c4, c16, c16_off = point(on, 1), point(on, 4), point(on, 16), point(off, 16)
    best16 = max(raw[b]["infer_per_s"] for b in BATCH_SIZES if b <= 16)
    ratios = {
        "c16_served_vs_raw_best": c16 and c16["infer_per_s"] / best16,
        "c16_served_vs_raw_same_batch": c16 and c16["infer_per_s"] / raw[_nearest(c16["mean_batch"])]["infer_per_s"],
        "c16_batching_on_vs_off": c16 and c16_off and c16["infer_per_s"] / c16_off["infer_per_s"],
        "c1_p50_overhead_ms": c1 and c1["p50_ms"] - raw[1]["p50_ms"],
        "c4_mean_batch": c4 and c4["mean_batch"],
        "c16_mean_batch": c16 and c16["mean_batch"],
    }
    return ratios


def _nearest(batch: float) -> int:
    return min(BATCH_SIZES, key=lambda b: abs(b - batch))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, pinning in zip(axes, ("pinned", "unpinned")):
        rounds = results[pinning]["rounds"]
        for key, label in (("batching_on", "dynamic batching on"), ("batching_off", "batching off")):
            for i, rnd in enumerate(rounds):
                rows = [r for r in rnd[key] if "error" not in r]
                ax.plot(
                    [r["p99_ms"] for r in rows],
                    [r["infer_per_s"] for r in rows],
                    marker="o",
                    alpha=0.8,
                    color="C0" if key == "batching_on" else "C1",
                    label=label if i == 0 else None,
                )
        raw1 = statistics.median(rnd["raw"]["1"]["infer_per_s"] for rnd in rounds)
        ax.axhline(raw1, color="grey", linestyle="--", linewidth=1, label="raw ORT, batch 1")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_xscale("log")
        ax.set_title(f"{pinning}: {'server core 1, client core 0' if pinning == 'pinned' else 'all cores shared'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("throughput (inferences/s)")
    fig.suptitle(
        f"tserve, {results['model']}, {results['length']} tokens/request, c = {', '.join(map(str, CONCURRENCY))}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--model", default="bytegpt")
    p.add_argument("--length", type=int, default=32, help="tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200, help="requests per measurement window (3 windows a point)")
    p.add_argument("--raw-seconds", type=float, default=0.6, help="time per raw ORT batch size, per round")
    p.add_argument("--profile", action="store_true", help="py-spy the pinned server at concurrency 16")
    p.add_argument("--server-args", default="", help="extra tserve serve flags, e.g. '--no-ort-spinning'")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    pa = perf_analyzer.ensure()
    all_cores = os.sched_getaffinity(0)
    pinnable = len(all_cores) >= 2 and {SERVER_CORE, CLIENT_CORE} <= all_cores
    plans = (
        {"pinned": ({SERVER_CORE}, {CLIENT_CORE}), "unpinned": (None, None)} if pinnable else {"unpinned": (None, None)}
    )
    model_file = args.repository / args.model / "1" / "model.onnx"
    results: dict = {
        "model": args.model,
        "length": args.length,
        "cores": len(all_cores),
        "rounds": args.rounds,
        "requests_per_point": args.requests,
        "server_args": args.server_args,
    }
    out_path = RESULTS / "serve.json"

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        data = perf_analyzer.token_input_file(Path(tmp) / "input.json", args.length)
        nobatch = without_batching(args.repository, Path(tmp) / "nobatch")
        servers: dict = {}
        try:
            for pinning, (server_cores, _) in plans.items():
                results[pinning] = {"rounds": []}
                t0 = time.perf_counter()
                on = ServerProcess(args.repository, *args.server_args.split(), cores=server_cores).start()
                results[pinning]["startup_s"] = time.perf_counter() - t0
                results[pinning]["rss_idle_mb"] = rss_mb(on.proc.pid)
                off = ServerProcess(nobatch, *args.server_args.split(), cores=server_cores).start()
                servers[pinning] = (on, off)
            for r in range(args.rounds):
                for pinning, (server_cores, client_cores) in plans.items():
                    on, off = servers[pinning]
                    print(f"round {r + 1}/{args.rounds}, {pinning}:", flush=True)
                    raw = raw_ort(model_file, args.length, server_cores or all_cores, args.raw_seconds)
                    print(
                        "  raw ORT: "
                        + ", ".join(f"b{b} {v['infer_per_s']:.0f}/s" for b, v in raw.items())
                        + f"; batch-1 p50 {raw[1]['p50_ms']:.2f} ms",
                        flush=True,
                    )
                    rnd = {"raw": {str(b): v for b, v in raw.items()}, "batching_on": [], "batching_off": []}
                    for c in CONCURRENCY:
                        for key, server in (("batching_on", on), ("batching_off", off)):
                            point = measure(server, pa, data, args.model, c, args.requests, client_cores)
                            rnd[key].append(point)
                            if "error" in point:
                                print(f"  {key:>12} c={c:>2}: FAILED: {point['error']}", flush=True)
                            else:
                                print(
                                    f"  {key:>12} c={c:>2}: {point['infer_per_s']:7.1f} infer/s, p50 "
                                    f"{point['p50_ms']:6.2f} ms, p99 {point['p99_ms']:6.2f} ms, "
                                    f"mean batch {point['mean_batch']:.2f}",
                                    flush=True,
                                )
                    rnd["ratios"] = round_ratios(raw, rnd["batching_on"], rnd["batching_off"])
                    results[pinning]["rounds"].append(rnd)
                    save()
            for pinning, (on, _) in servers.items():
                results[pinning]["rss_after_mb"] = rss_mb(on.proc.pid)
            if args.profile and "pinned" in servers:
                print("profiling the pinned server at concurrency 16 ...", flush=True)
                results["profile"] = profile(servers["pinned"][0], pa, data, args.model, args.requests)
        finally:
            for on, off in servers.values():
                on.terminate()
                off.terminate()
            for pinning in plans:
                rounds = results.get(pinning, {}).get("rounds", [])
                results.setdefault(pinning, {})["summary"] = {
                    k: summary([rnd["ratios"][k] for rnd in rounds]) for k in (rounds[0]["ratios"] if rounds else {})
                }
            save()
    plot(results, RESULTS / "serve.png")
    report(results)


def report(results: dict) -> None:
    for pinning in ("pinned", "unpinned"):
        if pinning not in results or not results[pinning]["rounds"]:
            continue
        part = results[pinning]
        print(f"\n## {pinning} ({PINNED_CORES if pinning == 'pinned' else 'all on every core'})")
        print(
            "\n| concurrency | batching on: infer/s | p50 ms | p99 ms | mean batch | batching off: infer/s | "
            "p50 ms | p99 ms |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for i, c in enumerate(CONCURRENCY):

            def med(key, field):
                vals = [rnd[key][i][field] for rnd in part["rounds"] if "error" not in rnd[key][i]]
                return f"{statistics.median(vals):.2f}" if vals else "failed"

            print(
                f"| {c} | {med('batching_on', 'infer_per_s')} | {med('batching_on', 'p50_ms')} | "
                f"{med('batching_on', 'p99_ms')} | {med('batching_on', 'mean_batch')} | "
                f"{med('batching_off', 'infer_per_s')} | {med('batching_off', 'p50_ms')} | "
                f"{med('batching_off', 'p99_ms')} |"
            )
        raw1 = statistics.median(rnd["raw"]["1"]["infer_per_s"] for rnd in part["rounds"])
        raw1_p50 = statistics.median(rnd["raw"]["1"]["p50_ms"] for rnd in part["rounds"])
        s = part["summary"]
        print(f"\nbaseline (raw ORT in-process, batch 1, one stream): {raw1:.1f} infer/s, p50 {raw1_p50:.2f} ms")
        print(
            f"concurrency 16, served / raw ORT at its best batch <= 16: {fmt(s['c16_served_vs_raw_best'])} "
            "(target >= 0.85x)"
        )
        print(f"concurrency 16, served / raw ORT at the same mean batch: {fmt(s['c16_served_vs_raw_same_batch'])}")
        print(f"concurrency 16, batching on / off: {fmt(s['c16_batching_on_vs_off'])} (target >= 1.5x)")
        print(f"concurrency 1, p50 overhead over raw ORT: {fmt(s['c1_p50_overhead_ms'], ' ms')} (target <= 0.5 ms)")
        print(f"mean batch at c=4: {fmt(s['c4_mean_batch'], '')}; at c=16: {fmt(s['c16_mean_batch'], '')}")
        print(
            f"start-up to SERVING {part['startup_s']:.2f} s; RSS idle {part['rss_idle_mb']:.0f} MB, "
            f"after the rounds {part.get('rss_after_mb', float('nan')):.0f} MB"
        )
    if "profile" in results:
        prof = results["profile"]
        if "error" in prof:
            print(f"\nprofile: {prof['error']}")
        else:
            print(f"\nwhere the pinned server's time goes at c=16 (py-spy, {prof['flamegraph']}):")
            for name, share in prof["breakdown"].items():
                print(f"  {name:<34} {share * 100:5.1f}%")


if __name__ == "__main__":
    main()
