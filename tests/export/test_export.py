import json

import numpy as np
import onnx
import pytest
import torch

from export.gqa_graph import verify_gqa
from export.optimize import op_counts
from export.repository import sha256
from export.verify import cpu_session, logits_max_abs_diff, parity_cases, verify
from model.tokenizer import from_checkpoint
from service.generation.tokenizer import HFTokenizer
from model.transformer import load_checkpoint
from tests.conftest import DEFAULT_CHECKPOINT, DEFAULT_REPOSITORY

TEXTS = ["def fibonacci(n):", "import os\n", "class Stack:"]


def prompts(ckpt: dict) -> list[list[int]]:
    tokenizer = from_checkpoint(ckpt)
    return [tokenizer.encode(s) for s in TEXTS]


def golden_reproduces(entry_version_dir) -> None:
    manifest = json.loads((entry_version_dir / "manifest.json").read_text())
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256(entry_version_dir / name)
    session = cpu_session(entry_version_dir / "model.onnx")
    for golden in manifest["golden"]:
        feeds = {
            k: np.array(v["data"], {"INT64": np.int64, "FP32": np.float32}[v["datatype"]]).reshape(v["shape"])
            for k, v in golden["inputs"].items()
        }
        expected = golden["outputs"]["logits"]
        got = session.run(["logits"], feeds)[0]
        if golden.get("positions") == "last":  # the record keeps the last position's logits
            got = got[:, -1:]
        assert list(got.shape) == expected["shape"]
        np.testing.assert_allclose(got.ravel(), expected["data"], atol=golden["atol"])


def test_tiny_export_matches_pytorch(tiny_repository):
    """The shipped graph (export/gqa_graph.py: GroupQueryAttention, one graph for ModelInfer and
    generation) gives PyTorch's logits and greedy tokens; so did the traced graph it was written
    beside, as the manifest records."""
    model, ckpt = load_checkpoint(str(tiny_repository.parent / "tiny.pt"))
    model_onnx = tiny_repository / "bytegpt" / "1" / "model.onnx"
    report = verify_gqa(model, model_onnx, prompts(ckpt))
    assert report["max_abs_logits_diff"] <= 1e-4 and report["greedy_equal_alone"]
    assert op_counts(model_onnx)["GroupQueryAttention"] == model.cfg.n_layer
    for name in ("bytegpt", "bytegpt_int8"):
        version = tiny_repository / name / "1"
        manifest = json.loads((version / "manifest.json").read_text())
        assert manifest["generation"]["shared_kv"] is True
        assert sorted(manifest["files"]) == ["model.onnx", "tokenizer.json"]  # one graph
        traced = manifest["export"]["traced_parity"]
        assert traced["max_abs_logits_diff"] <= 1e-4 and traced["greedy_equal_batched"]
        assert "real_prompts_left_padded" in traced["cases"]


def test_the_traced_graph_keeps_left_padded_rows_finite(traced_bytegpt):
    """torch.onnx's graph of the shipped weights (the export's reference, not shipped): PyTorch's
    logits on every case, left-padded rows included (inf when any logit is NaN)."""
    model, ckpt = load_checkpoint(str(DEFAULT_CHECKPOINT))
    report = verify(model, traced_bytegpt, prompts(ckpt))
    assert report["max_abs_logits_diff"] <= 1e-4
    assert report["greedy_equal_alone"] and report["greedy_equal_batched"]
    session = cpu_session(traced_bytegpt)
    case = next(c for c in parity_cases(model, prompts(ckpt)) if c.name == "real_prompts_left_padded")
    assert case.attention_mask.min() == 0, "the case must contain padding"
    assert logits_max_abs_diff(model, session, case) <= 1e-4


def test_repository_entries_are_complete(tiny_repository):
    for name in ("bytegpt", "bytegpt_int8"):
        version = tiny_repository / name / "1"
        assert (tiny_repository / name / "config.pbtxt").read_text().startswith(f'name: "{name}"')
        golden_reproduces(version)
        manifest = json.loads((version / "manifest.json").read_text())
        assert manifest["architecture"] == "decoder-with-past"
        # the BPE ships as tokenizer.json, read by the server as any Hugging Face export's is
        assert manifest["tokenizer"]["type"] == "tokenizer.json" and "tokenizer.json" in manifest["files"]
        tokenizer = from_checkpoint(torch.load(tiny_repository.parent / "tiny.pt", weights_only=False))
        served = HFTokenizer(version / "tokenizer.json")
        assert served.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
        assert manifest["generation"]["eos_token_id"] == tokenizer.eot_id
    fp32 = tiny_repository / "bytegpt" / "1" / "model.onnx"
    int8 = tiny_repository / "bytegpt_int8" / "1" / "model.onnx"
    assert int8.stat().st_size < fp32.stat().st_size
    assert op_counts(int8)["MatMulInteger"] > 0
    # the embedding table is 8-bit too (ONNX Runtime stores a Gather's table as uint8): no float
    # matrix is left in the int8 graph
    weights = [i for i in onnx.load(str(int8)).graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for i in weights)
    # dynamic axes survive: batch, sequence and past are symbolic
    graph = onnx.load(str(fp32)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)
    assert isinstance(dims["past_key_values.0.key"][2], str)


def test_committed_default_matches_pytorch():
    assert DEFAULT_CHECKPOINT.exists() and (DEFAULT_REPOSITORY / "bytegpt" / "1" / "model.onnx").exists()
    model, ckpt = load_checkpoint(str(DEFAULT_CHECKPOINT))
    fused = verify_gqa(model, DEFAULT_REPOSITORY / "bytegpt" / "1" / "model.onnx", prompts(ckpt))
    assert fused["max_abs_logits_diff"] <= 1e-4 and fused["greedy_equal_alone"]
    for name in ("bytegpt", "bytegpt_int8"):
        golden_reproduces(DEFAULT_REPOSITORY / name / "1")


def test_committed_default_meets_its_figures():
    """What the shipped entries claim: at most 1.45 bits per byte on the validation text, well
    under the n-gram's, from the 45-minute budget; int8 within 2% of fp32."""
    manifest = json.loads((DEFAULT_REPOSITORY / "bytegpt" / "1" / "manifest.json").read_text())
    metrics = manifest["training"]["metrics"]
    assert metrics["val_bpb"] <= 1.45 and metrics["val_bpb"] < metrics["ngram_val_bpb"] - 0.1
    assert metrics["train_seconds"] <= 45 * 60
    int8 = json.loads((DEFAULT_REPOSITORY / "bytegpt_int8" / "1" / "manifest.json").read_text())["validation"]
    assert int8["onnx_bits_per_byte"] <= 1.02 * int8["fp32_onnx_bits_per_byte"]


def test_the_shipped_repository_stays_lean():
    """One graph per shipped model: the repository stays within 25 MB."""
    size = sum(f.stat().st_size for f in DEFAULT_REPOSITORY.rglob("*") if f.is_file())
    assert size <= 25_000_000, f"model_repository/ holds {size / 1e6:.1f} MB"


@pytest.mark.parametrize("name", ["bytegpt", "bytegpt_int8"])
def test_committed_models_are_small(name):
    size = (DEFAULT_REPOSITORY / name / "1" / "model.onnx").stat().st_size
    assert size < 12_000_000  # 2.6 M fp32 parameters, a quarter of them the 4,096-id embedding
