"""The Llamas the generation benchmarks run, built from a config after seed 0 and exported.

    python -m bench.llama_models --out runs/llama        (bench/genai_bench.py calls build())
    python -m bench.llama_models --shape smol --out runs/smol   (bench/structured_bench.py)

The tiny one (4 M parameters, a decode step under a millisecond) measures per-call overhead;
`smol` is shaped like SmolLM-135M (hidden 576, MLP 1536, 30 layers, 9 heads, 3 KV heads,
vocabulary 8,192 with a byte-level BPE trained on the Python standard library; ~111 M
parameters, random weights, fp32), what measuring serving needs. Optimum export only.

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


SMOL = dict(
    vocab_size=8192,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def stdlib_files(limit: int = 400) -> list[str]:
    import sysconfig

    return [str(p) for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]]


def build_source(out: Path, config: dict = CONFIG, texts: list[str] | None = None) -> Path:
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
        texts or [str(p) for p in sorted((ROOT / "model").glob("*.py"))],
        trainers.BpeTrainer(
            vocab_size=config["vocab_size"],
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    llama = LlamaConfig(**config, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(llama).eval().save_pretrained(source)
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


def build_smol(out: Path) -> tuple[Path, Path]:
    """(transformers source, Optimum export) of the SmolLM-135M-shaped Llama, each built once."""
    out.mkdir(parents=True, exist_ok=True)
    source = build_source(out, SMOL, stdlib_files())
    return source, export_optimum(source, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "smol"], default="tiny")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.shape == "smol":
        print(*build_smol(args.out or ROOT / "runs" / "smol"), sep="\n")
    else:
        print(*build(args.out or ROOT / "runs" / "llama"), sep="\n")
