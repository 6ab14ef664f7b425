"""Checkpoint -> verified, optimized and quantized repository entries.

    python -m export --checkpoint runs/default/checkpoint.pt --repository model_repository

Writes <name> (fp32) and <name>_int8 (dynamic int8), each with config.pbtxt, one graph
(model.onnx: the fused graph of export/gqa_graph.py, GroupQueryAttention over a KV buffer that
past and present share, serving ModelInfer and generation alike), tokenizer.json and a manifest
carrying the tokenizer, training metrics, parity (against PyTorch, beside the traced graph's)
and speed reports, sha256 and golden inputs/outputs the server checks itself against at load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import ONNX_OPSET, export_onnx
from export.gqa_graph import export_gqa, verify_gqa
from export.optimize import fusion_report, quantize_int8, speed_ratios
from export.repository import decoder_config_pbtxt, golden_record, write_entry
from export.verify import cpu_session, decoder_feeds, empty_past, verify
from model.data import eval_span, load_documents
from model.evaluate import bits_per_byte, scored, sliding_nll
from model.tokenizer import Tokenizer, from_checkpoint
from model.transformer import GPT, load_checkpoint

SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]


def onnx_logits_fn(session: ort.InferenceSession, model: GPT):
    def fn(x: np.ndarray) -> np.ndarray:
        B, T = x.shape
        mask = np.ones((B, T), np.int64)
        pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
        return session.run(["logits"], decoder_feeds(model.cfg.n_layer, x, mask, pos, empty_past(model, B)))[0]

    return fn


def onnx_bpb(session: ort.InferenceSession, model: GPT, tokens: np.ndarray, n_bytes: int) -> float:
    return round(bits_per_byte(sliding_nll(onnx_logits_fn(session, model), tokens, model.cfg.block_size), n_bytes), 4)


def golden_feeds(model: GPT, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    ids = np.array([tokenizer.encode(SAMPLE_PROMPTS[0])], np.int64)
    T = ids.shape[1]
    return decoder_feeds(
        model.cfg.n_layer, ids, np.ones((1, T), np.int64), np.arange(T, dtype=np.int64)[None], empty_past(model, 1)
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default/checkpoint.pt"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", default="bytegpt")
    p.add_argument("--eval-bytes", type=int, default=65_536, help="validation bytes scored in ONNX Runtime")
    p.add_argument("--skip-int8", action="store_true")
    p.add_argument(
        "--checkpoint-copy",
        type=Path,
        default=Path("model/checkpoints/bytegpt.pt"),
        help="where to keep the weights-only checkpoint the parity tests compare against",
    )
    args = p.parse_args(argv)

    model, ckpt = load_checkpoint(str(args.checkpoint))
    tokenizer = from_checkpoint(ckpt)
    prompts = [tokenizer.encode(s) for s in SAMPLE_PROMPTS]
    tc = ckpt.get("train_config", {})
    docs = load_documents(
        [Path(d) for d in tc.get("data", [])] or None, seed=tc.get("seed", 0), max_bytes=tc.get("max_corpus_bytes")
    )
    val, val_bytes = scored(eval_span(docs.val, args.eval_bytes), tokenizer)
    shipped = {} if tokenizer.to_str() is None else {"tokenizer.json": tokenizer.to_str()}

    with tempfile.TemporaryDirectory() as tmp:
        # the traced graph: torch.onnx's export of model/transformer.py, the reference the fused
        # graph is written beside and checked against; neither ships it
        traced = export_onnx(model, Path(tmp) / "traced.onnx")
        print(f"exported the traced graph {traced.stat().st_size / 1e6:.2f} MB, opset {ONNX_OPSET}")
        parity = verify(model, traced, prompts)
        print(
            f"traced parity: max |logits diff| {parity['max_abs_logits_diff']:.2e}, "
            f"greedy 64 tokens equal alone {parity['greedy_equal_alone']}, batched {parity['greedy_equal_batched']}"
        )
        fusions = fusion_report(traced)
        print(f"ONNX Runtime fusions of the traced graph: {fusions}")
        # the shipped graph: GroupQueryAttention over a shared KV buffer, for ModelInfer and
        # generation alike (export/gqa_graph.py)
        fp32 = export_gqa(model, Path(tmp) / "fp32.onnx")
        fused_parity = verify_gqa(model, fp32, prompts)
        print(
            f"model.onnx (fused): max |logits diff| {fused_parity['max_abs_logits_diff']:.2e}, "
            f"greedy {fused_parity['greedy_tokens']} tokens equal alone {fused_parity['greedy_equal_alone']}"
        )
        # from the untied graph: the output projection an initializer, so it is quantized too
        int8 = (
            None
            if args.skip_int8
            else quantize_int8(export_gqa(model, Path(tmp) / "untied.onnx", tied=False), Path(tmp) / "int8.onnx")
        )
        speed = speed_ratios(fp32, int8, model.cfg.vocab_size)
        print(f"speed: {speed}")

        fp32_session = cpu_session(fp32)
        fp32_bpb = onnx_bpb(fp32_session, model, val, val_bytes)
        samples = {
            s: tokenizer.decode(model.generate(ids, 96, temperature=0.7, top_k=40, seed=0))
            for s, ids in zip(SAMPLE_PROMPTS, prompts)
        }
        common = {
            "architecture": "decoder-with-past",
            "tokenizer": tokenizer.manifest_entry(),
            # model.onnx reads each row's length from its attention mask (right-padded rows):
            # the generation engine keeps its cache in one buffer shared by past and present
            "generation": {"max_context": model.cfg.block_size, "eos_token_id": tokenizer.eot_id, "shared_kv": True},
            "model_config": model.cfg.to_dict(),
            "parameters": model.num_parameters(),
            "training": {"config": tc, "metrics": ckpt.get("metrics", {})},
            "export": {
                "opset": ONNX_OPSET,
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "graph": "fused (export/gqa_graph.py: GroupQueryAttention, tied embedding)",
                "parity": fused_parity,
                "traced_parity": parity,
                "traced_fusions": fusions,
                "speed": speed,
            },
            "samples": {"temperature": 0.7, "top_k": 40, "seed": 0, "completions": samples},
        }
        feeds = golden_feeds(model, tokenizer)
        scope = {"tokens": len(val), "bytes": val_bytes}
        entry = write_entry(
            args.repository,
            args.name,
            fp32,
            decoder_config_pbtxt(args.name, model.cfg, tokenizer.eot_id),
            {
                **common,
                "validation": {"onnx_bits_per_byte": fp32_bpb, **scope},
                "golden": [golden_record(fp32_session, feeds, atol=1e-3)],
            },
            extra_files=shipped,
        )
        print(f"wrote {entry}: ONNX validation {fp32_bpb} bits/byte on {val_bytes:,} bytes")
        if int8 is not None:
            int8_session = cpu_session(int8)
            int8_bpb = onnx_bpb(int8_session, model, val, val_bytes)
            name = f"{args.name}_int8"
            entry = write_entry(
                args.repository,
                name,
                int8,
                decoder_config_pbtxt(name, model.cfg, tokenizer.eot_id),
                {
                    **common,
                    "quantization": {
                        "method": "dynamic",
                        "weight_type": "int8",
                        "quantized": ["MatMul", "Gather"],
                        "bytes": int8.stat().st_size,
                        "fp32_bytes": fp32.stat().st_size,
                    },
                    "validation": {
                        "onnx_bits_per_byte": int8_bpb,
                        "fp32_onnx_bits_per_byte": fp32_bpb,
                        "int8_over_fp32": round(int8_bpb / fp32_bpb, 4),
                        **scope,
                    },
                    "golden": [golden_record(int8_session, feeds, atol=5e-2)],
                },
                extra_files=shipped,
            )
            print(
                f"wrote {entry}: int8 {int8.stat().st_size / 1e6:.2f} MB, validation {int8_bpb} bits/byte "
                f"(fp32 {fp32_bpb}, ratio {int8_bpb / fp32_bpb:.4f}) on {val_bytes:,} bytes"
            )
    slim = {k: ckpt[k] for k in ("config", "tokenizer", "model", "step", "train_config", "metrics") if k in ckpt}
    args.checkpoint_copy.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, args.checkpoint_copy)  # no optimizer state: a third of the size
    for s, text in samples.items():
        print(f"--- {s!r}\n{s}{text}")
    print(
        json.dumps(
            {
                "val_bpb": ckpt.get("metrics", {}).get("val_bpb"),
                "ngram_val_bpb": ckpt.get("metrics", {}).get("ngram_val_bpb"),
            }
        )
    )


if __name__ == "__main__":
    main()
