"""Training tokens/s on this machine, before choosing a recipe: one optimizer step (forward,
backward, AdamW) on a random batch, fp32 against bf16 autocast, for a few model shapes.

    python -m model.throughput [--steps 6]

Prints the median over the steps after two warm-up steps; bytes/s is tokens/s times the
tokenizer's bytes per token (1 for bytes; 3.37 measured for the 4,096-id BPE on the stdlib).
"""

from __future__ import annotations

import argparse
import time

import torch

from model.transformer import GPT, GPTConfig

SHAPES = [  # (vocab, d_model, n_layer, d_ff, bytes per token)
    (257, 192, 4, 768, 1.0),
    (4096, 192, 4, 768, 3.37),
    (4096, 256, 4, 1024, 3.37),
]


def tokens_per_s(cfg: GPTConfig, batch: int, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    median = sorted(times[2:])[len(times[2:]) // 2]
    return batch * cfg.block_size / median


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=256)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.block_size}")
    for vocab, d, layers, ff, bpt in SHAPES:
        cfg = GPTConfig(vocab_size=vocab, block_size=args.block_size, n_layer=layers, n_head=4, d_model=d, d_ff=ff)
        fp32 = tokens_per_s(cfg, args.batch_size, False, args.steps)
        bf16 = tokens_per_s(cfg, args.batch_size, True, args.steps)
        params = sum(p.numel() for p in GPT(cfg).parameters()) / 1e6
        print(
            f"vocab {vocab:>5}, d_model {d}, {layers} layers ({params:.2f} M): fp32 {fp32:>7,.0f} tokens/s, "
            f"bf16 {bf16:>7,.0f} tokens/s ({bf16 / fp32:.2f}x), bf16 {bf16 * bpt:>7,.0f} bytes/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
