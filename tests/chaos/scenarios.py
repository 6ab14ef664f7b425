"""tserve's reliability suite: what a hostile client, an overload and an orchestrator do to a
real server, over the wire on loopback. Each scenario starts its own server (stopped by PID),
is bounded in count and in time, and returns its figures as a flat dict.

Two sizes: `SHORT` runs inside `make test` (tests/chaos/test_chaos.py asserts the targets),
`LONG` is `make chaos` (python -m tests.chaos), whose figures go in the README.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from service.generated import generation_pb2 as gen
from service.generated import generation_pb2_grpc as gen_grpc
from service.generated import grpc_service_pb2 as pb
from service.generated import grpc_service_pb2_grpc as pb_grpc
from tests.chaos import third_party
from tests.chaos.http_fuzz import http_fuzz
from tests.chaos.third_party import repository as third_party_repository
from tests.conftest import BYTEGPT_VOCAB
from service.launcher import ServerProcess, channel

VOCAB = BYTEGPT_VOCAB  # token ids 0..VOCAB-1 are valid for the shipped bytegpt
# answers a decodable request may get; INTERNAL, UNKNOWN and UNAVAILABLE never
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
HANG_S = 5.0


@dataclass(frozen=True)
class Size:
    malformed: int  # fuzzed requests (ModelInfer and Generate together)
    crosstalk_rounds: int  # requests per client, 64 clients
    overload_waves: int
    overload_burst: int
    sigterms: int
    sigterms_workers: int  # SIGTERMs to a server of two workers (--workers 2)
    kills: int
    soak_s: float


SHORT = Size(
    malformed=600,
    crosstalk_rounds=4,
    overload_waves=1,
    overload_burst=400,
    sigterms=2,
    sigterms_workers=2,
    kills=1,
    soak_s=24.0,
)
LONG = Size(
    malformed=20_000,
    crosstalk_rounds=40,
    overload_waves=3,
    overload_burst=2000,
    sigterms=20,
    sigterms_workers=10,
    kills=5,
    soak_s=120.0,
)


def infer_request(ids: np.ndarray, model: str = "bytegpt") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    req.raw_input_contents.append(np.ascontiguousarray(ids, np.int64).tobytes())
    req.outputs.add(name="logits")
    return req


def logits(res: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(res.raw_output_contents[0], np.float32).reshape(list(res.outputs[0].shape))


# -- structured fuzz -------------------------------------------------------------------------

_DTYPES = ["INT64", "INT32", "FP32", "FP16", "BOOL", "BYTES", "UINT8", "", "int64", "x" * 300]
_NAMES = ["input_ids", "input_ids", "input_ids", "attention_mask", "position_ids", "", "logits", "ids\x00", "n" * 2000]
_PARAMS = [
    "shared_memory_region",
    "shared_memory_byte_size",
    "binary_data",
    "priority",
    "timeout",
    "sequence_id",
    "classification",
    "binary_data_size",
    "unknown_key",
    "",
]


def _dim(rng: random.Random) -> int:
    return rng.choice([1, 1, 2, 3, 7, 16, 0, -1, -5, 33, 255, 256, 257, 1 << 20, 1 << 40, (1 << 63) - 1])


def fuzz_infer(rng: random.Random) -> pb.ModelInferRequest:
    """A ModelInfer that is malformed in one to three ways (or, now and then, in none)."""
    batch, length = rng.choice([1, 2, 4]), rng.choice([1, 5, 17, 64])
    ids = np.array([[rng.randrange(VOCAB) for _ in range(length)] for _ in range(batch)], np.int64)
    req = infer_request(ids)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(12)
        t = req.inputs[0] if req.inputs else None
        if kind == 0:
            req.model_name = rng.choice(["", "nope", "bytegpt ", "B" * 1000, "bytegpt_int8", "../etc"])
        elif kind == 1:
            req.model_version = rng.choice(["0", "7", "-1", "latest", "1" * 40, "1"])
        elif kind == 2 and t is not None:
            t.datatype = rng.choice(_DTYPES)
        elif kind == 3 and t is not None:
            del t.shape[:]
            t.shape.extend(_dim(rng) for _ in range(rng.choice([0, 1, 2, 2, 3, 4])))
        elif kind == 4 and req.raw_input_contents:
            raw = req.raw_input_contents[0]
            req.raw_input_contents[0] = rng.choice(
                [b"", raw[:-1], raw + b"\x00" * 8, raw[: len(raw) // 2], bytes(rng.randrange(256) for _ in range(24))]
            )
        elif kind == 5 and req.raw_input_contents:
            bad = ids.copy()
            bad.flat[rng.randrange(bad.size)] = rng.choice([-1, VOCAB, 1 << 40, -(1 << 63)])
            req.raw_input_contents[0] = bad.tobytes()
        elif kind == 6 and t is not None:
            t.name = rng.choice(_NAMES)
        elif kind == 7:
            extra = req.inputs.add(
                name=rng.choice(_NAMES), datatype=rng.choice(_DTYPES), shape=[_dim(rng) for _ in range(2)]
            )
            if rng.random() < 0.5:
                req.raw_input_contents.append(b"\x01" * rng.choice([0, 8, 16, 64]))
            else:
                extra.contents.int64_contents.extend([1, 2])
        elif kind == 8 and t is not None:  # typed contents instead of (or beside) raw
            t.contents.int64_contents.extend(int(v) for v in ids.flat)
            if rng.random() < 0.5:
                req.ClearField("raw_input_contents")
        elif kind == 9:
            key = rng.choice(_PARAMS)
            target = rng.choice(
                [
                    req.parameters,
                    req.outputs[0].parameters if req.outputs else req.parameters,
                    t.parameters if t is not None else req.parameters,
                ]
            )
            p = target[key]
            rng.choice(
                [
                    lambda: setattr(p, "string_param", "region0"),
                    lambda: setattr(p, "int64_param", -7),
                    lambda: setattr(p, "bool_param", True),
                    lambda: setattr(p, "uint64_param", 1 << 62),
                ]
            )()
        elif kind == 10:
            del req.outputs[:]
            for name in rng.sample(["logits", "scores", "", "input_ids", "logits"], rng.randint(0, 2)):
                req.outputs.add(name=name)
        elif kind == 11:
            req.ClearField("inputs")
    return req


def gpt2_request(length: int, batch: int = 1, positions: np.ndarray | None = None, seed: int = 0):
    """A valid ModelInfer for the third-party GPT (tests/chaos/third_party.py): all three inputs."""
    ids = np.random.default_rng(seed).integers(0, third_party.VOCAB, (batch, length))
    pos = np.broadcast_to(np.arange(length), ids.shape) if positions is None else positions
    req = pb.ModelInferRequest(model_name=third_party.NAME)
    for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("position_ids", pos)):
        req.inputs.add(name=name, datatype="INT64", shape=list(value.shape))
        req.raw_input_contents.append(np.ascontiguousarray(value, np.int64).tobytes())
    return req


def fuzz_gpt2(rng: random.Random) -> pb.ModelInferRequest:
    """Input the third-party GPT cannot take though the server can decode it: longer than its
    position table, positions past it or negative, a mask shorter than the ids, token ids past its
    vocabulary."""
    kind = rng.randrange(5)
    if kind == 0:  # over-long: refused before compute, the limit found in the graph
        return gpt2_request(rng.choice([65, 66, 100, 233, 1024]), rng.choice([1, 2]), seed=rng.randrange(99))
    length = rng.choice([1, 5, 17, 64])
    if kind == 1:  # the last position past the table
        pos = np.arange(length)[None] + (third_party.POSITIONS - length) + rng.choice([1, 64, 1000, 1 << 40])
        return gpt2_request(length, positions=pos)
    if kind == 2:  # negative positions (ONNX Runtime's Gather would wrap them around)
        return gpt2_request(length, positions=np.full((1, length), rng.choice([-1, -65, -(1 << 62)])))
    req = gpt2_request(length)
    if kind == 3 and length > 1:  # a mask shorter than the ids (ONNX Runtime's Gather fails inside the batch)
        n = rng.randrange(1, length)
        req.inputs[1].shape[1] = n
        req.raw_input_contents[1] = np.ones((1, n), np.int64).tobytes()
        return req
    bad = np.zeros((1, length), np.int64)
    bad[0, -1] = rng.choice([third_party.VOCAB, 1 << 33, -1])
    req.raw_input_contents[0] = bad.tobytes()
    return req


def fuzz_generate(rng: random.Random) -> gen.GenerateRequest:
    req = gen.GenerateRequest(model="bytegpt", max_new_tokens=rng.choice([1, 4, 8]))
    if rng.random() < 0.5:
        req.text = rng.choice(["def f(x):", "", "\x00\xff", "é" * 50, "x" * 400])
    else:
        req.token_ids.ids.extend(rng.choice([[1, 2, 3], [], [-1], [VOCAB], [1 << 40], list(range(200)) * 2]))
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0:
            req.model = rng.choice(["", "nope", "bytegpt_int8", "m" * 500])
        elif kind == 1:
            req.max_new_tokens = rng.choice([0, 1, 300, (1 << 32) - 1])
        elif kind == 2:
            req.sampling.temperature = rng.choice([-1.0, 0.0, 1e-30, 1e30, math.nan, math.inf, 0.7])
        elif kind == 3:
            req.sampling.top_p = rng.choice([0.0, -0.5, 1.5, math.nan, 0.9])
        elif kind == 4:
            req.sampling.top_k = rng.choice([-1, 0, 1, 1 << 30])
        elif kind == 5:
            req.stop.extend(rng.choice([[""], ["\n"], ["x" * 10_000], ["a"] * 100]))
        elif kind == 6:
            req.sampling.seed = rng.choice([0, (1 << 64) - 1])
    return req


def fuzz(size: int, seed: int = 0, workers: int = 8) -> dict:
    """Malformed ModelInfer and Generate calls (a share with short deadlines or cancelled
    mid-way) from 8 callers, and, between them, valid calls whose answers must equal the
    reference computed alone at the start."""
    with ServerProcess(_repository(third_party=True), "--log-level", "warning") as server:  # default settings
        ch = channel(server.address)
        infer, generate = pb_grpc.GRPCInferenceServiceStub(ch), gen_grpc.TextGenerationStub(ch)
        probes = [
            infer_request(np.random.default_rng(i).integers(0, VOCAB, (1, n))) for i, n in enumerate((3, 40, 200))
        ]
        probes += [gpt2_request(n, seed=n) for n in (4, 64)]
        references = [logits(infer.ModelInfer(p, timeout=30)) for p in probes]
        counts = {"sent": 0, "valid_sent": 0, "valid_failed": 0, "unexpected": 0, "hangs": 0, "accepted": 0}
        codes: dict[str, int] = {}
        unexpected: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            rng = random.Random(seed * 1_000_003 + i)
            if i % 10 == 0:  # a valid neighbour
                k = rng.randrange(len(probes))
                try:
                    got = logits(infer.ModelInfer(probes[k], timeout=HANG_S * 2))
                    ok = np.allclose(got, references[k], atol=1e-4, rtol=1e-4)
                except grpc.RpcError:
                    ok = False
                with lock:
                    counts["valid_sent"] += 1
                    counts["valid_failed"] += not ok
                return
            timeout = rng.choice([HANG_S] * 8 + [0.001, 0.02])  # a share with deadlines that expire
            started = time.monotonic()
            try:
                roll = rng.random()
                surely_bad = 0.45 <= roll < 0.7  # fuzz_gpt2's: every one is malformed
                if roll < 0.7:
                    request = fuzz_infer(rng) if roll < 0.45 else fuzz_gpt2(rng)
                    call = infer.ModelInfer.future(request, timeout=timeout)
                    if rng.random() < 0.05:
                        time.sleep(rng.random() * 0.01)
                        call.cancel()
                    call.result()
                else:
                    stream = generate.GenerateStream(fuzz_generate(rng), timeout=timeout)
                    for n, _ in enumerate(stream):
                        if n == 2 and rng.random() < 0.2:
                            stream.cancel()
                code = grpc.StatusCode.OK
            except grpc.FutureCancelledError:
                code = grpc.StatusCode.CANCELLED
            except grpc.RpcError as e:
                code = e.code()
            took = time.monotonic() - started
            with lock:
                counts["sent"] += 1
                counts["accepted"] += surely_bad and code == grpc.StatusCode.OK
                codes[code.name] = codes.get(code.name, 0) + 1
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout == HANG_S:
                    counts["hangs"] += 1
                elif code not in EXPECTED:
                    counts["unexpected"] += 1
                    if len(unexpected) < 5:
                        unexpected.append(f"{code.name} after {took:.2f}s")

        total = size + (size + 8) // 9  # one valid in ten, `size` malformed
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(total)))
        alive = server.proc.poll() is None and server.health() == 1
        ch.close()
    return {
        "malformed": counts["sent"],
        "valid": counts["valid_sent"],
        "valid_failed": counts["valid_failed"],
        "malformed_accepted": counts["accepted"],  # of the third-party GPT's, all malformed
        "internal_or_unknown": counts["unexpected"],
        "hangs_over_5s": counts["hangs"],
        "deaths": 0 if alive else 1,
        "codes": codes,
        "unexpected_examples": unexpected,
    }


# -- crosstalk -------------------------------------------------------------------------------


def crosstalk(rounds: int, clients: int = 64) -> dict:
    """64 callers with mixed lengths and batch sizes at once: every answer must be the caller's
    own (its logits equal the reference computed alone)."""
    rng = np.random.default_rng(7)
    pool = [rng.integers(0, VOCAB, (int(rng.integers(1, 4)), int(rng.integers(1, 160)))) for _ in range(48)]
    with ServerProcess(_repository(), "--log-level", "warning") as server, channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        references = [logits(stub.ModelInfer(infer_request(p), timeout=30)) for p in pool]
        lost = mismatched = served = 0
        lock = threading.Lock()

        def client(c: int) -> None:
            nonlocal lost, mismatched, served
            r = random.Random(c)
            for _ in range(rounds):
                k = r.randrange(len(pool))
                try:
                    got = logits(stub.ModelInfer(infer_request(pool[k]), timeout=60))
                    bad = not np.allclose(got, references[k], atol=1e-4, rtol=1e-4)
                    with lock:
                        served += 1
                        mismatched += bad
                except grpc.RpcError:
                    with lock:
                        lost += 1

        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(client, range(clients)))
    return {"requests": clients * rounds, "served": served, "lost": lost, "mismatched": mismatched}


# -- overload waves --------------------------------------------------------------------------


DEADLINE_S = 0.25  # every call in the overload scenario has this deadline, as a latency-bound client sets


def _probe(address: str, ready, stop, refusals, out) -> None:
    """Another caller arriving during the bursts: one small call at a time, its status and latency."""
    req = gpt2_request(8)
    seen = []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(req, timeout=30)
        ready.set()  # connected and warm: the bursts may start
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                stub.ModelInfer(req, timeout=DEADLINE_S)
                seen.append(("OK", time.perf_counter() - t0))
            except grpc.RpcError as e:
                seen.append((e.code().name, time.perf_counter() - t0))
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with refusals.get_lock():
                        refusals.value += 1
    out.put(seen)


async def _burst(address: str, n: int) -> list[tuple[str, bool]]:
    req = gpt2_request(32, seed=1)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.ModelInfer(req, timeout=30)

        async def one() -> tuple[str, bool]:
            try:
                res = await stub.ModelInfer(req, timeout=DEADLINE_S)
                return "OK", list(res.outputs[0].shape) == [1, 32, third_party.VOCAB]
            except grpc.aio.AioRpcError as e:
                return e.code().name, False

        return await asyncio.gather(*(one() for _ in range(n)))


async def _http_burst(url: str, n: int) -> list[tuple[str, bool]]:
    """The same over HTTP (KServe v2 JSON): 429 is the refusal, a client timeout the deadline."""
    import aiohttp

    body = {
        "inputs": [
            {"name": name, "shape": [1, 32], "datatype": "INT64", "data": data}
            for name, data in (("input_ids", [1] * 32), ("attention_mask", [1] * 32), ("position_ids", list(range(32))))
        ]
    }
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one() -> tuple[str, bool]:
            try:
                async with client.post(url, json=body, timeout=timeout) as res:
                    doc = await res.json(content_type=None)
                    if res.status == 200:
                        return "OK", doc["outputs"][0]["shape"] == [1, 32, third_party.VOCAB]
                    return (
                        "RESOURCE_EXHAUSTED"
                        if res.status == 429 and res.headers.get("Retry-After")
                        else f"HTTP {res.status}"
                    ), False
            except TimeoutError:
                return "DEADLINE_EXCEEDED", False
            except aiohttp.ClientError as e:
                return type(e).__name__, False

        return await asyncio.gather(*(one() for _ in range(n)))


PROBE_SAMPLES, MAX_BURSTS = 50, 10


def overload(waves: int, burst: int) -> dict:
    """Bursts far above capacity against a server with default settings, every call with a 250 ms
    deadline, at the third-party GPT (queue 64). The bursts come from one process; a second
    process (the probe) measures what a caller arriving meanwhile sees: the time until it is
    refused. A wave repeats its burst until the probe has seen PROBE_SAMPLES refusals (at most
    MAX_BURSTS bursts), so the figure never rests on a handful of samples however fast the
    machine. Refusals must be RESOURCE_EXHAUSTED (HTTP 429 with Retry-After), not a deadline left
    to expire; served calls must carry their full answer; after each wave, a fresh call is served
    again. Then the same bursts over HTTP."""
    ctx = multiprocessing.get_context("spawn")
    refused, other, wrong, served = 0, {}, 0, 0
    probe_refusals: list[float] = []
    recovery: list[float] = []
    with ServerProcess(_repository(third_party=True), "--log-level", "warning") as server:
        sent = 0
        for _ in range(waves):
            ready, stop, refusals, out = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
            probe = ctx.Process(target=_probe, args=(server.address, ready, stop, refusals, out))
            probe.start()
            if not ready.wait(60):
                raise TimeoutError("the probe process did not connect")
            outcomes = []
            for _ in range(MAX_BURSTS):
                outcomes += asyncio.run(_burst(server.address, burst))
                sent += burst
                if refusals.value >= PROBE_SAMPLES:
                    break
            ended = time.monotonic()
            with channel(server.address) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                while True:
                    try:
                        stub.ModelInfer(gpt2_request(8), timeout=30)
                        break
                    except grpc.RpcError:
                        time.sleep(0.01)
            recovery.append(time.monotonic() - ended)
            stop.set()
            seen = out.get(timeout=60)
            probe.join(30)
            for code, ok in outcomes:
                if code == "OK":
                    served += 1
                    wrong += not ok
                elif code == "RESOURCE_EXHAUSTED":
                    refused += 1
                else:
                    other[code] = other.get(code, 0) + 1
            probe_refusals += [s for code, s in seen if code == "RESOURCE_EXHAUSTED"]
        http = asyncio.run(_http_burst(server.http_url + f"/v2/models/{third_party.NAME}/infer", burst))
    ms = sorted(s * 1e3 for s in probe_refusals)
    http_codes: dict[str, int] = {}
    for code, _ in http:
        http_codes[code] = http_codes.get(code, 0) + 1
    http_refused = sum(n for code, n in http_codes.items() if code != "OK")
    return {
        "sent": sent,
        "served": served,
        "served_wrong": wrong + sum(not ok for code, ok in http if code == "OK"),
        "refused_resource_exhausted": refused,
        "refused_otherwise": other,
        "refused_resource_exhausted_share": round(refused / max(1, refused + sum(other.values())), 4),
        "probe_refusals": len(ms),
        "probe_refuse_p50_ms": round(statistics.median(ms), 2) if ms else None,
        "probe_refuse_p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2) if ms else None,
        "recovery_s_max": round(max(recovery), 3),
        "http_sent": len(http),
        "http_codes": http_codes,
        "http_refused_429_share": round(http_codes.get("RESOURCE_EXHAUSTED", 0) / max(1, http_refused), 4),
    }


# -- SIGTERM, kill -9 ------------------------------------------------------------------------


def sigterms(rounds: int, calls: int = 80, workers: int = 1) -> dict:
    """SIGTERM with 80 ModelInfer calls and 2 generation streams sent just before: every one
    must finish with its full answer; a call after the intake window gets UNAVAILABLE; exit 0.
    With workers, the calls go over 8 connections, which the kernel spreads over the workers,
    and the SIGTERM goes to the supervisor, as Kubernetes sends it to the container's first
    process."""
    failed, exits, late_codes = 0, [], {}
    ids = np.random.default_rng(5).integers(0, VOCAB, (4, 128))
    args = ("--log-level", "warning", "--drain-grace-seconds", "30", "--workers", str(workers))
    for _ in range(rounds):
        server = ServerProcess(_repository(), *args).start()
        # connections of their own (grpc shares one between a process's channels to an address)
        chs = [channel(server.address, own=True) for _ in range(8 if workers > 1 else 1)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in chs]
        stub, gstub = stubs[0], gen_grpc.TextGenerationStub(chs[0])
        for s in stubs:
            s.ModelInfer(infer_request(ids[:1, :4]), timeout=30)  # connected
        futures = [stubs[i % len(stubs)].ModelInfer.future(infer_request(ids), timeout=60) for i in range(calls)]
        streams = [
            gstub.GenerateStream(gen.GenerateRequest(model="bytegpt", text="def f(x):", max_new_tokens=64), timeout=60)
            for _ in range(2)
        ]
        time.sleep(0.05)  # sent
        server.proc.send_signal(signal.SIGTERM)
        for f in futures:
            try:
                failed += list(f.result().outputs[0].shape) != [4, 128, VOCAB]
            except grpc.RpcError:
                failed += 1
        for s in streams:
            try:
                failed += sum(len(m.token_ids) for m in s) != 64
            except grpc.RpcError:
                failed += 1
        try:
            stub.ModelInfer(infer_request(ids[:1, :4]), timeout=5)
            late = "OK"
        except grpc.RpcError as e:
            late = e.code().name
        late_codes[late] = late_codes.get(late, 0) + 1
        exits.append(server.proc.wait(60))
        for ch in chs:
            ch.close()
        server.terminate()
    return {
        "workers": workers,
        "sigterms": rounds,
        "in_flight": rounds * (calls + 2),
        "in_flight_failed": failed,
        "exit_codes": sorted(set(exits)),
        "after_window": late_codes,
    }


def kills(rounds: int) -> dict:
    """kill -9 under load, then a new server on the same repository: SERVING again, and serving."""
    times, served = [], 0
    ids = np.random.default_rng(6).integers(0, VOCAB, (4, 64))
    for _ in range(rounds):
        server = ServerProcess(_repository(), "--log-level", "warning").start()
        ch = channel(server.address)
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        [stub.ModelInfer.future(infer_request(ids), timeout=30) for _ in range(16)]
        time.sleep(0.1)
        server.proc.kill()
        server.proc.wait(10)
        ch.close()
        started = time.monotonic()
        with ServerProcess(_repository(), "--log-level", "warning") as again, channel(again.address) as ch2:
            times.append(time.monotonic() - started)
            res = pb_grpc.GRPCInferenceServiceStub(ch2).ModelInfer(infer_request(ids), timeout=30)
            served += list(res.outputs[0].shape) == [4, 64, VOCAB]
        server.terminate()
    return {"kills": rounds, "restarted_and_served": served, "restart_to_serving_s_max": round(max(times), 2)}


# -- soak ------------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _peak_load(stub, gstub) -> None:
    """The largest work the soak sends, at once: full batches of the longest requests and a
    full set of streams, so the allocators reach their high-water mark before RSS is sampled
    (a one-time step to a larger arena is not growth; measured without this, one run out of
    four stepped from 277 to 320 MiB in its second half and then stayed flat)."""
    big = np.random.default_rng(9).integers(0, 256, (4, 199))
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda _: stub.ModelInfer(infer_request(big), timeout=60), range(32)))
        list(
            ex.map(
                lambda i: list(
                    gstub.GenerateStream(
                        gen.GenerateRequest(
                            model="bytegpt", token_ids=gen.TokenIds(ids=list(range(1, 17))), max_new_tokens=32
                        ),
                        timeout=60,
                    )
                ),
                range(16),
            )
        )


def soak(seconds: float, clients: int = 8) -> dict:
    """Mixed inference and generation from 8 callers for a while, after a peak-load warm-up,
    RSS sampled every 0.5 s: growth over the second half."""
    with ServerProcess(_repository(), "--log-level", "warning") as server, channel(server.address) as ch:
        stub, gstub = pb_grpc.GRPCInferenceServiceStub(ch), gen_grpc.TextGenerationStub(ch)
        _peak_load(stub, gstub)
        end = time.monotonic() + seconds
        failures = requests = 0
        lock = threading.Lock()

        def client(c: int) -> None:
            nonlocal failures, requests
            r = np.random.default_rng(c)
            while time.monotonic() < end:
                try:
                    if c % 4 == 0:
                        list(
                            gstub.GenerateStream(
                                gen.GenerateRequest(
                                    model="bytegpt",
                                    token_ids=gen.TokenIds(ids=r.integers(0, VOCAB, 16).tolist()),
                                    max_new_tokens=32,
                                ),
                                timeout=30,
                            )
                        )
                    else:
                        stub.ModelInfer(
                            infer_request(r.integers(0, VOCAB, (int(r.integers(1, 5)), int(r.integers(1, 200))))),
                            timeout=30,
                        )
                    ok = True
                except grpc.RpcError:
                    ok = False
                with lock:
                    requests += 1
                    failures += not ok

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        samples = []
        while time.monotonic() < end:
            samples.append(_rss_kib(server.proc.pid))
            time.sleep(0.5)
        for t in threads:
            t.join(60)
    half = samples[len(samples) // 2 :]
    return {
        "seconds": seconds,
        "requests": requests,
        "failed": failures,
        "rss_mib_start": round(samples[0] / 1024, 1),
        "rss_mib_mid": round(half[0] / 1024, 1),
        "rss_mib_end": round(samples[-1] / 1024, 1),
        "rss_growth_second_half_pct": round(100 * (max(half) - half[0]) / half[0], 2),
    }


# -- auth ------------------------------------------------------------------------------------


def auth(calls: int = 200) -> dict:
    """With a bearer token required: calls without it, with a wrong one or a malformed header,
    to every API over gRPC and HTTP, all refused (UNAUTHENTICATED, 401); with it, served."""
    import http.client

    token = "chaos-" + "k" * 32
    bad = [None, "Bearer wrong", token, "Bearer " + token[:-1], "Basic " + token, "Bearer"]
    refused = other = 0
    with (
        ServerProcess(
            _repository(),
            "--log-level",
            "warning",
            "--no-auth-open-health",
            env={"TSERVE_AUTH_TOKEN": token},
            wait_token=token,
        ) as server,
        channel(server.address) as ch,
    ):
        stub, gstub = pb_grpc.GRPCInferenceServiceStub(ch), gen_grpc.TextGenerationStub(ch)
        grpc_calls = [
            lambda md: stub.ModelInfer(infer_request(np.ones((1, 4), np.int64)), timeout=10, metadata=md),
            lambda md: stub.ServerLive(pb.ServerLiveRequest(), timeout=10, metadata=md),
            lambda md: stub.ModelMetadata(pb.ModelMetadataRequest(name="bytegpt"), timeout=10, metadata=md),
            lambda md: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="bytegpt"), timeout=10, metadata=md
            ),
            lambda md: list(
                gstub.GenerateStream(
                    gen.GenerateRequest(model="bytegpt", text="x", max_new_tokens=2), timeout=10, metadata=md
                )
            ),
        ]
        http_calls = [
            ("GET", "/v2/health/ready", None),
            ("GET", "/v2/models/bytegpt", None),
            (
                "POST",
                "/v2/models/bytegpt/infer",
                b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}',
            ),
            ("POST", "/v2/repository/models/bytegpt/unload", b"{}"),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", b'{"model": "bytegpt", "prompt": "x", "max_tokens": 2}'),
        ]
        for i in range(calls):
            header = bad[i % len(bad)]
            try:
                grpc_calls[i % len(grpc_calls)]([("authorization", header)] if header else None)
                other += 1
            except grpc.RpcError as e:
                refused += e.code() == grpc.StatusCode.UNAUTHENTICATED
                other += e.code() != grpc.StatusCode.UNAUTHENTICATED
            method, path, body = http_calls[i % len(http_calls)]
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
            conn.request(method, path, body=body, headers={"Authorization": header} if header else {})
            status = conn.getresponse().status
            conn.close()
            refused += status == 401
            other += status != 401
        good = stub.ModelInfer(
            infer_request(np.ones((1, 4), np.int64)), timeout=10, metadata=[("authorization", f"Bearer {token}")]
        )
    return {
        "unauthenticated_calls": 2 * calls,
        "refused_unauthenticated": refused,
        "answered_otherwise": other,
        "with_token_served": good.outputs[0].name == "logits",
    }


def _repository(third_party: bool = False) -> Path:
    """The shipped repository; with `third_party`, the third-party GPT beside its models."""
    from tests.conftest import DEFAULT_REPOSITORY

    return third_party_repository(DEFAULT_REPOSITORY) if third_party else DEFAULT_REPOSITORY


# what each scenario's figures must be: the "done when", for both sizes, except the RSS
# bound, which the short soak checks loosely: allocator arenas still step up in its second half
def targets(name: str, f: dict, long: bool) -> dict[str, bool]:
    rss = 5 if long else 25
    return {
        "fuzz": lambda: {
            "0 deaths, 0 hangs over 5 s, 0 INTERNAL/UNKNOWN": (
                f["deaths"],
                f["hangs_over_5s"],
                f["internal_or_unknown"],
            )
            == (0, 0, 0),
            "0 valid requests failed beside malformed ones": f["valid_failed"] == 0,
            "0 malformed accepted": f["malformed_accepted"] == 0,
        },
        "http_fuzz": lambda: {
            "0 deaths, 0 hangs over 5 s, 0 5xx": (f["deaths"], f["hangs_over_5s"], f["server_errors_5xx"]) == (0, 0, 0),
            "0 valid requests failed, 0 malformed accepted": (f["valid_failed"], f["malformed_accepted"]) == (0, 0),
        },
        "crosstalk": lambda: {"0 lost, 0 mismatched": (f["lost"], f["mismatched"]) == (0, 0)},
        # what tserve guarantees under a burst with default settings; the share of refusals that are
        # RESOURCE_EXHAUSTED rather than deadlines expiring in the event loop's intake is printed, not
        # asserted: one event loop on two shared cores takes in ~3,000 calls a second (docs/operations.md)
        "overload": lambda: {
            "refusals only RESOURCE_EXHAUSTED / 429 or the deadline, served answers whole, serving again in 1 s": set(
                f["refused_otherwise"]
            )
            <= {"DEADLINE_EXCEEDED"}
            and set(f["http_codes"]) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
            and not f["served_wrong"]
            and f["recovery_s_max"] < 1.0,
        },
        "sigterm": lambda: {
            "0 in flight lost, exit 0, later calls UNAVAILABLE": f["in_flight_failed"] == 0
            and f["exit_codes"] == [0]
            and set(f["after_window"]) == {"UNAVAILABLE"}
        },
        "sigterm_workers": lambda: {
            "0 in flight lost over 2 workers, exit 0, later calls UNAVAILABLE": f["in_flight_failed"] == 0
            and f["exit_codes"] == [0]
            and set(f["after_window"]) == {"UNAVAILABLE"}
        },
        "kill9": lambda: {"every restart SERVING and serving": f["restarted_and_served"] == f["kills"]},
        "soak": lambda: {
            f"0 failed, RSS growth over the second half <= {rss}%": f["failed"] == 0
            and f["rss_growth_second_half_pct"] <= rss
        },
        "auth": lambda: {
            "100% of unauthenticated calls refused": f["refused_unauthenticated"] == f["unauthenticated_calls"]
            and f["with_token_served"]
        },
    }[name]()


SCENARIOS = {
    "fuzz": lambda size: fuzz(size.malformed),
    "http_fuzz": lambda size: http_fuzz(_repository(third_party=True), size.malformed),
    "crosstalk": lambda size: crosstalk(size.crosstalk_rounds),
    "overload": lambda size: overload(size.overload_waves, size.overload_burst),
    "sigterm": lambda size: sigterms(size.sigterms),
    "sigterm_workers": lambda size: sigterms(size.sigterms_workers, workers=2),
    "kill9": lambda size: kills(size.kills),
    "soak": lambda size: soak(size.soak_s),
    "auth": lambda size: auth(),
}


def run_all(size: Size) -> dict:
    figures = {}
    for name, scenario in SCENARIOS.items():
        started = time.monotonic()
        figures[name] = scenario(size)
        figures[name]["wall_s"] = round(time.monotonic() - started, 1)
        print(f"{name}: {figures[name]}", flush=True)
    return figures
