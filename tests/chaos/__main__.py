"""make chaos: the long reliability suite against real servers; figures to bench/results/chaos.json.

python -m tests.chaos [--short]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tests.chaos.scenarios import LONG, SHORT, run_all, targets

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--short", action="store_true", help="the size make test runs")
    args = p.parse_args()
    size = SHORT if args.short else LONG
    started = time.monotonic()
    figures = run_all(size)
    checks = {
        f"{name}: {what}": ok
        for name in figures
        for what, ok in targets(name, figures[name], long=not args.short).items()
    }
    print(f"\nchaos suite ({'short' if args.short else 'long'}), {time.monotonic() - started:.0f} s")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"size": size.__dict__, "figures": figures, "targets": checks}, indent=2) + "\n")
    print(f"written: {RESULTS.relative_to(RESULTS.parents[2])}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
