"""The sentence-transformers folder convention: how a snapshot says to turn token states into
one vector per text. This module imports nothing from the service.

    modules.json              the pipeline: Transformer -> Pooling (-> Normalize)
    1_Pooling/config.json     pooling_mode_mean_tokens / _cls_token / _lasttoken / _max_tokens
    sentence_bert_config.json max_seq_length
    onnx/model.onnx           the graph (a Hub snapshot's ONNX export), model.onnx at the root
                              being an Optimum export's

A folder without modules.json (a plain Optimum feature-extraction export) is pooled by mean
over its tokens, as Infinity and sentence-transformers' own default do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POOLING_MODES = {  # 1_Pooling/config.json's keys -> tserve's names (TEI's)
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last_token",
    "pooling_mode_max_tokens": "max",
}
SNAPSHOT_GRAPH = Path("onnx") / "model.onnx"


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean, cls, last_token or max
    normalize: bool = False  # modules.json ends with Normalize
    max_seq_length: int | None = None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name} is unreadable: {e}") from e
    return data


def read_pooling(version_dir: Path) -> Pooling:
    """The folder's pooling; ValueError naming the file when it is malformed or asks for a mode
    tserve does not implement."""
    modules_file = version_dir / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = _json(modules_file)
    if not isinstance(modules, list):
        raise ValueError("modules.json must be a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    pooling = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    mode = "mean"
    if pooling is not None:
        config = _json(version_dir / str(pooling.get("path", "1_Pooling")) / "config.json")
        modes = [POOLING_MODES[k] for k in POOLING_MODES if config.get(k)]
        unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_MODES]
        if unknown or len(modes) > 1:
            raise ValueError(
                f"1_Pooling/config.json asks for {unknown or modes}: tserve pools by one of "
                f"{sorted(POOLING_MODES.values())}"
            )
        mode = modes[0] if modes else "mean"
    max_len = None
    bert_config = version_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        value = _json(bert_config).get("max_seq_length")
        max_len = value if isinstance(value, int) and value > 0 else None
    return Pooling(mode, "Normalize" in kinds, max_len)
