"""Sentence embeddings: tserve against Infinity (the peer) and raw ONNX Runtime (the limit), in one run.

    python -m bench.embed_bench [--rounds 2] [--sentences 512]        (make bench-embed)

1. Builds a MiniLM-L6-shaped sentence embedder (BertModel: hidden 384, 6 layers, 12 heads, MLP
   1536, 512 positions; random weights after seed 0) with a WordPiece vocabulary trained here on
   this checkout's and the standard library's sources, exported by optimum-cli (feature
   extraction) into a sentence-transformers snapshot (graph under onnx/, mean pooling,
   Normalize). The same folder is served by both servers.
2. Deterministic sentences of 8-128 words. Each configuration sends all of them: cXbY = X
   requests in flight, Y sentences per request, through each server's OpenAI-compatible
   `/embeddings` route (tserve: `/v1/embeddings`, text in, tokenized and pooled by the server).
3. Cores. Against the peer, the servers and this client share both cores, as the issue's
   measurement did: Infinity gives no way to set ONNX Runtime's thread count, and pinned to
   one core its two intra-op threads fight over it (measured: 14.6 sentences/s at c1b1, against
   32.5 for tserve, whose threads follow the cores it may use) — a comparison of thread counts,
   not of servers. The limit is measured as the house measures one: tserve on core 1, this
   client on core 0, and raw ONNX Runtime in-process on core 1 (one intra-op thread) at batch 1
   and at batches of 16 sorted by length; raw ONNX Runtime on both cores with no client beside
   it is printed too.
4. Both servers stay up through a round and are measured in turn, config by config, the
   first alternating; every figure is printed as the median over rounds with the
   range, and the ratios are same-round ratios. Embeddings are compared (cosine).

Infinity runs from its own venv (.venv-infinity: `make bench-embed` creates it); results go to
bench/results/embed.json whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np

from export.sentence_transformers import write_snapshot
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / "runs" / "embed"
INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"
SERVER_CORE, CLIENT_CORE = 1, 0
CONFIGS = ((1, 1), (16, 1), (1, 16), (16, 16))
NAME = "minilm"


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(ROOT.glob("service/**/*.py")) + sorted(ROOT.glob("docs/*.md")) + sorted(stdlib.glob("*.py"))[:200]


def build(out: Path) -> Path:
    """The sentence-transformers snapshot (built once; delete runs/embed to rebuild)."""
    snapshot = out / NAME
    if (snapshot / "onnx" / "model.onnx").is_file():
        return snapshot
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train([str(p) for p in corpus_files()], trainers.WordPieceTrainer(vocab_size=10725, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.model_max_length = 512
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    source = out / "source"
    BertModel(config).eval().save_pretrained(source)
    fast.save_pretrained(source)
    exported = out / "optimum"
    subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(source)]
        + ["--task", "feature-extraction", str(exported)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    write_snapshot(exported, snapshot, 384)
    return snapshot


def sentences(n: int) -> list[str]:
    words = sorted({w for p in corpus_files()[:40] for w in p.read_text(errors="ignore").split() if w.isalpha()})
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, int(rng.integers(8, 129)))) for _ in range(n)]


# -- the limit: raw ONNX Runtime in-process on the server's core ---------------------------


def raw_ort(snapshot: Path, texts: list[str], cores: set[int]) -> dict:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # ORT's threads are created below, and inherit it
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = len(cores), 1
        session = ort.InferenceSession(str(snapshot / "onnx" / "model.onnx"), so, providers=["CPUExecutionProvider"])
        tok = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
        ids = [e.ids for e in tok.encode_batch(texts)]
        names = {i.name for i in session.get_inputs()}

        def run(rows: list[list[int]]) -> None:
            width = max(map(len, rows))
            batch = np.zeros((len(rows), width), np.int64)
            mask = np.zeros_like(batch)
            for r, row in enumerate(rows):
                batch[r, : len(row)], mask[r, : len(row)] = row, 1
            feeds = {"input_ids": batch, "attention_mask": mask}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(batch)
            session.run(["last_hidden_state"], feeds)

        run(ids[:2])
        out = {}
        for label, batches in (
            ("batch 1", [[r] for r in ids]),
            (
                "batch 16 sorted by length",
                [s[i : i + 16] for s in [sorted(ids, key=len)] for i in range(0, len(s), 16)],
            ),
            ("batch 16 in arrival order", [ids[i : i + 16] for i in range(0, len(ids), 16)]),
        ):
            start = time.perf_counter()
            for b in batches:
                run(b)
            out[label] = len(ids) / (time.perf_counter() - start)
        return out
    finally:
        os.sched_setaffinity(0, previous)


# -- the client ----------------------------------------------------------------------------


async def drive(url: str, model: str, texts: list[str], concurrency: int, per_request: int) -> dict:
    import aiohttp

    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    latencies, vectors = [], [None] * len(texts)
    queue: asyncio.Queue = asyncio.Queue()
    for i, c in enumerate(chunks):
        queue.put_nowait((i, c))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:

        async def worker():
            while not queue.empty():
                i, chunk = queue.get_nowait()
                t0 = time.perf_counter()
                async with client.post(url, json={"model": model, "input": chunk}) as res:
                    res.raise_for_status()
                    body = await res.json()
                latencies.append(time.perf_counter() - t0)
                for j, d in enumerate(body["data"]):
                    vectors[i * per_request + j] = d["embedding"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "sentences_per_s": len(texts) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "vectors": np.array(vectors, np.float32),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


def infinity_folder(snapshot: Path) -> Path:
    """The snapshot with its graph at the root (the same file, linked): Infinity 0.0.78 names the
    graph to optimum by its path, and optimum 2.1 matches file names only, so onnx/model.onnx is
    never found."""
    folder = snapshot.parent / f"{snapshot.name}_infinity"
    if not folder.is_dir():
        shutil.copytree(snapshot, folder, ignore=shutil.ignore_patterns("onnx"))
        os.link(snapshot / "onnx" / "model.onnx", folder / "model.onnx")
    return folder


class Infinity:
    def __init__(self, snapshot: Path, log: Path, cores: set[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        snapshot = infinity_folder(snapshot)
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cores))), str(INFINITY), "v2", "--model-id", "."]
        cmd += ["--served-model-name", NAME, "--engine", "optimum", "--device", "cpu", "--port", str(self.port)]
        cmd += ["--pooling-method", "mean"]  # as the snapshot's modules.json says; its own default here is CLS
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=snapshot)
        wait_http(self.url + "/health", self.proc)

    def terminate(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def pinned_leg(repo: Path, snapshot: Path, texts: list[str]) -> dict:
    """The limit as the house measures one: the server on core 1 and this client on core 0,
    raw ONNX Runtime (one intra-op thread) on the server's core."""
    every = os.sched_getaffinity(0)
    leg: dict = {"raw_ort": raw_ort(snapshot, texts, {SERVER_CORE})}
    os.sched_setaffinity(0, {CLIENT_CORE})
    server = ServerProcess(repo, cores={SERVER_CORE}).start()
    try:
        url = server.http_url + "/v1/embeddings"
        asyncio.run(drive(url, NAME, texts[:32], 4, 4))
        for c, b in CONFIGS:
            res = asyncio.run(drive(url, NAME, texts, c, b))
            res.pop("vectors")
            leg[f"c{c}b{b}"] = res
    finally:
        server.terminate()
        os.sched_setaffinity(0, every)
    return leg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=512)
    args = parser.parse_args()
    every = os.sched_getaffinity(0)
    snapshot = build(BUILD)
    texts = sentences(args.sentences)
    from tokenizers import Tokenizer

    lengths = [len(e.ids) for e in Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode_batch(texts)]
    print(f"{len(texts)} sentences, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f})")
    repo = BUILD / "repository"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / NAME).mkdir(parents=True)
    (repo / NAME / "1").symlink_to(snapshot)
    results: dict = {"rounds": [], "lengths": [min(lengths), max(lengths), statistics.mean(lengths)]}
    print(f"peers: everything on cores {sorted(every)}; limit: server on core {SERVER_CORE}, client on {CLIENT_CORE}")
    for r in range(args.rounds):
        round_: dict = {"raw_ort": raw_ort(snapshot, texts, every)}
        print(f"round {r + 1}: raw ORT " + ", ".join(f"{k} {v:.1f}/s" for k, v in round_["raw_ort"].items()))
        servers: dict = {}
        try:  # both up for the whole round, measured in turn config by config (drift hits both alike)
            tserve = servers["tserve"] = ServerProcess(repo, cores=every).start()
            infinity = servers["infinity"] = Infinity(snapshot, BUILD / "infinity.log", every)
            urls = {"tserve": tserve.http_url + "/v1/embeddings", "infinity": infinity.url + "/embeddings"}
            for url in urls.values():
                asyncio.run(drive(url, NAME, texts[:32], 4, 4))  # warm
            for k, (c, b) in enumerate(CONFIGS):
                order = ("tserve", "infinity") if (r + k) % 2 == 0 else ("infinity", "tserve")
                for peer in order:
                    res = asyncio.run(drive(urls[peer], NAME, texts, c, b))
                    round_.setdefault(peer, {})[f"c{c}b{b}"] = res
                    print(f"  {peer} c{c}b{b}: {res['sentences_per_s']:.1f} sentences/s, p50 {res['p50_ms']:.0f} ms")
        except Exception as e:  # a failed server is recorded, and the run goes on
            print(f"  round {r + 1} failed: {e}")
            round_["error"] = str(e)
        finally:
            for server in servers.values():
                server.terminate()
        if len(every) > 1:
            try:
                leg = round_["pinned"] = pinned_leg(repo, snapshot, texts)
                print(
                    "  pinned: raw ORT "
                    + ", ".join(f"{k} {v:.1f}/s" for k, v in leg["raw_ort"].items())
                    + "; tserve "
                    + ", ".join(f"{k} {leg[k]['sentences_per_s']:.1f}/s" for k in leg if k != "raw_ort")
                )
            except Exception as e:
                print(f"  round {r + 1} pinned leg failed: {e}")
        results["rounds"].append(round_)
    summarize(results)


def summarize(results: dict) -> None:
    rounds = [r for r in results["rounds"] if "tserve" in r and "infinity" in r]
    summary: dict = {}
    print("\nmedian (range) over rounds; sentences/s; ratios are same-round")
    for c, b in CONFIGS:
        key = f"c{c}b{b}"
        t = [r["tserve"][key]["sentences_per_s"] for r in rounds]
        i = [r["infinity"][key]["sentences_per_s"] for r in rounds]
        ratio = [r["tserve"][key]["sentences_per_s"] / r["infinity"][key]["sentences_per_s"] for r in rounds]
        p50 = [r["tserve"][key]["p50_ms"] / r["infinity"][key]["p50_ms"] for r in rounds]
        cos = min(float(np.min(np.sum(r["tserve"][key]["vectors"] * r["infinity"][key]["vectors"], 1))) for r in rounds)
        summary[key] = {"tserve": t, "infinity": i, "ratio": ratio, "p50_ratio": p50, "min_cosine": cos}
        print(
            f"{key}: tserve {spread(t)}  Infinity {spread(i)}  tserve / Infinity {spread(ratio)}x  "
            f"p50 tserve / Infinity {spread(p50)}x  min cosine {cos:.6f}"
        )
    sorted16 = "batch 16 sorted by length"
    shared = [r["tserve"]["c16b1"]["sentences_per_s"] / r["raw_ort"][sorted16] for r in rounds]
    print(
        f"shared cores: raw ORT batch 16 sorted {spread([r['raw_ort'][sorted16] for r in rounds])}/s (no client "
        f"beside it); tserve c16b1 / that: {spread(shared)}x"
    )
    summary["tserve_c16b1_vs_raw_shared"] = shared
    pinned = [r["pinned"] for r in results["rounds"] if "pinned" in r]
    if pinned:
        limit = [p["raw_ort"][sorted16] for p in pinned]
        vs_raw = [p["c16b1"]["sentences_per_s"] / p["raw_ort"][sorted16] for p in pinned]
        c1 = [p["c1b1"]["sentences_per_s"] / p["raw_ort"]["batch 1"] for p in pinned]
        print(
            f"pinned (server core {SERVER_CORE}, client core {CLIENT_CORE}): raw ORT batch 16 sorted "
            f"{spread(limit)}/s; tserve c16b1 / that: {spread(vs_raw)}x; tserve c1b1 / raw batch 1: {spread(c1)}x"
        )
        summary["raw_ort_sorted16_pinned"] = limit
        summary["tserve_c16b1_vs_raw_pinned"] = vs_raw
    for r in results["rounds"]:
        for peer in ("tserve", "infinity"):
            for v in r.get(peer, {}).values():
                v.pop("vectors", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps({**results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
