"""A fused generation graph derived from a user's Hugging Face / Optimum decoder export.

`optimum-cli export onnx --task text-generation-with-past` writes plain attention: every step
concatenates the whole cache into a new present, and rows are left-padded. onnxruntime-genai's
folders and our own GPT's fused graph (export/gqa_graph.py) instead run ONNX Runtime's
GroupQueryAttention over one KV buffer that past and present share, which KVSlots drives with
IO binding (generation/kv_slots.py). This module gives an Optimum export the same graph: it
reads the export's weights (protos/onnx_graph.proto, no onnx package) and writes the family's
block again with fused operators, as genai's model builder does from PyTorch weights:

    Llama-style   llama, mistral, qwen2, phi3, smollm: SimplifiedLayerNormalization and
                  SkipSimplifiedLayerNormalization (RMSNorm with the residual add fused), Q, K
                  and V in one MatMul, GroupQueryAttention with the rotary embedding inside
                  (do_rotary, cos and sin tables from the config's rope_theta), gate and up
                  MatMuls, SiLU
    GPT-2         LayerNormalization and SkipLayerNormalization, the packed c_attn,
                  GroupQueryAttention with as many KV heads as heads and no rotary (learned
                  positions added at the input), FastGelu (GPT-2's tanh GELU)

Rebuilt from the weights rather than rewritten node by node: what an exporter emits for one
block changes with torch and transformers versions (how RMSNorm, rotary and the causal mask are
traced), while the weights and the module paths in the node names (`/model/layers.3/self_attn/
q_proj/MatMul`) have stayed put; a rewrite would have to recognise every variant of the
attention subgraph, a rebuild only has to find each module's weights. Either way the result
is used only after the engine checks it against the export's own graph at load
(checks.fused_mismatch: the golden prompt and decode steps, logits within FUSED_ATOL), so a
weight found wrongly makes a graph that is refused, never one that changes a user's outputs.
Anything else (another family, fp16 weights, a rope scaling other than the default or llama3,
a sliding window shorter than the context, partial rotary) keeps the export's graph, and the
log says why.

The graph has the export's input and output names (position_ids is taken and unused where the
rotary embedding reads positions from the lengths), so the engine and validation treat it as
any shared-buffer graph. It is written under the cache directory, keyed by the export's
checksum and this module's DERIVATION_VERSION: the weights once, as external data in one file
beside the graph, so a second load reads them without deriving again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.generated import onnx_graph_pb2 as onnx_pb

log = logging.getLogger(__name__)

DERIVATION_VERSION = 2  # bump when the graphs written here change: older cached ones are not reused
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
MS = "com.microsoft"
LLAMA_STYLE = {"llama", "mistral", "qwen2", "phi3", "smollm3"}
FAMILIES = LLAMA_STYLE | {"gpt2"}
T = onnx_pb.TensorProto


class NotDerivable(Exception):
    """Why an export keeps its own graph for generation."""


# -- reading the export ---------------------------------------------------------------------


class ExportWeights:
    """An exported graph's nodes and the constant tensors their inputs resolve to: an
    initializer or a Constant, through Identity (the TorchScript exporter shares equal
    initializers between layers that way) and Transpose (a tied language-model head)."""

    def __init__(self, model_file: Path) -> None:
        self.dir = model_file.parent
        model = onnx_pb.ModelProto()
        model.ParseFromString(model_file.read_bytes())
        self.graph = model.graph
        self.inputs = {i.name for i in self.graph.input}
        self._tensors = {t.name: t for t in self.graph.initializer}
        self._producer: dict[str, onnx_pb.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                self._producer[out] = node
        self._cache: dict[str, np.ndarray | None] = {}

    def nodes(self, module: str) -> list[onnx_pb.NodeProto]:
        """The nodes traced from one module (`/model/layers.0/self_attn/q_proj`)."""
        prefix = module + "/"
        return [n for n in self.graph.node if n.name.startswith(prefix)]

    def has(self, module: str) -> bool:
        return bool(self.nodes(module))

    def value(self, name: str) -> np.ndarray | None:
        """The constant a tensor name holds, or None if it is computed from the inputs."""
        if name not in self._cache:
            self._cache[name] = self._resolve(name)
        return self._cache[name]

    def _resolve(self, name: str) -> np.ndarray | None:
        if name in self._tensors:
            return self._array(self._tensors[name])
        node = self._producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            return None if t is None else self._array(t)
        if node.op_type == "Identity":
            return self.value(node.input[0])
        if node.op_type == "Transpose":
            x = self.value(node.input[0])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return None if x is None else np.transpose(x, perm)
        return None

    def _array(self, t: onnx_pb.TensorProto) -> np.ndarray:
        dtype = {T.FLOAT: np.float32, T.INT64: np.int64, T.INT32: np.int32, T.FLOAT16: np.float16}.get(t.data_type)
        if dtype is None:
            raise NotDerivable(f"tensor {t.name!r} has ONNX data type {t.data_type}, which tserve does not derive from")
        if t.data_location == T.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            path = (self.dir / where["location"]).resolve()
            if self.dir.resolve() not in path.parents:
                raise NotDerivable(f"tensor {t.name!r} names external data outside the model's folder")
            with open(path, "rb") as f:
                f.seek(int(where.get("offset", 0)))
                size = int(where["length"]) if "length" in where else -1
                data = np.frombuffer(f.read(size), dtype)
        elif t.HasField("raw_data"):
            data = np.frombuffer(t.raw_data, dtype)
        else:
            data = np.array({T.FLOAT: t.float_data, T.INT64: t.int64_data}.get(t.data_type, t.int32_data), dtype)
        return data.reshape(tuple(t.dims))

    def linear(self, module: str, required: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A Linear's weight as [in, out] and its bias (or None), from its MatMul (+ Add) or Gemm."""
        weight = bias = None
        for node in self.nodes(module):
            consts = [(i, v) for i, v in ((i, self.value(x)) for i, x in enumerate(node.input)) if v is not None]
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                weight = self.value(node.input[1])
                if weight is not None and trans_b:
                    weight = weight.T
                if len(node.input) > 2 and node.input[2]:
                    bias = self.value(node.input[2])
            elif node.op_type == "MatMul" and consts:
                weight = consts[-1][1]
            elif node.op_type == "Add" and consts and consts[0][1].ndim == 1:
                bias = consts[0][1]
        if weight is None or weight.ndim != 2:
            if required:
                raise NotDerivable(f"no weight found for {module}")
            return None
        return np.ascontiguousarray(weight, np.float32), bias

    def norm_weight(self, module: str, width: int) -> tuple[np.ndarray, np.ndarray | None, float | None]:
        """A norm's scale (and shift, and epsilon where the graph has them): a LayerNormalization
        node's, or the [width] constant an RMSNorm's Mul takes."""
        for node in self.nodes(module):
            if node.op_type == "LayerNormalization":
                eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                scale = self.value(node.input[1])
                shift = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                if scale is not None:
                    return scale.astype(np.float32), shift, eps
        for node in self.nodes(module):
            if node.op_type == "Mul":
                for x in node.input:
                    v = self.value(x)
                    if v is not None and v.shape == (width,):
                        return v.astype(np.float32), None, None
        raise NotDerivable(f"no norm weight found for {module}")

    def gathered(self, module: str) -> np.ndarray:
        """The table an embedding's Gather reads."""
        for node in self.nodes(module):
            if node.op_type == "Gather" and (v := self.value(node.input[0])) is not None:
                return v.astype(np.float32)
        raise NotDerivable(f"no embedding table found for {module}")


# -- writing the fused graph ----------------------------------------------------------------


class GraphWriter:
    """Nodes, initializers (external data in one file) and typed inputs and outputs of one
    graph, written with protos/onnx_graph.proto's messages."""

    def __init__(self, weights_path: Path) -> None:
        self.model = onnx_pb.ModelProto(ir_version=10, producer_name="tserve service/generation/derived_graph.py")
        self.model.opset_import.add(domain="", version=21)
        self.model.opset_import.add(domain=MS, version=1)
        self.graph = self.model.graph
        self.graph.name = "tserve_fused_decoder"
        self._weights = open(weights_path, "wb")
        self._weights_name = weights_path.name
        self._names: set[str] = set()

    def close(self) -> None:
        self._weights.close()

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        t = self.graph.initializer.add(name=name, dims=value.shape)
        t.data_type = {np.float32: T.FLOAT, np.int64: T.INT64, np.int32: T.INT32}[value.dtype.type]
        data = value.tobytes()
        if len(data) < 1024:
            t.raw_data = data
            return name
        offset = -self._weights.tell() % 64  # aligned, as ONNX's own external-data writer does not promise
        self._weights.write(b"\0" * offset)
        t.data_location = T.EXTERNAL
        t.external_data.add(key="location", value=self._weights_name)
        t.external_data.add(key="offset", value=str(self._weights.tell()))
        t.external_data.add(key="length", value=str(len(data)))
        self._weights.write(data)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> str:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        n = self.graph.node.add(op_type=op, input=inputs, output=outputs, name=outputs[0], domain=domain)
        for key, v in attrs.items():
            a = n.attribute.add(name=key)
            if isinstance(v, bool | int):
                a.type, a.i = onnx_pb.AttributeProto.INT, int(v)
            elif isinstance(v, float):
                a.type, a.f = onnx_pb.AttributeProto.FLOAT, v
            elif isinstance(v, list):
                a.type = onnx_pb.AttributeProto.INTS
                a.ints.extend(v)
            else:
                raise TypeError(f"attribute {key}: {type(v).__name__}")
        return outputs[0]

    def value_info(self, where, name: str, elem_type: int, dims: list[int | str]) -> None:
        v = where.add(name=name)
        v.type.tensor_type.elem_type = elem_type
        shape = v.type.tensor_type.shape
        for d in dims:
            if isinstance(d, int):
                shape.dim.add(dim_value=d)
            else:
                shape.dim.add(dim_param=d)

    def save(self, path: Path) -> None:
        self._weights.flush()
        path.write_bytes(self.model.SerializeToString())


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int


def _common_inputs(w: GraphWriter, export: ExportWeights, shape: Shape) -> tuple[str, str]:
    """The export's inputs and outputs, and the lengths GroupQueryAttention reads from the mask:
    each row's tokens are columns [0, sum(mask)) of its buffer."""
    w.value_info(w.graph.input, "input_ids", T.INT64, ["batch", "sequence"])
    w.value_info(w.graph.input, "attention_mask", T.INT64, ["batch", "total_sequence"])
    if "position_ids" in export.inputs:
        w.value_info(w.graph.input, "position_ids", T.INT64, ["batch", "sequence"])
    for i in range(shape.layers):
        for kind in ("key", "value"):
            dims = ["batch", shape.kv_heads, "past_sequence", shape.head_dim]
            w.value_info(w.graph.input, f"past_key_values.{i}.{kind}", T.FLOAT, dims)
    w.value_info(w.graph.output, "logits", T.FLOAT, ["batch", "sequence", shape.vocab])
    for i in range(shape.layers):
        for kind in ("key", "value"):
            dims = ["batch", shape.kv_heads, "present_sequence", shape.head_dim]
            w.value_info(w.graph.output, f"present.{i}.{kind}", T.FLOAT, dims)
    lengths = w.node(
        "ReduceSum", ["attention_mask", w.const("axis_1", np.array([1], np.int64))], "mask_sum", keepdims=0
    )
    seqlens = w.node(
        "Cast",
        [w.node("Sub", [lengths, w.const("one", np.array(1, np.int64))], "seqlens_k_64")],
        "seqlens_k",
        to=T.INT32,
    )
    width = w.node(
        "Gather",
        [w.node("Shape", ["attention_mask"], "mask_shape"), w.const("index_1", np.array(1, np.int64))],
        "total_64",
        axis=0,
    )
    total = w.node("Cast", [width], "total_sequence_length", to=T.INT32)
    return seqlens, total


def _attention(
    w: GraphWriter, i: int, qkv: str, seqlens: str, total: str, shape: Shape, rotary: tuple[str, str] | None
) -> str:
    extra = list(rotary) if rotary else []
    return w.node(
        "GroupQueryAttention",
        [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, *extra],
        [f"layers.{i}/attention", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=shape.heads,
        kv_num_heads=shape.kv_heads,
        scale=1.0 / math.sqrt(shape.head_dim),
        do_rotary=int(rotary is not None),
        rotary_interleaved=0,
    )


def _matmul(w: GraphWriter, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
    y = w.node("MatMul", [x, w.const(f"{name}.weight", weight)], f"{name}/matmul" if bias is not None else name)
    return y if bias is None else w.node("Add", [y, w.const(f"{name}.bias", bias.astype(np.float32))], name)


def inv_frequencies(config: dict, head_dim: int) -> np.ndarray:
    """The rotary embedding's inverse frequencies as transformers computes them (float32), for
    the default rope and Llama 3's frequency-dependent scaling."""
    base = np.float32(config.get("rope_theta", 10000.0))
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (base**exponents)).astype(np.float32)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotDerivable(f"rope scaling {kind!r} is not derived (the default and llama3 are)")


def llama_graph(w: GraphWriter, export: ExportWeights, config: dict, shape: Shape) -> None:
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotDerivable("a partial rotary embedding is not derived")
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < shape.context:
        raise NotDerivable(f"a sliding window of {window} tokens, shorter than the context, is not derived")
    if config.get("hidden_act", "silu") != "silu":
        raise NotDerivable(f"activation {config.get('hidden_act')!r} is not derived (silu is)")
    eps = float(config.get("rms_norm_eps", 1e-6))
    seqlens, total = _common_inputs(w, export, shape)
    angles = np.arange(shape.context, dtype=np.float32)[:, None] * inv_frequencies(config, shape.head_dim)[None]
    rotary = (
        w.const("cos_cache", np.cos(angles).astype(np.float32)),
        w.const("sin_cache", np.sin(angles).astype(np.float32)),
    )

    x = w.node(
        "Gather", [w.const("embed_tokens", export.gathered("/model/embed_tokens")), "input_ids"], "embedding", axis=0
    )
    gamma, _, _ = export.norm_weight("/model/layers.0/input_layernorm", shape.hidden)
    h = w.node(
        "SimplifiedLayerNormalization",
        [x, w.const("layers.0.input_norm", gamma)],
        "layers.0/input_norm",
        axis=-1,
        epsilon=eps,
    )
    for i in range(shape.layers):
        p = f"/model/layers.{i}"
        if export.has(f"{p}/self_attn/qkv_proj"):  # phi3 packs them already
            wqkv, bqkv = export.linear(f"{p}/self_attn/qkv_proj")
        else:
            parts = [export.linear(f"{p}/self_attn/{n}_proj") for n in "qkv"]
            wqkv = np.concatenate([wt for wt, _ in parts], axis=1)
            biases = [b for _, b in parts]
            bqkv = (
                None
                if all(b is None for b in biases)
                else np.concatenate(
                    [b if b is not None else np.zeros(wt.shape[1], np.float32) for (wt, _), b in zip(parts, biases)]
                )
            )
        if wqkv.shape[1] != (shape.heads + 2 * shape.kv_heads) * shape.head_dim:
            raise NotDerivable(
                f"layer {i}: the Q, K and V projections are {wqkv.shape[1]} wide, not what the config says"
            )
        qkv = _matmul(w, h, wqkv, bqkv, f"layers.{i}/qkv")
        attn = _attention(w, i, qkv, seqlens, total, shape, rotary)
        wo, bo = export.linear(f"{p}/self_attn/o_proj")
        o = _matmul(w, attn, wo, bo, f"layers.{i}/o_proj")
        gamma, _, _ = export.norm_weight(f"{p}/post_attention_layernorm", shape.hidden)
        h, residual = f"layers.{i}/post_norm", f"layers.{i}/residual1"
        w.node(
            "SkipSimplifiedLayerNormalization",
            [o, x, w.const(f"layers.{i}.post_norm", gamma)],
            [h, "", "", residual],
            domain=MS,
            epsilon=eps,
        )
        if export.has(f"{p}/mlp/gate_up_proj"):  # phi3 packs them: split the weight, not the output
            wgu, bgu = export.linear(f"{p}/mlp/gate_up_proj")
            inner = wgu.shape[1] // 2
            (wg, bg), (wu, bu) = (
                (wgu[:, :inner], None if bgu is None else bgu[:inner]),
                (wgu[:, inner:], None if bgu is None else bgu[inner:]),
            )
        else:
            (wg, bg), (wu, bu) = export.linear(f"{p}/mlp/gate_proj"), export.linear(f"{p}/mlp/up_proj")
        # gate and up as two MatMuls, not one and a Split: the Split copies its [B, T, 2 x MLP]
        # output, which measured 2-3% of a SmolLM-shaped step (genai's builder keeps them apart too)
        gate = _matmul(w, h, np.ascontiguousarray(wg), bg, f"layers.{i}/gate")
        up = _matmul(w, h, np.ascontiguousarray(wu), bu, f"layers.{i}/up")
        silu = w.node("Mul", [gate, w.node("Sigmoid", [gate], f"layers.{i}/sigmoid")], f"layers.{i}/silu")
        act = w.node("Mul", [silu, up], f"layers.{i}/act")
        wd, bd = export.linear(f"{p}/mlp/down_proj")
        down = _matmul(w, act, wd, bd, f"layers.{i}/down")
        last = i == shape.layers - 1
        norm = "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm"
        gamma, _, _ = export.norm_weight(norm, shape.hidden)
        h, x = ("final_norm", "") if last else (f"layers.{i + 1}/input_norm", f"layers.{i}/residual2")
        w.node(
            "SkipSimplifiedLayerNormalization",
            [down, residual, w.const(f"{norm}.weight", gamma)],
            [h, "", "", x],
            domain=MS,
            epsilon=eps,
        )
    head, _ = export.linear("/lm_head")
    w.node("MatMul", [h, w.const("lm_head.weight", head)], "logits")


def gpt2_graph(w: GraphWriter, export: ExportWeights, config: dict, shape: Shape) -> None:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NotDerivable(f"activation {config.get('activation_function')!r} is not derived (gelu_new is)")
    if (
        not config.get("scale_attn_weights", True)
        or config.get("scale_attn_by_inverse_layer_idx")
        or config.get("reorder_and_upcast_attn")
    ):
        raise NotDerivable("GPT-2's attention scaling options other than the default are not derived")
    if "position_ids" not in export.inputs:
        raise NotDerivable("a GPT-2 export without a position_ids input is not derived")
    seqlens, total = _common_inputs(w, export, shape)
    wte = export.gathered("/transformer/wte")
    tokens = w.node("Gather", [w.const("wte", wte), "input_ids"], "tokens", axis=0)
    positions = w.node(
        "Gather", [w.const("wpe", export.gathered("/transformer/wpe")), "position_ids"], "positions", axis=0
    )
    x = w.node("Add", [tokens, positions], "embedding")
    g, b, eps = export.norm_weight("/transformer/h.0/ln_1", shape.hidden)
    h = w.node(
        "LayerNormalization",
        [x, w.const("h.0.ln_1.weight", g), w.const("h.0.ln_1.bias", b)],
        "h.0/ln_1",
        axis=-1,
        epsilon=eps,
    )
    for i in range(shape.layers):
        p = f"/transformer/h.{i}"
        wqkv, bqkv = export.linear(f"{p}/attn/c_attn")
        qkv = _matmul(w, h, wqkv, bqkv, f"h.{i}/c_attn")
        attn = _attention(w, i, qkv, seqlens, total, shape, None)
        wo, bo = export.linear(f"{p}/attn/c_proj")
        o = w.node("MatMul", [attn, w.const(f"h.{i}.attn.c_proj.weight", wo)], f"h.{i}/attn_proj")
        g, b, eps = export.norm_weight(f"{p}/ln_2", shape.hidden)
        h, residual = f"h.{i}/ln_2", f"h.{i}/residual1"
        inputs = [o, x, w.const(f"h.{i}.ln_2.weight", g), w.const(f"h.{i}.ln_2.bias", b)]
        if bo is not None:
            inputs.append(w.const(f"h.{i}.attn.c_proj.bias", bo.astype(np.float32)))
        w.node("SkipLayerNormalization", inputs, [h, "", "", residual], domain=MS, epsilon=eps)
        wfc, bfc = export.linear(f"{p}/mlp/c_fc")
        fc = w.node("MatMul", [h, w.const(f"h.{i}.mlp.c_fc.weight", wfc)], f"h.{i}/c_fc")
        gelu_in = [fc] + ([w.const(f"h.{i}.mlp.c_fc.bias", bfc.astype(np.float32))] if bfc is not None else [])
        act = w.node("FastGelu", gelu_in, f"h.{i}/gelu", domain=MS)
        wp, bp = export.linear(f"{p}/mlp/c_proj")
        down = w.node("MatMul", [act, w.const(f"h.{i}.mlp.c_proj.weight", wp)], f"h.{i}/mlp_proj")
        last = i == shape.layers - 1
        norm = "/transformer/ln_f" if last else f"/transformer/h.{i + 1}/ln_1"
        g, b, eps = export.norm_weight(norm, shape.hidden)
        h, x = ("ln_f", "") if last else (f"h.{i + 1}/ln_1", f"h.{i}/residual2")
        inputs = [down, residual, w.const(f"{norm}.weight", g), w.const(f"{norm}.bias", b)]
        if bp is not None:
            inputs.append(w.const(f"h.{i}.mlp.c_proj.bias", bp.astype(np.float32)))
        w.node("SkipLayerNormalization", inputs, [h, "", "", x], domain=MS, epsilon=eps)
    head = export.linear("/lm_head", required=False)
    w.node("MatMul", [h, w.const("lm_head.weight", head[0] if head else wte.T)], "logits")


def shape_of(config: dict, family: str) -> Shape:
    if family == "gpt2":
        hidden, heads = config["n_embd"], config["n_head"]
        return Shape(
            config["n_layer"], hidden, heads, heads, hidden // heads, config["vocab_size"], config["n_positions"]
        )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return Shape(
        layers=config["num_hidden_layers"],
        hidden=hidden,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        vocab=config["vocab_size"],
        context=config["max_position_embeddings"],
    )


def derive(model_file: Path, config: dict, out_dir: Path) -> Path:
    """Write the fused graph of the export `model_file` (its config.json read as `config`)
    into `out_dir`; returns the graph's path. Raises NotDerivable with the reason."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise NotDerivable(
            f"model_type {family!r} is not a family tserve derives a fused graph for ({', '.join(sorted(FAMILIES))})"
        )
    shape = shape_of(config, family)
    if shape.head_dim % 16:
        raise NotDerivable(
            f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16, not {shape.head_dim}"
        )
    export = ExportWeights(model_file)
    if not {f"past_key_values.{i}.key" for i in range(shape.layers)} <= export.inputs:
        raise NotDerivable("the export has no past_key_values inputs (export with --task text-generation-with-past)")
    writer = GraphWriter(out_dir / WEIGHTS_FILE)
    try:
        (gpt2_graph if family == "gpt2" else llama_graph)(writer, export, config, shape)
        writer.save(out_dir / GRAPH_FILE)
    finally:
        writer.close()
    return out_dir / GRAPH_FILE


def checksum(*files: Path) -> str:
    h = hashlib.sha256(f"tserve-derived-graph-{DERIVATION_VERSION}".encode())
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:32]


def cached_derivation(model_file: Path, cache_dir: Path) -> Path:
    """The fused graph of an export, from the cache if it holds one for this export's checksum
    (model.onnx and config.json), else derived and stored there (written to a temporary folder
    and renamed, so a crash or a concurrent load never leaves half a graph). Raises
    NotDerivable; an unwritable cache directory raises OSError."""
    config_file = model_file.parent / "config.json"
    if not config_file.exists():
        raise NotDerivable("the export has no config.json to read its family and shape from")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in FAMILIES:
        raise NotDerivable(
            f"model_type {config.get('model_type')!r} is not a family tserve derives a fused graph for "
            f"({', '.join(sorted(FAMILIES))})"
        )
    target = cache_dir / "derived" / checksum(model_file, config_file)
    if (target / GRAPH_FILE).exists():
        log.info("fused generation graph for %s from the cache (%s)", model_file, target)
        return target / GRAPH_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".deriving-", dir=target.parent))
    try:
        derive(model_file, config, work)
        try:
            os.rename(work, target)
        except OSError:  # another process stored it first: theirs is the same graph
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("fused generation graph for %s derived into %s", model_file, target)
    return target / GRAPH_FILE
