"""The HTTP fuzz: bodies drawn from the server's own OpenAPI document (/openapi.json), mutated,
and bodies no schema allows (garbage bytes, JSON cut short, nesting 100,000 deep, a third-party
GPT's tensors it cannot take), sent from 8 callers to a server with default settings. Every
answer must be a 2xx or a 4xx naming the problem: a 5xx is the server's fault, a call that takes
over 5 s a hang. Between them, valid KServe v2 calls whose answers must equal the reference."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.launcher import ServerProcess
from tests.chaos import third_party

HANG_S = 5.0
STRINGS = ["", "bytegpt", "gpt2", "namegen", "nope", "def f(x):", "x" * 5000, "\x00\ud7ff", "é" * 40, "1"]
INTEGERS = [0, 1, 2, -1, 4, 8, 65, 300, 1 << 31, 1 << 62]
NUMBERS = [0.0, 0.5, 1.0, -1.0, 2.5, 1e30]
MODELS = ["bytegpt", "gpt2", "namegen", "bytegpt_int8", "nope", "", "%00", "b" * 300]


def from_schema(schema: dict, defs: dict, rng: random.Random, depth: int = 0):
    """A value the schema allows, or, now and then, one it does not."""
    if rng.random() < 0.04 or depth > 6:  # the wrong type
        return rng.choice([None, "x", 7, -3.5, [], {}, True])
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, rng, depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return from_schema(rng.choice(schema[key]), defs, rng, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        out = {}
        for name, sub in props.items():
            if (name in required and rng.random() > 0.05) or rng.random() < 0.3:
                out[name] = from_schema(sub, defs, rng, depth + 1)
        if rng.random() < 0.05:
            out[rng.choice(["extra", "", "inputs", "model"])] = rng.choice(STRINGS)
        return out
    if kind == "array":
        items = schema.get("items", {})
        return [from_schema(items, defs, rng, depth + 1) for _ in range(rng.choice([0, 1, 1, 2, 3, 5]))]
    if kind == "string":
        return rng.choice(STRINGS)
    if kind == "integer":
        return rng.choice(INTEGERS)
    if kind == "number":
        return rng.choice(NUMBERS + INTEGERS[:4])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice([*STRINGS[:4], *INTEGERS[:4], None, [1, 2]])


def gpt2_body(length: int, positions: list[int] | None = None) -> dict:
    ids = np.random.default_rng(length).integers(0, third_party.VOCAB, length).tolist()
    tensor = lambda name, data: {"name": name, "shape": [1, len(data)], "datatype": "INT64", "data": data}  # noqa: E731
    pos = positions if positions is not None else list(range(length))
    return {"inputs": [tensor("input_ids", ids), tensor("attention_mask", [1] * length), tensor("position_ids", pos)]}


def request(rng: random.Random, doc: dict) -> tuple[str, bytes, dict]:
    """(path, body, headers) of one malformed (or only odd) request."""
    defs = doc["components"]["schemas"]
    # every POST route but the repository's load and unload: those change what is served, by design
    posts = [(p, op["post"]) for p, op in doc["paths"].items() if "post" in op and "/repository/models/" not in p]
    path, op = rng.choice(posts)
    path = path.replace("{model}", rng.choice(MODELS)).replace("{version}", rng.choice(["1", "0", "7", "x"]))
    headers = {"Content-Type": "application/json"}
    roll = rng.random()
    if roll < 0.6:
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
        body = json.dumps(from_schema(schema, defs, rng)).encode()
    elif roll < 0.68:
        body = bytes(rng.randrange(256) for _ in range(rng.choice([1, 17, 300])))
    elif roll < 0.74:
        body = json.dumps(from_schema({"$ref": "#/components/schemas/InferenceRequest"}, defs, rng)).encode()
        body = body[: rng.randrange(len(body))]
    elif roll < 0.8:
        body = b"[" * 100_000 + b"]" * rng.choice([0, 100_000])
    elif roll < 0.86:  # binary tensors whose header length lies
        path = "/v2/models/gpt2/infer"
        header = json.dumps(gpt2_body(4)).encode()
        body = header + b"\x00" * rng.choice([0, 8, 31])
        headers["Inference-Header-Content-Length"] = rng.choice(["-1", "x", str(len(body) + 9), "0", "3"])
    else:  # the third-party GPT's tensors the graph cannot take
        path = "/v2/models/gpt2/infer"
        length = rng.choice([1, 5, 64])
        body = json.dumps(
            rng.choice(
                [
                    gpt2_body(rng.choice([65, 100, 233])),
                    gpt2_body(length, [p + rng.choice([64, 1000]) for p in range(length)]),
                    gpt2_body(length, [-(1 << 40)] * length),
                ]
            )
        ).encode()
    return path, body, headers


def post(address: str, path: str, body: bytes, headers: dict) -> tuple[int | None, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_S)
    try:
        conn.request("POST", path, body, headers)
        res = conn.getresponse()
        return res.status, res.read()
    except (TimeoutError, socket.timeout):
        return None, b""
    finally:
        conn.close()


def http_fuzz(repository: Path, size: int, seed: int = 0, workers: int = 8) -> dict:
    with ServerProcess(repository, "--log-level", "warning") as server:  # default settings
        address = server.http_address
        with urllib.request.urlopen(server.http_url + "/openapi.json", timeout=10) as res:
            doc = json.loads(res.read())
        probes = [gpt2_body(4), gpt2_body(64)]
        references = [json.loads(post(address, "/v2/models/gpt2/infer", json.dumps(p).encode(), {})[1]) for p in probes]
        counts = {"sent": 0, "valid": 0, "valid_failed": 0, "server_errors": 0, "hangs": 0, "accepted": 0}
        codes: dict[str, int] = {}
        examples: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            rng = random.Random(seed * 1_000_003 + i)
            if i % 10 == 0:
                k = rng.randrange(len(probes))
                code, raw = post(address, "/v2/models/gpt2/infer", json.dumps(probes[k]).encode(), {})
                ok = code == 200 and np.allclose(
                    json.loads(raw)["outputs"][0]["data"], references[k]["outputs"][0]["data"], atol=1e-4
                )
                with lock:
                    counts["valid"] += 1
                    counts["valid_failed"] += not ok
                return
            path, body, headers = request(rng, doc)
            code, raw = post(address, path, body, headers)
            surely_bad = path == "/v2/models/gpt2/infer" and b"position_ids" in body  # the graph cannot take them
            with lock:
                counts["sent"] += 1
                codes[str(code)] = codes.get(str(code), 0) + 1
                if code is None:
                    counts["hangs"] += 1
                elif code >= 500:
                    counts["server_errors"] += 1
                    if len(examples) < 5:
                        examples.append(f"{code} {path}: {raw[:200]!r}")
                elif surely_bad and code == 200 and len(body) > 0 and "Inference-Header-Content-Length" not in headers:
                    counts["accepted"] += 1

        total = size + (size + 8) // 9
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(total)))
        alive = server.proc.poll() is None and server.health() == 1
    return {
        "malformed": counts["sent"],
        "valid": counts["valid"],
        "valid_failed": counts["valid_failed"],
        "malformed_accepted": counts["accepted"],
        "server_errors_5xx": counts["server_errors"],
        "hangs_over_5s": counts["hangs"],
        "deaths": 0 if alive else 1,
        "codes": codes,
        "examples": examples,
    }
