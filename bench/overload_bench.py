"""Overload at the door: bursts far above capacity against a server with max_concurrent_rpcs.

    python -m bench.overload_bench [--burst 1000] [--bound 64] [--rounds 3]

Each round fires a burst of ModelInfer calls at once from one asyncio client (tritonclient's
aio API), then measures, for the calls refused: their status (all must be RESOURCE_EXHAUSTED)
and the time from sending to the refusal (p50, p99); for the calls served: that each got its
own full answer; and the time from the end of the burst until a fresh request is served again.
The same bursts against a server with no bound show what the bound changes. The client and
the server are pinned to different cores. The times are seen by the client, so they include
the client's own work on 1,000 calls at once in one Python process. Figures go to
bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


async def burst(address: str, n: int, length: int) -> dict:
    import grpc

    from service.generated import grpc_service_pb2 as pb
    from service.generated import grpc_service_pb2_grpc as pb_grpc

    ids = np.random.default_rng(0).integers(0, 256, (1, length)).astype(np.int64)
    req = pb.ModelInferRequest(model_name="bytegpt")
    req.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    req.raw_input_contents.append(ids.tobytes())
    req.outputs.add(name="logits")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(req, timeout=30)  # connected and warm

        async def one() -> tuple[str, float, bool]:
            t0 = time.perf_counter()
            try:
                res = await stub.ModelInfer(req, timeout=60)
                ok = list(res.outputs[0].shape) == [1, length, 257]
                return "OK", time.perf_counter() - t0, ok
            except grpc.aio.AioRpcError as e:
                return e.code().name, time.perf_counter() - t0, False

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(n)))
        ended = time.perf_counter()
        while True:  # until a fresh request is served
            status, _, _ = await one()
            if status == "OK":
                break
            await asyncio.sleep(0.001)
        recovered = time.perf_counter() - ended
    codes: dict[str, int] = {}
    for status, _, _ in outcomes:
        codes[status] = codes.get(status, 0) + 1
    refused = sorted(t for s, t, _ in outcomes if s == "RESOURCE_EXHAUSTED")
    served = sorted(t for s, t, _ in outcomes if s == "OK")
    return {
        "codes": codes,
        "served_complete": sum(ok for _, _, ok in outcomes),
        "refuse_p50_ms": statistics.median(refused) * 1e3 if refused else None,
        "refuse_p99_ms": refused[int(0.99 * (len(refused) - 1))] * 1e3 if refused else None,
        "served_p50_ms": statistics.median(served) * 1e3 if served else None,
        "burst_s": ended - started,
        "recovery_ms": recovered * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--bound", type=int, default=64, help="max_concurrent_rpcs of the bounded server")
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict = {"burst": args.burst, "bound": args.bound, "length": args.length, "rounds": {}}
    pinned = len(os.sched_getaffinity(0)) >= 2
    if pinned:  # the client on core 0, the server on core 1: neither waits for the other's CPU
        os.sched_setaffinity(0, {0})
    for name, flags in (("bounded", ["--max-concurrent-rpcs", str(args.bound)]), ("unbounded", [])):
        with ServerProcess(args.repository, *flags, cores={1} if pinned else None) as server:
            rounds = []
            for r in range(args.rounds):
                out = asyncio.run(burst(server.address, args.burst, args.length))
                rounds.append(out)
                print(
                    f"{name} round {r + 1}: {out['codes']}, served complete {out['served_complete']}, "
                    f"refused p50 {out['refuse_p50_ms'] or float('nan'):.1f} ms p99 "
                    f"{out['refuse_p99_ms'] or float('nan'):.1f} ms, served p50 "
                    f"{out['served_p50_ms'] or float('nan'):.0f} ms, "
                    f"burst {out['burst_s']:.2f} s, normal service {out['recovery_ms']:.1f} ms after",
                    flush=True,
                )
            results["rounds"][name] = rounds
    (RESULTS / "overload.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
