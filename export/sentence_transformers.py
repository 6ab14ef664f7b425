"""A sentence-transformers Hub snapshot's layout around an Optimum feature-extraction export:
the tokenizer and config.json at the root, the graph under onnx/, modules.json naming
Transformer -> Pooling (-> Normalize), 1_Pooling/config.json and sentence_bert_config.json.
What users download from the Hub, built here for the tests and the embedding benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODES = ("cls_token", "mean_tokens", "max_tokens", "lasttoken")  # 1_Pooling/config.json's pooling_mode_*


def write_snapshot(
    export: Path,
    folder: Path,
    dim: int,
    pooling: str = "mean_tokens",
    normalize: bool = True,
    max_seq_length: int = 512,
) -> Path:
    if pooling not in MODES:
        raise ValueError(f"pooling must be one of {MODES}")
    folder.mkdir(parents=True)
    for f in export.iterdir():
        if f.suffix != ".onnx":
            shutil.copy(f, folder / f.name)
    (folder / "onnx").mkdir()
    shutil.copy(export / "model.onnx", folder / "onnx" / "model.onnx")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m == pooling for m in MODES}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, **modes}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder
