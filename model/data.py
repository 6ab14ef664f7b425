"""The training corpus: text files concatenated into one byte stream, split by file.

By default, the Python standard library's own source (every machine that trains has it).
Each file is assigned to train or validation by a seeded hash of its relative path, so the
split is deterministic and no file straddles the two.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.tokenizer import EOT_ID


@dataclass
class Corpus:
    train: np.ndarray  # uint16 token ids, documents separated by EOT_ID
    val: np.ndarray
    n_train_files: int
    n_val_files: int


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


def load_corpus(
    sources: list[Path] | None = None,
    seed: int = 0,
    val_fraction: float = 0.05,
    suffixes: tuple[str, ...] = (".py",),
    max_bytes: int | None = None,
) -> Corpus:
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    total = 0
    for rel, path in _files(sources or default_sources(), suffixes):
        data = path.read_bytes()
        is_val = _is_val(rel, seed, val_fraction)
        parts[is_val].append(data)
        counts[is_val] += 1
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not parts[True]:  # tiny corpora: keep at least one file for validation
        parts[True].append(parts[False].pop())
        counts[True], counts[False] = 1, counts[False] - 1

    def join(docs: list[bytes]) -> np.ndarray:
        out = []
        for d in docs:
            out.append(np.frombuffer(d, dtype=np.uint8).astype(np.uint16))
            out.append(np.array([EOT_ID], dtype=np.uint16))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)

    return Corpus(join(parts[False]), join(parts[True]), counts[False], counts[True])
