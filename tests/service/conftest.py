"""Repositories for the service tests: the shipped models plus models the tests make."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.transformer import GPTConfig, MultiHeadAttention
from tests.conftest import DEFAULT_REPOSITORY
from service.launcher import ServerProcess

ENCODER_VOCAB = 100
ENCODER_HIDDEN = 32


class TinyEncoder(nn.Module):
    """A bidirectional encoder with another signature: input_ids, attention_mask,
    token_type_ids -> last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        cfg = GPTConfig(vocab_size=ENCODER_VOCAB, n_head=4, d_model=ENCODER_HIDDEN, d_ff=64)
        self.tok = nn.Embedding(ENCODER_VOCAB, ENCODER_HIDDEN)
        self.typ = nn.Embedding(2, ENCODER_HIDDEN)
        self.attn = MultiHeadAttention(cfg)
        self.norm = nn.LayerNorm(ENCODER_HIDDEN)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.tok(input_ids) + self.typ(token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]  # keys only: no causal mask
        a, _ = self.attn(x, mask)
        return self.norm(x + a)


ENCODER_CONFIG = """name: "encoder"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] } ]
dynamic_batching { max_queue_delay_microseconds: 5000 }
parameters { key: "tserve.pad_values" value: { string_value: "input_ids=0,attention_mask=0,token_type_ids=0" } }
parameters { key: "tserve.unpad_outputs" value: { string_value: "last_hidden_state" } }
parameters { key: "tserve.vocab_size" value: { string_value: "100" } }
parameters { key: "tserve.max_sequence_length" value: { string_value: "128" } }
"""


def export_encoder(path: Path) -> Path:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    B, T = 2, 5
    example = (
        torch.randint(0, ENCODER_VOCAB, (B, T)),
        torch.ones(B, T, dtype=torch.int64),
        torch.zeros(B, T, dtype=torch.int64),
    )
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {n: {0: batch, 1: seq} for n in ("input_ids", "attention_mask", "token_type_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        model,
        example,
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        opset_version=18,
    )
    proto = program.model_proto
    proto.ir_version = 10
    import onnx

    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def encoder_onnx(tmp_path_factory) -> Path:
    return export_encoder(tmp_path_factory.mktemp("encoder") / "model.onnx")


@pytest.fixture(scope="session")
def repository(tmp_path_factory, encoder_onnx) -> Path:
    """The shipped models, the test encoder, and the encoder again without a config.pbtxt."""
    repo = tmp_path_factory.mktemp("service_repo")
    for name in ("bytegpt", "bytegpt_int8"):
        shutil.copytree(DEFAULT_REPOSITORY / name, repo / name)
    (repo / "encoder" / "1").mkdir(parents=True)
    shutil.copy(encoder_onnx, repo / "encoder" / "1" / "model.onnx")
    (repo / "encoder" / "config.pbtxt").write_text(ENCODER_CONFIG)
    (repo / "encoder_auto" / "1").mkdir(parents=True)
    shutil.copy(encoder_onnx, repo / "encoder_auto" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def server(repository):
    with ServerProcess(
        repository, "--max-message-bytes", str(1 << 20), "--log-format", "json", "--log-level", "debug"
    ) as s:
        yield s


def random_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, (batch, length), dtype=np.int64)
