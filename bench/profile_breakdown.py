"""Where a tserve process spends its time: py-spy's raw (collapsed-stack) samples sorted into
the parts of the serving path.

    python -m bench.profile_breakdown PROFILE.txt      (from `py-spy record --format raw`)

Each sample is given to the first part that claims a frame, from the innermost frame outwards:
time in numpy called from the converters counts as numpy, time in the converters' own lines as
conversion. Idle threads (py-spy's default) are not sampled.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# (part, pattern on "function (file:line)"), first match from the innermost frame wins
PARTS = [
    ("ONNX Runtime (session.run)", r"onnxruntime"),
    ("numpy", r"[/\\]numpy[/\\]"),
    ("protobuf", r"google[/\\]protobuf|_pb2\.py"),
    ("converters (tensors <-> protobuf)", r"service[/\\]servicers[/\\]converters\.py"),
    ("validation", r"service[/\\](validation\.py|conventions)"),
    ("batcher", r"service[/\\]batcher\.py"),
    ("metrics", r"prometheus_client|service[/\\](metrics|stats)\.py"),
    ("data plane", r"service[/\\]dataplane\.py"),
    ("runtime hand-off (executor, threads)", r"concurrent[/\\]futures|threading\.py|service[/\\]runtime\.py"),
    ("servicers", r"service[/\\]servicers"),
    ("grpc aio", r"grpc[/\\]"),
    # grpc.aio's compiled (Cython) callbacks run inside asyncio's Handle._run: py-spy sees no
    # Python frame below it, so receiving, parsing, sending and the loop itself land here
    ("gRPC aio + asyncio (compiled callbacks, the loop)", r"asyncio[/\\]|selectors\.py"),
    ("generation engine", r"service[/\\]generation"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in PARTS]


def breakdown(collapsed: str) -> dict[str, float]:
    """Share of samples per part, largest first."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        part = "other (interpreter, logging, start-up)"
        for frame in reversed(frames):
            hit = next((name for name, rx in _COMPILED if rx.search(frame)), None)
            if hit:
                part = hit
                break
        counts[part] += int(n)
    total = sum(counts.values()) or 1
    return {part: n / total for part, n in counts.most_common()}


def main() -> None:
    for part, share in breakdown(open(sys.argv[1]).read()).items():
        print(f"{part:<40} {share * 100:5.1f}%")


if __name__ == "__main__":
    main()
