"""The training corpus: text files split by file into train and validation, and tokenized.

By default, the Python standard library's own source (every machine that trains has it).
Each file is assigned to train or validation by a seeded hash of its relative path, so the
split is deterministic and no file straddles the two.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.tokenizer import Tokenizer


@dataclass
class Documents:
    train: list[str]
    val: list[str]


def default_sources() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"])]


def _files(sources: list[Path], suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for src in sources:
        if src.is_file():
            found.append((src.name, src))
            continue
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.suffix in suffixes and "site-packages" not in p.parts:
                found.append((str(p.relative_to(src)), p))
    if not found:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {[str(s) for s in sources]}")
    return found


def _is_val(rel: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < val_fraction


def load_documents(
    sources: list[Path] | None = None,
    seed: int = 0,
    val_fraction: float = 0.05,
    suffixes: tuple[str, ...] = (".py",),
    max_bytes: int | None = None,
) -> Documents:
    """Each file's text (bytes that are not UTF-8 become U+FFFD), in train or validation."""
    docs = Documents([], [])
    total = 0
    for rel, path in _files(sources or default_sources(), suffixes):
        data = path.read_bytes()
        (docs.val if _is_val(rel, seed, val_fraction) else docs.train).append(data.decode("utf-8", errors="replace"))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs.val:  # tiny corpora: keep at least one file for validation
        docs.val.append(docs.train.pop())
    return docs


def tokenize(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """One stream of uint16 ids, each document followed by <|endoftext|>."""
    out = []
    for ids in tokenizer.encode_batch(docs):
        out.append(np.asarray(ids, dtype=np.uint16))
        out.append(np.array([tokenizer.eot_id], dtype=np.uint16))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


def eval_span(docs: Sequence[str], max_bytes: int) -> list[str]:
    """The first `max_bytes` of the validation text (separators count one byte), the last
    document cut at a line end: the same text for every tokenizer and the n-gram."""
    span, total = [], 0
    for doc in docs:
        size = len(doc.encode()) + 1
        if total + size <= max_bytes:
            span.append(doc)
            total += size
            continue
        head = doc.encode()[: max_bytes - total]
        cut = head.rfind(b"\n") + 1
        if cut:
            span.append(head[:cut].decode("utf-8", errors="ignore"))
        break
    return span
