"""Train the byte-level GPT: `python -m model.train --out runs/default`.

Random windows of the training stream, AdamW with warm-up and cosine decay, periodic
validation in bits per byte, and a checkpoint (config, weights, optimizer state, metrics)
after every validation, so a run can be resumed with --resume. At the end the same
validation tokens are scored by a smoothed byte n-gram baseline and both figures are
stored in the checkpoint's metrics.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data import load_corpus
from model.evaluate import model_bpb, ngram_bpb
from model.transformer import GPT, GPTConfig


@dataclass
class TrainConfig:
    out: str = "runs/default"
    data: list[str] = field(default_factory=list)  # empty: the standard library's source
    seed: int = 0
    batch_size: int = 32
    max_steps: int = 1400
    max_minutes: float = 40.0  # hard stop, so the default trains within the 45-minute budget
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_tokens: int = 65_536  # periodic validation
    final_eval_tokens: int = 524_288  # final figure, shared with the n-gram baseline
    ngram_order: int = 4
    max_corpus_bytes: int | None = None
    threads: int = 0  # 0: torch's default


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(tokens: np.ndarray, step: int, tc: TrainConfig, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for a step depends only on (seed, step): resuming replays the same data."""
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=tc.batch_size)
    idx = starts[:, None] + np.arange(block_size + 1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def save(path: Path, model: GPT, opt: torch.optim.Optimizer, step: int, tc: TrainConfig, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": model.cfg.to_dict(),
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
    corpus = load_corpus([Path(p) for p in tc.data] or None, seed=tc.seed, max_bytes=tc.max_corpus_bytes)
    ckpt_path = Path(tc.out) / "checkpoint.pt"

    model = GPT(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    step = 0
    metrics: dict = {"val_history": [], "train_seconds": 0.0, "tokens_seen": 0}
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model = GPT(GPTConfig(**ckpt["config"]))
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, metrics = ckpt["step"], ckpt["metrics"]
        print(f"resumed from {ckpt_path} at step {step}")
    mc = model.cfg
    print(
        f"corpus: {len(corpus.train):,} train tokens ({corpus.n_train_files} files), "
        f"{len(corpus.val):,} validation tokens ({corpus.n_val_files} files); "
        f"model: {model.num_parameters():,} parameters"
    )

    model.train()
    deadline = time.monotonic() + tc.max_minutes * 60 - metrics["train_seconds"]
    started = time.monotonic() - metrics["train_seconds"]
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True)
    loss_ema = None
    while step < tc.max_steps and time.monotonic() < deadline:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x, y = batch_at(corpus.train, step, tc, mc.block_size)
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
            bpb = model_bpb(model, corpus.val, tc.eval_tokens)
            metrics["val_history"].append({"step": step, "val_bpb": round(bpb, 4)})
            metrics["train_seconds"] = time.monotonic() - started
            bar.write(f"step {step}: train loss {loss_ema:.3f}, val {bpb:.3f} bits/byte")
            save(ckpt_path, model, opt, step, tc, metrics)
    bar.close()
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    metrics["steps"] = step

    print(f"scoring {tc.final_eval_tokens:,} validation tokens with the model and a {tc.ngram_order}-gram baseline")
    metrics["val_bpb"] = round(model_bpb(model, corpus.val, tc.final_eval_tokens), 4)
    metrics["ngram_order"] = tc.ngram_order
    metrics["ngram_val_bpb"] = round(
        ngram_bpb(corpus.train, corpus.val, tc.final_eval_tokens, tc.ngram_order, mc.vocab_size), 4
    )
    metrics["eval_tokens"] = int(min(tc.final_eval_tokens, len(corpus.val)))
    save(ckpt_path, model, opt, step, tc, metrics)
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
