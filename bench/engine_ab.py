"""This checkout's generation against an earlier commit's, served side by side in one run.

    python -m bench.engine_ab --base COMMIT [--rounds 3]      (make bench-engine-ab BASE=COMMIT)

The earlier commit is checked out as a git worktree (runs/engine_ab/<commit>) and served by this
environment's Python from that folder, beside a server of this checkout, both up for the whole
run. Each round runs every workload on both, in alternating order (old first in odd rounds), and
prints new ÷ old aggregate tokens/s with the median and range over rounds, and whether every
greedy token of the new server equals the old one's.

    bytegpt        the shipped decoder (its fused graph), the generation bench's prompts, 128 new
                   tokens each (min_tokens: every path makes exactly 128): 1 stream (8 prompts one
                   after another) and 16 at once
    llama          the genai bench's tiny Llama, Optimum's export (numpy KV rows) and genai's own
    llama_genai    folder (a shared KV buffer), 16 prompts cut from this repository, 128 tokens
                   each, 1 stream (the 16 one after another) and 16 at once; only when the
                   genai bench's models are built (make bench-genai builds them)
    namegen        the shipped encoder-decoder, 16 held-out functions, greedy to end-of-sequence,
                   1 stream (one after another) and 16 at once

Writes bench/results/engine_ab.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.generation_bench import one_at_a_time, run_streams
from service.generated import generation_pb2 as gen
from service.generation.tokenizer import HFTokenizer, load_tokenizer
from service.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 128


def worktree(commit: str) -> Path:
    sha = subprocess.run(
        ["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = ROOT / "runs" / "engine_ab" / sha[:12]
    if not (path / "service").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=ROOT, check=True, capture_output=True
        )
    return path


def requests(model: str, prompts: list[list[int]], new_tokens: int | None) -> list[gen.GenerateRequest]:
    """Greedy requests; with `new_tokens`, exactly that many tokens each (end-of-sequence not before)."""
    return [
        gen.GenerateRequest(
            model=model,
            token_ids=gen.TokenIds(ids=p),
            sampling=gen.SamplingParameters(temperature=0.0),
            **({"max_new_tokens": new_tokens, "min_tokens": new_tokens} if new_tokens else {}),
        )
        for p in prompts
    ]


def workloads(repo: Path, llama: Path | None) -> dict[str, tuple[list[gen.GenerateRequest], list[gen.GenerateRequest]]]:
    """name -> (one stream's requests, sent one after another; the 16 sent at once)."""
    out = {}
    byte_tok = HFTokenizer(repo / "bytegpt" / "1" / "tokenizer.json")
    texts = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):"]
    prompts = [byte_tok.encode(t) for t in texts]
    out["bytegpt"] = (requests("bytegpt", prompts * 2, NEW_TOKENS), requests("bytegpt", prompts * 4, NEW_TOKENS))
    if llama is not None:
        from bench.genai_bench import cut_prompts

        cut = cut_prompts(llama / "source", 16, 32)
        for name in ("llama", "llama_genai"):
            out[name] = (requests(name, cut, NEW_TOKENS), requests(name, cut, NEW_TOKENS))
    from model.naming import load_examples

    folder = repo / "namegen" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    tok = load_tokenizer(manifest.get("tokenizer"), folder / "tokenizer.json")
    _, held_out = load_examples()
    rng = np.random.default_rng(0)
    sources = [
        tok.encode(held_out[i].source)[: manifest["model"]["max_source"]] for i in rng.permutation(len(held_out))[:16]
    ]
    out["namegen"] = (requests("namegen", sources, None), requests("namegen", sources, None))
    return out


def measure(server: ServerProcess, one: list, many: list) -> dict:
    single = one_at_a_time(server.address, one)
    together = run_streams(server.address, many, keep_tokens=True)
    return {
        "1": single["tokens_per_s"],
        "16": together["tokens_per_s"],
        "tokens": single["token_ids"] + together["token_ids"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the earlier commit to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--llama", type=Path, default=ROOT / "runs" / "llama", help="the genai bench's built models")
    args = p.parse_args()
    old_root = worktree(args.base)
    repo = Path(tempfile.mkdtemp())
    for name in ("bytegpt", "namegen"):
        shutil.copytree(ROOT / "model_repository" / name, repo / name)
    llama = (
        args.llama if (args.llama / "optimum" / "model.onnx").is_file() and (args.llama / "genai").is_dir() else None
    )
    if llama is not None:
        shutil.copytree(llama / "optimum", repo / "llama" / "1")
        shutil.copytree(llama / "genai", repo / "llama_genai" / "1")
    else:
        print(f"no tiny Llama under {args.llama} (make bench-genai builds it): bytegpt and namegen only")
    loads = workloads(repo, llama)
    flags = ("--generation-max-sequences", "16")
    rounds, same = [], {name: True for name in loads}
    with ServerProcess(repo, *flags, root=old_root) as old, ServerProcess(repo, *flags) as new:
        for server in (old, new):
            for one, _ in loads.values():
                run_streams(server.address, one[:2])  # warm
        for k in range(args.rounds):
            r = {}
            for name, (one, many) in loads.items():
                order = [("old", old), ("new", new)] if k % 2 == 0 else [("new", new), ("old", old)]
                got = {label: measure(server, one, many) for label, server in order}
                same[name] &= got["new"].pop("tokens") == got["old"].pop("tokens")
                r[name] = got
            rounds.append(r)
            print(
                f"round {k + 1}: "
                + ", ".join(
                    f"{name} new/old 1 stream {v['new']['1'] / v['old']['1']:.2f}x, 16 "
                    f"{v['new']['16'] / v['old']['16']:.2f}x"
                    for name, v in r.items()
                ),
                flush=True,
            )

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    figures = {}
    print(f"\nnew ({ROOT.name} working tree) ÷ old ({args.base}), aggregate tokens/s, {args.rounds} rounds:")
    for name in loads:
        figures[name] = {s: [r[name]["new"][s] / r[name]["old"][s] for r in rounds] for s in ("1", "16")}
        olds = {s: statistics.median(r[name]["old"][s] for r in rounds) for s in ("1", "16")}
        print(
            f"  {name:12s} 1 stream {spread(figures[name]['1'])} (old {olds['1']:.0f} tokens/s), "
            f"16 streams {spread(figures[name]['16'])} (old {olds['16']:.0f} tokens/s); "
            f"greedy tokens {'identical' if same[name] else 'DIFFER'}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "engine_ab.json"
    out.write_text(
        json.dumps({"base": args.base, "rounds": rounds, "ratios": figures, "same_tokens": same}, indent=2) + "\n"
    )
    print(f"written: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
