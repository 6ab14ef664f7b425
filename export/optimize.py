"""ONNX Runtime graph optimization report and dynamic int8 quantization.

The traced graph is standard ONNX ops; ONNX Runtime applies its fusions when a session is
created. This module reports which fusions that produces (by counting operator types before and
after), how fast a graph runs beside another, and writes the int8 variant of the shipped (fused)
graph with onnxruntime.quantization.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.verify import cpu_session

# operator types ONNX Runtime's fusions produce (com.microsoft contrib ops and fused ONNX ops)
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "FusedMatMul",
    "FusedGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "BiasSoftmax",
    "QAttention",
)


def op_counts(model_path: Path | str) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(model_path)).graph.node)


def optimized_op_counts(model_path: Path) -> Counter:
    """Operator counts of the graph ONNX Runtime actually runs (extended, portable level)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        return op_counts(out)


def fusion_report(model_path: Path) -> dict:
    before, after = op_counts(model_path), optimized_op_counts(model_path)
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused_ops": {op: after[op] for op in FUSED_OPS if after[op] > before[op]},
    }


def decoder_batch(session: ort.InferenceSession, batch: int, seq: int, vocab_size: int, seed: int = 0) -> dict:
    """A prompt-pass feed (empty past) for any decoder-with-past graph."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, vocab_size, (batch, seq), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:  # past_key_values.*: [batch, heads, 0, head_dim]
            feeds[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), np.float32)
    return feeds


def tokens_per_second(session: ort.InferenceSession, feeds: dict, min_seconds: float = 1.0) -> float:
    session.run(["logits"], feeds)  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n < 3:
        session.run(["logits"], feeds)
        n += 1
    return n * feeds["input_ids"].size / elapsed


def speed_ratios(fp32: Path, int8: Path | None, vocab_size: int, batch: int = 8, seq: int = 64) -> dict:
    """Prompt-pass throughput measured in one run: optimized vs unoptimized, int8 vs fp32."""
    plain = cpu_session(fp32, optimize=False)
    optimized = cpu_session(fp32, optimize=True)
    feeds = decoder_batch(plain, batch, seq, vocab_size)
    base = tokens_per_second(plain, feeds)
    opt = tokens_per_second(optimized, feeds)
    report = {
        "shape": [batch, seq],
        "unoptimized_tokens_per_s": round(base),
        "optimized_tokens_per_s": round(opt),
        "optimized_vs_unoptimized": round(opt / base, 2),
    }
    if int8 is not None:
        q = tokens_per_second(cpu_session(int8, optimize=True), feeds)
        report["int8_tokens_per_s"] = round(q)
        report["int8_vs_fp32"] = round(q / opt, 2)
    return report


def quantize_int8(fp32: Path, out: Path) -> Path:
    """Dynamic int8 quantization of the MatMul weights (activations quantized at run time) and of
    the embedding table a Gather reads (dequantized after the lookup): the int8 entry's graph
    stores no float matrix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        # DefaultTensorType: shape inference cannot type what follows a contrib op (the fused
        # graph's GroupQueryAttention); every activation here is float
        quantize_dynamic(
            str(prepped),
            str(out),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    proto = onnx.load(str(out))
    proto.ir_version = min(proto.ir_version, onnx.load(str(fp32)).ir_version)
    onnx.save(proto, str(out))
    return out
