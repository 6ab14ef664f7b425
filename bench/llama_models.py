"""The tiny Llama the generation-peer benchmark runs, built from a config and exported twice.

    python -m bench.llama_models --out runs/llama        (bench/genai_bench.py calls build())

    source/    LlamaForCausalLM (hidden 256, 4 layers, 4 heads, vocabulary 512) after seed 0, with
               a byte-level BPE trained on this repository's model/*.py (no Hub anywhere)
    optimum/   `optimum-cli export onnx --task text-generation-with-past`: what tserve serves
    genai/     onnxruntime-genai's model builder (GroupQueryAttention graph + genai_config.json),
               run in .venv-genai: the builder needs transformers 5.x and onnx_ir, while
               optimum-onnx pins transformers < 4.58, so the two cannot share one environment

`intermediate_size` is 688, not 512: the builder mis-wires the language-model head when the MLP
width equals the vocabulary size; genai_bench checks its tokens against transformers anyway.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENAI_PYTHON = ROOT / ".venv-genai" / "bin" / "python"
CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)


def build_source(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    source = out / "source"
    if (source / "config.json").exists():
        return source
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(
        [str(p) for p in sorted((ROOT / "model").glob("*.py"))],
        trainers.BpeTrainer(
            vocab_size=CONFIG["vocab_size"],
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(source)
    fast.save_pretrained(source)
    return source


def export_optimum(source: Path, out: Path) -> Path:
    target = out / "optimum"
    if not (target / "model.onnx").exists():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "optimum.commands.optimum_cli",
                "export",
                "onnx",
                "--model",
                str(source),
                "--task",
                "text-generation-with-past",
                str(target),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return target


def export_genai(source: Path, out: Path) -> Path:
    target = out / "genai"
    if not (target / "genai_config.json").exists():
        if not GENAI_PYTHON.exists():
            raise SystemExit(f"{GENAI_PYTHON} is missing: `make bench-genai` creates it")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [
                str(GENAI_PYTHON),
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(source),
                "-o",
                str(target),
                "-p",
                "fp32",
                "-e",
                "cpu",
                "-c",
                str(out / "genai-cache"),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return target


def build(out: Path) -> tuple[Path, Path, Path]:
    """(transformers source, Optimum export, genai export), each built once."""
    out.mkdir(parents=True, exist_ok=True)
    source = build_source(out)
    return source, export_optimum(source, out), export_genai(source, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "llama")
    print(*build(p.parse_args().out), sep="\n")
