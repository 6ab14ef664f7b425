"""The sequence-to-sequence task: name a Python function from its body.

Why this task: it needs the whole source read at once (an encoder's job) and a short output
written token by token (a decoder's), its data is on every machine that trains (the standard
library's own source, split by file exactly as the decoder-only model's corpus is), and a user
judges an answer at a glance: `def _(self, key): return self._data.pop(key, None)` -> `pop`.

Each example is a function (methods and nested ones too) with its docstring removed and its
name replaced by `_` (in the `def` line and wherever the body calls itself); the target is the
name. Dunder methods, `test*` functions and unittest fixtures (`setUp`, ...) are left out (their
names say nothing about the body's skill), and so are duplicates. The source is cut to the
model's longest source.

Metrics, on the held-out files: exact match, and sub-token F1 (names split at `_`, as
`get_item` -> {get, item}), against two baselines on the same split: the most frequent name in
the training split, and copying the first name the body calls.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from model.data import _files, _is_val, default_sources


FIXTURES = {"setUp", "tearDown", "setUpClass", "tearDownClass", "setUpModule", "tearDownModule"}


@dataclass(frozen=True)
class Example:
    source: str  # the function, name masked, docstring removed
    name: str
    first_call: str  # the copy baseline's answer ("" when the body calls nothing)


def _first_call(fn: ast.AST) -> str:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                return f.id
            if isinstance(f, ast.Attribute):
                return f.attr
    return ""


def _examples_in(text: str) -> list[Example]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = fn.name
        if (
            name.startswith("__")
            or name.lower().startswith("test")
            or name in FIXTURES
            or fn.end_lineno - fn.lineno < 2
        ):
            continue
        body = lines[fn.lineno - 1 : fn.end_lineno]
        first = fn.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            if len(fn.body) == 1:
                continue  # a docstring and nothing else
            start, end = first.lineno - fn.lineno, first.end_lineno - fn.lineno
            body = body[:start] + body[end + 1 :]
        source = textwrap.dedent("\n".join(body))
        source = re.sub(rf"\b{re.escape(name)}\b", "_", source)
        out.append(Example(source, name, _first_call(fn)))
    return out


def load_examples(
    sources: list[Path] | None = None, seed: int = 0, val_fraction: float = 0.05
) -> tuple[list[Example], list[Example]]:
    """(train, validation), split by file as model/data.py splits the corpus; duplicates dropped
    (a duplicate of a training example is dropped from validation too)."""
    split: dict[bool, list[Example]] = {False: [], True: []}
    seen: set[tuple[str, str]] = set()
    files = _files(sources or default_sources(), (".py",))
    for is_val in (False, True):  # training first: validation never repeats a training example
        for rel, path in files:
            if _is_val(rel, seed, val_fraction) != is_val:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for ex in _examples_in(text):
                key = (ex.source, ex.name)
                if key not in seen:
                    seen.add(key)
                    split[is_val].append(ex)
    return split[False], split[True]


def subtokens(name: str) -> list[str]:
    return [p for p in name.lower().split("_") if p]


def subtoken_f1(predicted: str, actual: str) -> float:
    p, a = Counter(subtokens(predicted)), Counter(subtokens(actual))
    common = sum((p & a).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(a.values())
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    n = len(examples)
    return {
        "exact_match": sum(p == e.name for p, e in zip(predictions, examples)) / n,
        "subtoken_f1": sum(subtoken_f1(p, e.name) for p, e in zip(predictions, examples)) / n,
    }


def baselines(train: list[Example], val: list[Example]) -> dict[str, dict[str, float]]:
    most_frequent = Counter(e.name for e in train).most_common(1)[0][0]
    return {
        f"most frequent name ({most_frequent!r})": score([most_frequent] * len(val), val),
        "copy the first name the body calls": score([e.first_call for e in val], val),
    }
