"""Encoder-decoder generation: what continuous batching gives, and what the engine costs.

    python -m bench.seq2seq_bench [--model namegen] [--rounds 3]

On the shipped encoder-decoder (`namegen`, held-out functions as sources, greedy, each stops at
its end-of-sequence token, so output lengths are mixed by nature), each round 16 sources drawn
afresh, and three same-run ratios with their spread over rounds:
  - 16 streams at once ÷ 1 stream (the same 16 requests one after another), aggregate tokens/s
    through gRPC;
  - continuous ÷ static batching on 64 requests of mixed source and output lengths, 16 slots;
  - the served engine ÷ a raw ONNX Runtime greedy loop over the same three graphs and the same
    16 sources, one at a time (batch 1) and as one right-padded batch (batch 16): the loop
    encodes the batch once, runs the first decoder pass, then one decoder_with_past run per
    token until every row has ended. Its sessions are made as the server makes them (intra-op
    threads = the cores, no spinning), the faster way for three graphs run in turn.
Tokens are the generated ones, end-of-sequence included. The outputs are short (most names
are a few tokens), so the encoder's share of the work is large. Figures go to
bench/results/seq2seq.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import onnxruntime as ort

from bench.generation_bench import one_at_a_time, run_streams
from bench.serve_bench import fmt, summary
from export.seq2seq import onnx_greedy
from service.conventions.seq2seq import DECODER, DECODER_WITH_PAST, ENCODER
from service.settings import available_cores
from model.naming import load_examples
from service.generated import generation_pb2 as gen
from service.generation.tokenizer import load_tokenizer
from service.launcher import DEFAULT_REPOSITORY
from service.launcher import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def requests(model: str, sources: list[list[int]], max_new: int) -> list[gen.GenerateRequest]:
    return [
        gen.GenerateRequest(model=model, token_ids=gen.TokenIds(ids=list(s)), max_new_tokens=max_new) for s in sources
    ]


def load_sessions(folder: Path) -> tuple[ort.InferenceSession, ...]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = available_cores()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return tuple(
        ort.InferenceSession(str(folder / n), so, providers=["CPUExecutionProvider"])
        for n in (ENCODER, DECODER, DECODER_WITH_PAST)
    )


def raw_loop(folder: Path, batches: list[list[list[int]]], max_new: int) -> float:
    """tokens/s of onnx_greedy over each batch in turn (tokens = what the rows produced before
    ending, and their end-of-sequence tokens), the sessions made and warmed before the clock."""
    sessions = load_sessions(folder)
    onnx_greedy(folder, batches[0][:1], 2, sessions)
    tokens, t0 = 0, time.perf_counter()
    for sources in batches:
        out = onnx_greedy(folder, sources, max_new, sessions)
        tokens += sum(len(o) + (len(o) < max_new) for o in out)
    return tokens / (time.perf_counter() - t0)


class Timed:
    """A session whose runs are timed (seconds summed in `seconds`, rows run in `rows`)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.seconds, self.rows, self.runs = session, 0.0, 0, 0

    def run(self, outputs, feeds):
        started = time.perf_counter()
        out = self.session.run(outputs, feeds)
        self.seconds += time.perf_counter() - started
        self.rows += len(feeds["input_ids"])
        self.runs += 1
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


def raw_loop_parts(folder: Path, batches: list[list[list[int]]], max_new: int) -> dict:
    """Where the raw loop's time goes: each graph's runs, the encoder's padded tokens against
    the real ones, and decode row-steps against the tokens they made."""
    sessions = load_sessions(folder)
    onnx_greedy(folder, batches[0][:1], 2, sessions)
    encoder, decoder, with_past = (Timed(s) for s in sessions)
    tokens = 0
    for sources in batches:
        tokens += sum(
            len(o) + (len(o) < max_new) for o in onnx_greedy(folder, sources, max_new, (encoder, decoder, with_past))
        )
    return {
        "encoder_ms": encoder.seconds * 1e3,
        "first_decoder_pass_ms": decoder.seconds * 1e3,
        "decoder_with_past_ms": with_past.seconds * 1e3,
        "encoded_tokens": sum(len(b) * max(map(len, b)) for b in batches),
        "source_tokens": sum(len(s) for b in batches for s in b),
        "decode_row_steps": with_past.rows,
        "tokens_from_decode_steps": tokens - sum(map(len, batches)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="namegen")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    folder = args.repository / args.model / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    max_source, max_new = manifest["model"]["max_source"], manifest["model"]["max_target"] - 1
    _, held_out = load_examples()
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = load_tokenizer(manifest.get("tokenizer"), tokenizer_file if tokenizer_file.is_file() else None)
    sources = [tokenizer.encode(e.source)[:max_source] for e in held_out]
    rng = np.random.default_rng(0)
    rounds = []
    for r in range(args.rounds):
        pick = [sources[i] for i in rng.permutation(len(sources))[:64]]
        point = {}
        with ServerProcess(args.repository, "--generation-max-sequences", "16") as server:
            run_streams(server.address, requests(args.model, pick[:2], 4))  # warm
            point["streams_1"] = one_at_a_time(server.address, requests(args.model, pick[:16], max_new))
            point["streams_16"] = run_streams(server.address, requests(args.model, pick[:16], max_new))
            point["continuous"] = run_streams(server.address, requests(args.model, pick, max_new))
        with ServerProcess(
            args.repository, "--generation-max-sequences", "16", "--generation-scheduling", "static"
        ) as server:
            run_streams(server.address, requests(args.model, pick[:2], 4))
            point["static"] = run_streams(server.address, requests(args.model, pick, max_new))
        point["raw_loop_1"] = raw_loop(folder, [[s] for s in pick[:16]], max_new)
        point["raw_loop_16"] = raw_loop(folder, [pick[:16]], max_new)
        del point["streams_1"]["token_ids"]  # the results file keeps figures
        rounds.append(point)
        print(
            f"round {r + 1}: "
            + ", ".join(
                f"{k} {v['tokens_per_s'] if isinstance(v, dict) else v:.0f} tokens/s" for k, v in point.items()
            ),
            flush=True,
        )

    def tps(point: dict, key: str) -> float:
        v = point[key]
        return v["tokens_per_s"] if isinstance(v, dict) else v

    def ratio(a: str, b: str) -> dict:
        return summary([tps(p, a) / tps(p, b) for p in rounds])

    figures = {
        "streams16_vs_1": ratio("streams_16", "streams_1"),
        "continuous_vs_static": ratio("continuous", "static"),
        "served_vs_raw_loop_batch1": ratio("streams_1", "raw_loop_1"),
        "served_vs_raw_loop_batch16": ratio("streams_16", "raw_loop_16"),
    }
    parts = {f"batch {len(b[0])}": raw_loop_parts(folder, b, max_new) for b in ([[x] for x in pick[:16]], [pick[:16]])}
    print("\nwhere the raw loop's time goes (the last round's 16 sources):")
    for label, q in parts.items():
        print(
            f"  {label}: encoder {q['encoder_ms']:.1f} ms ({q['encoded_tokens']} tokens encoded for "
            f"{q['source_tokens']}), first decoder pass {q['first_decoder_pass_ms']:.1f} ms, decoder_with_past "
            f"{q['decoder_with_past_ms']:.1f} ms ({q['decode_row_steps']} row-steps for "
            f"{q['tokens_from_decode_steps']} tokens)"
        )
    print(f"\n{args.model}, greedy on held-out functions, {args.rounds} rounds:")
    print(f"  16 streams ÷ 1 stream, tokens/s:                 {fmt(figures['streams16_vs_1'])}")
    print(f"  continuous ÷ static, 64 mixed requests, 16 slots: {fmt(figures['continuous_vs_static'])}")
    print(f"  served (gRPC) ÷ raw ORT greedy loop, batch 1:     {fmt(figures['served_vs_raw_loop_batch1'])}")
    print(f"  served (gRPC) ÷ raw ORT greedy loop, batch 16:    {fmt(figures['served_vs_raw_loop_batch16'])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "seq2seq.json"
    out.write_text(json.dumps({"rounds": rounds, "figures": figures, "raw_loop_parts": parts}, indent=2) + "\n")
    print(f"written: {out.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
