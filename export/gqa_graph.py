"""The GPT as a fused generation graph: ONNX Runtime's GroupQueryAttention with a KV buffer
that past and present share, written from the weights with onnx.helper (as onnxruntime-genai's
model builder does), beside the traced graph of onnx_export.py.

Same inputs and outputs as the traced graph, one meaning changed:

    input_ids [B, T], attention_mask [B, total], position_ids [B, T], past_key_values.{i}.*
    logits [B, T, vocab], present.{i}.key|value

Each row's cache starts at column 0 and its length is read from its attention mask (a row of
`length + T` ones, then zeros: right-padded, where the traced graph is left-padded). Bound
with IO binding to one buffer of `block_size` columns as both past and present, a step writes
its new keys and values in place and copies nothing (service/generation/kv_slots.py). The
traced graph stays the model's graph for ModelInfer; this one is the generation engine's,
shipped only after parity with the traced graph (verify_gqa) and checked again at load.

Per block, as model/transformer.py: the Q, K and V projections, GroupQueryAttention (causal, no
rotary: positions are the paper's sinusoids added at the input), the output projection,
LayerNorm(x + attention), LayerNorm(x + FFN(x)) with the exact (erf) GELU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import ONNX_IR_VERSION, ONNX_OPSET, input_names, output_names
from model.transformer import GPT

MS = "com.microsoft"
GQA_FILE = "model_gqa.onnx"  # its name beside model.onnx in a repository entry


def gqa_decoder(model: GPT, tied: bool = True) -> onnx.ModelProto:
    """The graph; with `tied`, a model whose output projection is its embedding stores that
    matrix once and transposes it in the graph (ONNX Runtime folds the Transpose at load).
    Without, the projection is its own initializer, as int8 quantization needs it (it quantizes
    a MatMul's weight only when it is an initializer)."""
    cfg = model.cfg
    d, H, hd = cfg.d_model, cfg.n_head, cfg.head_dim
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, domain: str = "", **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        w = const(f"{prefix}.weight_t", sd[f"{prefix}.weight"].T)
        y = node("MatMul", [x, w], f"{out}/matmul")
        return node("Add", [y, const(f"{prefix}.bias", sd[f"{prefix}.bias"])], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node(
            "LayerNormalization",
            [x, const(f"{prefix}.weight", sd[f"{prefix}.weight"]), const(f"{prefix}.bias", sd[f"{prefix}.bias"])],
            out,
            axis=-1,
            epsilon=1e-5,
        )

    # lengths for the attention: every row's tokens are columns [0, sum(mask))
    lengths = node("ReduceSum", ["attention_mask", const("axis_1", np.array([1], np.int64))], "mask_sum", keepdims=0)
    seqlens = node(
        "Cast",
        [node("Sub", [lengths, const("one", np.array(1, np.int64))], "seqlens_k_64")],
        "seqlens_k",
        to=TensorProto.INT32,
    )
    total = node(
        "Cast",
        [
            node(
                "Gather",
                [node("Shape", ["attention_mask"], "mask_shape"), const("index_1", np.array(1, np.int64))],
                "total_64",
                axis=0,
            )
        ],
        "total_sequence_length",
        to=TensorProto.INT32,
    )

    # input: embedding x sqrt(d) + sinusoidal encoding of position_ids (even channels sin, odd cos)
    emb = node("Gather", [const("tok_emb", sd["tok_emb.weight"]), "input_ids"], "embedding", axis=0)
    x = node("Mul", [emb, const("sqrt_d", np.array(math.sqrt(d), np.float32))], "embedding_scaled")
    inv_freq = np.exp(np.arange(0, d, 2, dtype=np.float32) * (-math.log(10000.0) / d)).astype(np.float32)
    pos = node(
        "Unsqueeze",
        [
            node("Cast", ["position_ids"], "positions_f", to=TensorProto.FLOAT),
            const("axis_last", np.array([-1], np.int64)),
        ],
        "positions_u",
    )
    angles = node("Mul", [pos, const("inv_freq", inv_freq)], "angles")
    pairs = node(
        "Concat",
        [
            node("Unsqueeze", [node("Sin", [angles], "sin"), "axis_last"], "sin_u"),
            node("Unsqueeze", [node("Cos", [angles], "cos"), "axis_last"], "cos_u"),
        ],
        "sin_cos",
        axis=-1,
    )
    pe = node("Reshape", [pairs, const("shape_btd", np.array([0, 0, d], np.int64))], "positional_encoding")
    x = node("Add", [x, pe], "x0")

    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        # Q, K and V apart, as in the traced graph (not packed into one MatMul): the int8 variant
        # then quantizes the same weight matrices the same way, and matches its traced graph
        q, k, v = (linear(x, f"{p}.attn.{n}_proj", f"{p}/{n}") for n in "qkv")
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total],
                [f"{p}/attention", f"present.{i}.key", f"present.{i}.value"],
                name=f"{p}/GroupQueryAttention",
                domain=MS,
                num_heads=H,
                kv_num_heads=H,
                scale=1.0 / math.sqrt(hd),
                do_rotary=0,
            )
        )
        a = linear(f"{p}/attention", f"{p}.attn.out_proj", f"{p}/attn_out")
        x = layer_norm(node("Add", [x, a], f"{p}/residual1"), f"{p}.norm1", f"{p}/norm1")
        h = node("Gelu", [linear(x, f"{p}.ff.fc1", f"{p}/fc1")], f"{p}/gelu", domain=MS)
        x = layer_norm(
            node("Add", [x, linear(h, f"{p}.ff.fc2", f"{p}/fc2")], f"{p}/residual2"), f"{p}.norm2", f"{p}/norm2"
        )
    if tied and model.lm_head.weight is model.tok_emb.weight:
        lm_head = node("Transpose", ["tok_emb"], "lm_head.weight_t", perm=[1, 0])
    else:
        lm_head = const("lm_head.weight_t", sd["lm_head.weight"].T)
    node("MatMul", [x, lm_head], "logits")

    past = ["batch", H, "past_sequence", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, past) for n in input_names(cfg.n_layer)[3:]]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab_size])]
    outputs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, "present_sequence", hd])
        for n in output_names(cfg.n_layer)[1:]
    ]
    graph = helper.make_graph(nodes, "gpt_gqa", inputs, outputs, inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MS, 1)],
        producer_name="tserve export/gqa_graph.py",
    )
    proto.ir_version = ONNX_IR_VERSION
    return proto


def export_gqa(model: GPT, path: Path, tied: bool = True) -> Path:
    proto = gqa_decoder(model, tied)
    onnx.checker.check_model(proto)  # the standard parts; contrib ops are ONNX Runtime's to check
    onnx.save(proto, str(path))
    return path


def verify_gqa(model: GPT, path: Path, real_prompts: list[list[int]], greedy_tokens: int = 64) -> dict:
    """Parity of the fused graph with the model, one prompt at a time (the layout the engine
    gives it: no padding before a row's tokens): prompt-pass logits and greedy tokens, the
    cache fed back as past. Raises if it fails. (Rows of mixed lengths in one shared buffer are
    the engine tests'.)"""
    from export.verify import cpu_session, decoder_feeds, empty_past, onnx_greedy

    session = cpu_session(path)
    greedy_tokens = min(greedy_tokens, model.cfg.block_size - max(len(p) for p in real_prompts))
    diff = 0.0
    for p in real_prompts:
        ids = np.array([p], np.int64)
        with torch.no_grad():
            want = model(torch.from_numpy(ids))[0].numpy()
        got = session.run(
            ["logits"],
            decoder_feeds(
                model.cfg.n_layer, ids, np.ones_like(ids), np.arange(len(p), dtype=np.int64)[None], empty_past(model, 1)
            ),
        )[0]
        diff = max(diff, float(np.abs(got - want).max()))
    reference = [model.generate(p, greedy_tokens) for p in real_prompts]
    alone = [onnx_greedy(model, session, [p], greedy_tokens)[0] for p in real_prompts]
    report = {"max_abs_logits_diff": diff, "greedy_tokens": greedy_tokens, "greedy_equal_alone": alone == reference}
    if diff > 1e-4 or not report["greedy_equal_alone"]:
        raise AssertionError(f"fused graph parity failed: {report}")
    return report
