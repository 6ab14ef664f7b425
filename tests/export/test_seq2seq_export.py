"""The shipped encoder-decoder (`namegen`): its graphs give the committed checkpoint's greedy
names, and its training figures are what the README states against the baselines measured on
the same held-out split."""

from __future__ import annotations

import json

import torch

from export.seq2seq import load_sessions, onnx_greedy
from model.seq2seq import load_seq2seq
from tests.conftest import DEFAULT_REPOSITORY, ROOT
import pytest

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

ENTRY = DEFAULT_REPOSITORY / "namegen" / "1"
CHECKPOINT = ROOT / "model" / "checkpoints" / "namegen.pt"


def test_shipped_graphs_give_the_checkpoint_greedy_names_alone_and_batched():
    model, _ = load_seq2seq(str(CHECKPOINT))
    manifest = json.loads((ENTRY / "manifest.json").read_text())
    sources = [g["source_ids"] for g in manifest["golden"]]
    new = model.cfg.max_target - 2
    want = [model.generate(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.int64), new)[0] for s in sources]
    sessions = load_sessions(ENTRY)
    assert [onnx_greedy(ENTRY, [s], new, sessions)[0] for s in sources] == want
    assert onnx_greedy(ENTRY, sources, new, sessions) == want  # right-padded together
    assert [g["greedy"] for g in manifest["golden"]] == want


def test_shipped_model_figures_as_the_readme_states_them():
    """Trained within the budget; beats both baselines measured on the same held-out split (the
    most frequent training name, and copying the first name the body calls) on both metrics."""
    metrics = json.loads((ENTRY / "manifest.json").read_text())["metrics"]
    ours = metrics["held_out"]
    assert len(metrics["baselines"]) == 2
    for baseline in metrics["baselines"].values():
        assert ours["exact_match"] > baseline["exact_match"] and ours["subtoken_f1"] > baseline["subtoken_f1"]
    assert metrics["held_out_examples"] >= 900 and metrics["train_seconds"] <= 45 * 60
