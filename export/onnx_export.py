"""Checkpoint -> ONNX in the Hugging Face / Optimum decoder-with-past convention.

Inputs:  input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
         position_ids [batch, seq] int64, past_key_values.{i}.key|value [batch, heads, past, head_dim]
Outputs: logits [batch, seq, vocab], present.{i}.key|value [batch, heads, past + seq, head_dim]

One graph serves the prompt pass (past = 0) and the one-token decode steps.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from model.transformer import GPT

# onnxruntime 1.31 refuses models newer than IR 11 from some writers; pin what we emit.
ONNX_IR_VERSION = 10
ONNX_OPSET = 18


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class DecoderWithPast(nn.Module):
    """Flat tensors in and out, in the order of input_names()/output_names()."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def export_onnx(model: GPT, path: Path) -> Path:
    """Export with dynamic batch, sequence and past axes; returns the written path."""
    cfg = model.cfg
    model.eval()
    # torch.export specializes sizes 0 and 1, so the example uses sizes >= 2 throughout.
    B, T, P = 2, 3, 4
    example = (
        torch.randint(0, cfg.vocab_size, (B, T)),
        torch.ones(B, P + T, dtype=torch.int64),
        torch.arange(P, P + T).repeat(B, 1),
        tuple(torch.randn(B, cfg.n_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)),
    )
    batch = torch.export.Dim("batch", max=1024)
    seq = torch.export.Dim("seq", max=cfg.block_size)
    past = torch.export.Dim("past", min=0, max=cfg.block_size)
    # the mask covers past + seq, but a derived Dim is refused by the exporter: give it its own
    total = torch.export.Dim("total", max=2 * cfg.block_size)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple({0: batch, 2: past} for _ in range(2 * cfg.n_layer)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        DecoderWithPast(model),
        example,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names(cfg.n_layer),
        output_names=output_names(cfg.n_layer),
        opset_version=ONNX_OPSET,
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
    proto.doc_string = f"byte-level GPT, {cfg.n_layer} layers, d_model {cfg.d_model}, context {cfg.block_size}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path
