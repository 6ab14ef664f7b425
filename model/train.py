"""Train the GPT: `python -m model.train --out runs/default`.

A byte-level BPE is trained on the training split first (`--bpe-vocab 0`: plain bytes), then
random windows of the tokenized training stream, AdamW with warm-up and cosine decay (over
steps or minutes, whichever runs out first), bf16 autocast (on by default: 1.9x here, on a CPU
with AVX512-BF16; `--no-bf16` where the CPU lacks it), periodic
validation in bits per byte, and a checkpoint (config, tokenizer, weights, optimizer state,
metrics) after every validation, so a run can be resumed with --resume. At the end the same
validation text is scored by a smoothed byte n-gram baseline and both figures are stored in
the checkpoint's metrics.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data import load_documents, tokenize
from model.evaluate import model_bpb, ngram_bpb
from model.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, from_checkpoint
from model.transformer import GPT, GPTConfig


@dataclass
class TrainConfig:
    out: str = "runs/default"
    data: list[str] = field(default_factory=list)  # empty: the standard library's source
    seed: int = 0
    bpe_vocab: int = 4096  # 0: the byte tokenizer
    batch_size: int = 32
    max_steps: int = 1400
    max_minutes: float = 40.0  # hard stop, so the default trains within the 45-minute budget
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True  # autocast matmuls to bfloat16 (2x on a CPU with AVX512-BF16); weights stay fp32
    eval_interval: int = 200
    eval_bytes: int = 131_072  # periodic validation
    final_eval_bytes: int = 524_288  # final figure, the same text for the n-gram baseline
    ngram_order: int = 4
    max_corpus_bytes: int | None = None
    threads: int = 0  # 0: torch's default


def lr_at(step: int, tc: TrainConfig, minutes: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio over the steps or the minutes,
    whichever is further along: a run cut by its time budget still ends annealed."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(
        1.0, max((step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps), minutes / tc.max_minutes)
    )
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(tokens: np.ndarray, step: int, tc: TrainConfig, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for a step depends only on (seed, step): resuming replays the same data."""
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=tc.batch_size)
    idx = starts[:, None] + np.arange(block_size + 1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def save(
    path: Path, model: GPT, opt: torch.optim.Optimizer, step: int, tc: TrainConfig, metrics: dict, tokenizer: Tokenizer
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": model.cfg.to_dict(),
            "tokenizer": tokenizer.to_str(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "train_config": asdict(tc),
            "metrics": metrics,
        },
        tmp,
    )
    tmp.replace(path)  # never leave a half-written checkpoint behind


def train(tc: TrainConfig, mc: GPTConfig, resume: bool = False) -> dict:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    docs = load_documents([Path(p) for p in tc.data] or None, seed=tc.seed, max_bytes=tc.max_corpus_bytes)
    ckpt_path = Path(tc.out) / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False) if resume and ckpt_path.exists() else None

    if ckpt is not None:
        tokenizer = from_checkpoint(ckpt)
    elif tc.bpe_vocab:
        t0 = time.monotonic()
        tokenizer = BPETokenizer.train(docs.train, tc.bpe_vocab)
        print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size:,} ids, trained in {time.monotonic() - t0:.1f} s")
    else:
        tokenizer = ByteTokenizer()
    train_tokens = tokenize(docs.train, tokenizer)
    mc = replace(mc, vocab_size=tokenizer.vocab_size)

    model = GPT(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    step = 0
    metrics: dict = {"val_history": [], "train_seconds": 0.0, "tokens_seen": 0}
    if ckpt is not None:
        model = GPT(GPTConfig(**ckpt["config"]))
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, metrics = ckpt["step"], ckpt["metrics"]
        print(f"resumed from {ckpt_path} at step {step}")
    mc = model.cfg
    train_bytes = int(tokenizer.token_bytes()[train_tokens].sum())
    print(
        f"corpus: {len(train_tokens):,} train tokens ({len(docs.train)} files, "
        f"{train_bytes / len(train_tokens):.2f} bytes/token), {len(docs.val)} validation files; "
        f"model: {model.num_parameters():,} parameters"
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16)

    model.train()
    deadline = time.monotonic() + tc.max_minutes * 60 - metrics["train_seconds"]
    started = time.monotonic() - metrics["train_seconds"]
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True)
    loss_ema = None
    while step < tc.max_steps and time.monotonic() < deadline:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc, (time.monotonic() - started) / 60)
        x, y = batch_at(train_tokens, step, tc, mc.block_size)
        with autocast:
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        metrics["tokens_seen"] += x.numel()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{x.numel() / (time.perf_counter() - t0):,.0f}")
        if step % tc.eval_interval == 0 or step == tc.max_steps:
            bpb = model_bpb(model, tokenizer, docs.val, tc.eval_bytes)
            metrics["val_history"].append({"step": step, "val_bpb": round(bpb, 4)})
            metrics["train_seconds"] = time.monotonic() - started
            bar.write(f"step {step}: train loss {loss_ema:.3f}, val {bpb:.3f} bits/byte")
            save(ckpt_path, model, opt, step, tc, metrics, tokenizer)
    bar.close()
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    metrics["steps"] = step

    print(f"scoring {tc.final_eval_bytes:,} validation bytes with the model and a {tc.ngram_order}-gram baseline")
    metrics["val_bpb"] = round(model_bpb(model, tokenizer, docs.val, tc.final_eval_bytes), 4)
    metrics["ngram_order"] = tc.ngram_order
    metrics["ngram_val_bpb"] = round(ngram_bpb(docs.train, docs.val, tc.final_eval_bytes, tc.ngram_order), 4)
    metrics["eval_bytes"] = tc.final_eval_bytes
    save(ckpt_path, model, opt, step, tc, metrics, tokenizer)
    print(
        f"done: {step} steps in {metrics['train_seconds'] / 60:.1f} min; validation {metrics['val_bpb']} bits/byte "
        f"vs {tc.ngram_order}-gram {metrics['ngram_val_bpb']} bits/byte; checkpoint {ckpt_path}"
    )
    return metrics


def parse_config_flags(doc: str, configs: tuple, argv: list[str] | None) -> tuple:
    """A flag per field of each config dataclass (--max-steps for max_steps), plus --resume;
    returns the configs filled from the flags, then resume."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cfg in configs:
        for name, value in asdict(cfg()).items():
            flag = "--" + name.replace("_", "-")
            if name == "data":
                p.add_argument(flag, nargs="*", default=[], help="files or folders (default: the stdlib)")
            elif isinstance(value, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            elif value is None:
                p.add_argument(flag, type=int, default=None)
            else:
                p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ns = vars(p.parse_args(argv))
    return (*(cfg(**{k: ns[k] for k in asdict(cfg())}) for cfg in configs), ns["resume"])


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, GPTConfig, bool]:
    return parse_config_flags(__doc__, (TrainConfig, GPTConfig), argv)


def main(argv: list[str] | None = None) -> None:
    tc, mc, resume = parse_args(argv)
    train(tc, mc, resume)


if __name__ == "__main__":
    main()
