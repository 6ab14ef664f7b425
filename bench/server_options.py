"""ORT thread and spinning settings, measured side by side: the defaults are chosen from this.

    python -m bench.server_options [--rounds 3]

For each pair of settings, alternating servers in each round (so drift hits both), perf_analyzer
drives the shipped bytegpt at concurrency 1, 16 and 64 (count windows, as bench/serve_bench.py),
everything on every core as a default deployment would be. Prints infer/s and p50 per setting,
the median and range over rounds. Writes bench/results/server_options.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench import perf_analyzer
from bench.serve_bench import RESULTS, ROOT, measure
from service.launcher import ServerProcess

COMPARISONS = {
    "spinning": (("--ort-spinning",), ("--no-ort-spinning",)),
    "intra-op threads": (("--intra-op-threads", "2"), ("--intra-op-threads", "1")),
}
CONCURRENCY = (1, 16, 64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    pa = perf_analyzer.ensure()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = perf_analyzer.token_input_file(Path(tmp) / "input.json", 32)
        for name, options in COMPARISONS.items():
            points = {" ".join(o): {c: [] for c in CONCURRENCY} for o in options}
            for _ in range(args.rounds):
                for flags in options:
                    with ServerProcess(args.repository, *flags) as server:
                        for c in CONCURRENCY:
                            point = measure(server, pa, data, "bytegpt", c, args.requests, None)
                            if "error" not in point:
                                points[" ".join(flags)][c].append(point)
            results[name] = points
            print(f"\n{name} (median, range over {args.rounds} rounds):")
            for setting, by_c in points.items():
                for c, runs in by_c.items():
                    rate = [r["infer_per_s"] for r in runs]
                    p50 = [r["p50_ms"] for r in runs]
                    if rate:
                        print(
                            f"  {setting:<22} c={c:<3} {statistics.median(rate):6.1f} infer/s "
                            f"({min(rate):.1f}-{max(rate):.1f}), "
                            f"p50 {statistics.median(p50):6.2f} ms ({min(p50):.2f}-{max(p50):.2f})",
                            flush=True,
                        )
    (RESULTS / "server_options.json").write_text(
        json.dumps(
            {k: {s: {str(c): v for c, v in by.items()} for s, by in d.items()} for k, d in results.items()}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
