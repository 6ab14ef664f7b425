"""Shared fixtures: a tiny model trained for a few steps and exported, once per session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what servers started by the tests derive from models (fused generation graphs) goes to a folder
# of the run's own, not the user's cache; inherited by every ServerProcess
os.environ.setdefault("TSERVE_CACHE_DIR", tempfile.mkdtemp(prefix="tserve-test-cache-"))
DEFAULT_REPOSITORY = ROOT / "model_repository"
DEFAULT_CHECKPOINT = ROOT / "model" / "checkpoints" / "bytegpt.pt"
# the shipped decoder's vocabulary: the width of its logits, one past its largest token id
BYTEGPT_VOCAB = json.loads((DEFAULT_REPOSITORY / "bytegpt" / "1" / "manifest.json").read_text())["model_config"][
    "vocab_size"
]


def bytegpt_tokenizer():
    """The shipped bytegpt's tokenizer, loaded as the server loads it."""
    from service.generation.tokenizer import load_tokenizer

    version = DEFAULT_REPOSITORY / "bytegpt" / "1"
    file = version / "tokenizer.json"
    manifest = json.loads((version / "manifest.json").read_text())
    return load_tokenizer(manifest.get("tokenizer"), file if file.is_file() else None)


def bytegpt_text(ids) -> str:
    """What the server's stream decoder makes of these generated ids."""
    decoder = bytegpt_tokenizer().decoder()
    return "".join(decoder.push(int(t)) for t in ids) + decoder.flush()


TINY_TRAIN_ARGS = [
    "--block-size",
    "96",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--batch-size",
    "8",
    "--max-steps",
    "12",
    "--warmup-steps",
    "2",
    "--lr",
    "3e-3",
    "--eval-interval",
    "12",
    "--eval-bytes",
    "4096",
    "--final-eval-bytes",
    "8192",
    "--max-corpus-bytes",
    "300000",
    "--ngram-order",
    "2",
    "--bpe-vocab",
    "512",
]


@pytest.fixture(scope="session")
def traced_bytegpt(request) -> Path:
    """The shipped bytegpt's weights as torch.onnx traces them (plain attention over a
    concatenated, left-padded cache), the graph an Optimum-style decoder export has. The
    repository ships only the fused graph; this one is exported once per checkpoint and kept in
    pytest's cache, so a rerun costs nothing."""
    from export.onnx_export import export_onnx
    from export.repository import sha256
    from model.transformer import load_checkpoint

    path = request.config.cache.mkdir("traced") / f"bytegpt-{sha256(DEFAULT_CHECKPOINT)[:16]}.onnx"
    if not path.is_file():
        model, _ = load_checkpoint(str(DEFAULT_CHECKPOINT))
        export_onnx(model, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from model.train import parse_args, train

    out = tmp_path_factory.mktemp("tiny_run")
    tc, mc, _ = parse_args(["--out", str(out), *TINY_TRAIN_ARGS])
    train(tc, mc)
    return out / "checkpoint.pt"


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """A model repository holding the tiny model as `bytegpt` and `bytegpt_int8`."""
    from export.__main__ import main as export_main

    repo = tmp_path_factory.mktemp("repo")
    export_main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--repository",
            str(repo),
            "--eval-bytes",
            "4096",
            "--checkpoint-copy",
            str(repo.parent / "tiny.pt"),
        ]
    )
    return repo
