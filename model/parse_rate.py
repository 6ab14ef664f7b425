"""A figure a user can judge beside bits per byte: given a held-out function's first line,
how often does greedy decoding write a body that parses?

    python -m model.parse_rate model/checkpoints/bytegpt.pt [other.pt ...] [--ngram-order 4]

Functions come from the validation files (the split bits per byte is measured on): every
`def` whose header fits on one line, dedented, sampled with a fixed seed. The prompt is that
line, as a user types it (no newline: a BPE's tokens join a newline with the indentation after
it, so a prompt ending in a bare newline would ask for a column-0 line); the completion is
greedy, until it has --max-bytes bytes for every model (a BPE's last token may pass that by a
few; never past a model's context), and is cut at the function's end: the first non-blank line
indented less than the body's first, or, when the budget runs out first, the last complete line.
It counts when header + body parses with `ast` and the body holds a statement. The smoothed byte
n-gram, fitted on the training files, decodes greedily under the same rules.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.data import load_documents, tokenize
from model.ngram import NGramModel
from model.tokenizer import ByteTokenizer, from_checkpoint
from model.transformer import load_checkpoint


def function_headers(docs: list[str], n: int, seed: int = 0) -> list[str]:
    headers = set()
    for doc in docs:
        try:
            tree = ast.parse(doc)
        except SyntaxError:
            continue
        lines = doc.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                line = lines[node.lineno - 1].strip()
                try:  # one line, a whole header
                    ast.parse(line + "\n    pass\n")
                except SyntaxError:
                    continue
                headers.add(line)
    return random.Random(seed).sample(sorted(headers), min(n, len(headers)))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def function_body(completion: str) -> tuple[list[str], bool]:
    """The body the completion writes after the header's line: its lines up to the first
    non-blank one indented less than the body's first (the function has ended), and whether
    that end was reached. Lines after the last newline may be cut mid-way and are left out."""
    lines = completion.split("\n")[1:]  # the completion begins on the header's own line
    body, level = [], None
    for i, line in enumerate(lines):
        if line.strip():
            if level is None:
                level = _indent(line)
                if level == 0:
                    return [], True  # back at column 0 at once: no body
            elif _indent(line) < level:
                return body, True
        if i < len(lines) - 1:
            body.append(line)
    return body, False


def parses(header: str, body: list[str]) -> bool:
    if not any(line.strip() and not line.strip().startswith("#") for line in body):
        return False
    try:
        ast.parse(header + "\n" + "\n".join(body) + "\n")
    except (SyntaxError, ValueError):
        return False
    return True


Greedy = Callable[[str, int], str]  # (prompt, max_bytes) -> completion text


def torch_greedy(path: str) -> tuple[str, Greedy]:
    model, ckpt = load_checkpoint(path)
    tokenizer = from_checkpoint(ckpt)

    @torch.no_grad()
    def complete(prompt: str, max_bytes: int) -> str:
        ids = tokenizer.encode(prompt)
        logits, past = model(torch.tensor([ids]))
        out: list[int] = []
        while len(ids) + len(out) < model.cfg.block_size:
            out.append(int(logits[0, -1].argmax()))
            text = tokenizer.decode(out)
            if len(text.encode()) >= max_bytes or out[-1] == tokenizer.eot_id or function_body(text)[1]:
                break
            logits, past = model(torch.tensor([[out[-1]]]), past_key_values=past)
        return tokenizer.decode(out)

    kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else f"BPE {tokenizer.vocab_size}"
    return f"{Path(path).name} ({model.num_parameters() / 1e6:.2f} M, {kind})", complete


def ngram_greedy(train_docs: list[str], order: int) -> tuple[str, Greedy]:
    tok = ByteTokenizer()
    ngram = NGramModel(order, tok.vocab_size).fit(tokenize(train_docs, tok))

    def complete(prompt: str, max_bytes: int) -> str:
        ids = tok.encode(prompt)
        out: list[int] = []
        while len(out) < max_bytes:
            out.append(int(np.argmax(ngram.next_probs(np.array(ids + out)[-(order - 1) :]))))
            if out[-1] == tok.eot_id or function_body(tok.decode(out))[1]:
                break
        return tok.decode(out)

    return f"byte {order}-gram", complete


def parse_rate(complete: Greedy, headers: list[str], max_bytes: int) -> dict:
    ok = ended = 0
    examples = {}
    for header in headers:
        text = complete(header, max_bytes)
        body, finished = function_body(text)
        ended += finished
        good = parses(header + text.split("\n")[0], body)
        ok += good
        if len(examples) < 3:
            examples[header] = {"completion": text, "parses": good}
    return {
        "functions": len(headers),
        "parsed": ok,
        "parse_rate": round(ok / len(headers), 4),
        "ended_within_budget": round(ended / len(headers), 4),
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", default=["model/checkpoints/bytegpt.pt"])
    p.add_argument("--functions", type=int, default=200)
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--ngram-order", type=int, default=4, help="0: no n-gram baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    docs = load_documents(seed=args.seed)  # the training split's seed: the same held-out files
    headers = function_headers(docs.val, args.functions, args.seed)
    models = [torch_greedy(c) for c in args.checkpoints]
    if args.ngram_order:
        models.append(ngram_greedy(docs.train, args.ngram_order))
    results = {}
    for name, complete in models:
        t0 = time.monotonic()
        r = results[name] = parse_rate(complete, headers, args.max_bytes)
        print(
            f"{name}: {r['parsed']}/{r['functions']} completions parse ({r['parse_rate']:.1%}), "
            f"{r['ended_within_budget']:.1%} end the function within {args.max_bytes} bytes "
            f"[{time.monotonic() - t0:.0f} s]",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
