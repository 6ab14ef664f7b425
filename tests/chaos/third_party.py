"""The model the defaults are measured against: a third-party tiny GPT-2 as a user drops it into
Triton's layout — one model.onnx (Optimum's export, no cache inputs) and a config.pbtxt that
declares batching (32 rows, 2 ms, a queue of 64) and the vocabulary, and no position limit
anywhere (no config.json beside it): tserve must find the 64-row position table itself.

Built from a config after a fixed seed with transformers and exported by optimum-cli (test-only
extras), once per checkout under runs/chaos/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "runs" / "chaos" / "gpt2_plain"
NAME = "gpt2"
VOCAB = 512
POSITIONS = 64

CONFIG = f"""name: "{NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "position_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {VOCAB} ] }} ]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
  default_queue_policy {{ max_queue_size: 64 }}
}}
parameters {{ key: "tserve.vocab_size" value: {{ string_value: "{VOCAB}" }} }}
parameters {{ key: "tserve.pad_values" value: {{ string_value: "input_ids=0,attention_mask=0,position_ids=0" }} }}
parameters {{ key: "tserve.unpad_outputs" value: {{ string_value: "logits" }} }}
"""


def model_folder() -> Path:
    """runs/chaos/gpt2_plain/gpt2: the model's folder (config.pbtxt, 1/model.onnx)."""
    folder = CACHE / NAME
    if (folder / "1" / "model.onnx").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    work = CACHE / "build"
    shutil.rmtree(work, ignore_errors=True)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).eval().save_pretrained(work / "source")
    res = subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(work / "source")]
        + ["--task", "text-generation", str(work / "onnx")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"},
    )
    if res.returncode != 0:
        raise RuntimeError(f"optimum-cli export failed: {res.stderr[-2000:]}")
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "onnx" / "model.onnx", folder / "1" / "model.onnx")  # the graph alone, as users drop it
    (folder / "config.pbtxt").write_text(CONFIG)
    shutil.rmtree(work)
    return folder


def repository(shipped: Path) -> Path:
    """A repository with the shipped models and the third-party GPT beside them."""
    repo = CACHE / "repository"
    if repo.is_dir():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for model in shipped.iterdir():
        if model.is_dir():
            (repo / model.name).symlink_to(model.resolve())
    (repo / NAME).symlink_to(model_folder())
    return repo
