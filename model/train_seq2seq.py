"""Train the encoder-decoder to name Python functions: `python -m model.train_seq2seq --out runs/naming`.

Batches of (masked function, name) pairs from the training files, teacher forcing, AdamW with
warm-up and cosine decay (model/train.py's schedule), and every `eval_interval` steps the
held-out loss and greedy exact match on a fixed sample of held-out functions, with a checkpoint
(`--resume` continues it). At the end, greedy names for every held-out function are scored
against the baselines of model/naming.py, and both go in the checkpoint's metrics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.naming import Example, baselines, load_examples, score
from model.seq2seq import BOS_ID, EOS_ID, PAD_ID, Seq2Seq, Seq2SeqConfig
from model.tokenizer import BPETokenizer, ByteTokenizer
from model.train import lr_at, parse_config_flags

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # a BPE's ids 0, 1, 2: pad, decoder start, end


@dataclass
class TrainConfig:
    out: str = "runs/naming"
    data: list[str] = field(default_factory=list)  # empty: the standard library's source
    seed: int = 0
    batch_size: int = 48
    max_steps: int = 6000
    max_minutes: float = 40.0  # hard stop inside the 45-minute budget; the cosine ends with it
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bpe_vocab: int = 2048  # 0: bytes; else a byte-level BPE trained on the training functions
    bf16: bool = True  # autocast matmuls to bfloat16; weights stay fp32
    eval_interval: int = 500
    eval_examples: int = 200  # greedy exact match during training, on a fixed held-out sample
    threads: int = 0


class NamingTokenizer:
    """Text <-> ids for sources and names: UTF-8 bytes with the special ids after them, or a
    byte-level BPE with them first (shipped as tokenizer.json)."""

    def __init__(self, bpe: BPETokenizer | None = None) -> None:
        self.bpe = bpe
        if bpe is None:
            self.pad_id, self.bos_id, self.eos_id, self.vocab_size = PAD_ID, BOS_ID, EOS_ID, 259
        else:
            self.pad_id, self.bos_id, self.eos_id = (bpe.token_id(t) for t in SPECIAL_TOKENS)
            self.vocab_size = bpe.vocab_size

    @classmethod
    def train(cls, examples: list[Example], vocab_size: int) -> NamingTokenizer:
        texts = [t for e in examples for t in (e.source, e.name)]
        return cls(BPETokenizer.train(texts, vocab_size, SPECIAL_TOKENS))

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> NamingTokenizer:
        text = ckpt.get("tokenizer")
        return cls(BPETokenizer.from_str(text) if text else None)

    def to_str(self) -> str | None:
        return None if self.bpe is None else self.bpe.to_str()

    def encode(self, text: str) -> list[int]:
        return (self.bpe or ByteTokenizer()).encode(text)

    def decode(self, ids: list[int]) -> str:
        return (self.bpe or ByteTokenizer()).decode(ids)  # special ids produce no text either way

    def config(self, mc: Seq2SeqConfig) -> Seq2SeqConfig:
        """The model config with this tokenizer's vocabulary and special ids."""
        return replace(mc, vocab_size=self.vocab_size, pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id)


def encode_sources(examples: list[Example], max_source: int, tok: NamingTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded source ids and their mask, (B, S) each."""
    return pad_sources([tok.encode(e.source)[:max_source] for e in examples], tok)


def pad_sources(rows: list[list[int]], tok: NamingTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Already tokenized sources, right-padded, and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def encode_targets(examples: list[Example], max_target: int, tok: NamingTokenizer) -> torch.Tensor:
    """BOS, the name's ids, EOS, right-padded: (B, T)."""
    rows = [[tok.bos_id, *tok.encode(e.name)[: max_target - 2], tok.eos_id] for e in examples]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), tok.pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def predict(model: Seq2Seq, examples: list[Example], tok: NamingTokenizer, batch: int = 64) -> list[str]:
    model.eval()
    names = []
    for i in range(0, len(examples), batch):
        ids, mask = encode_sources(examples[i : i + batch], model.cfg.max_source, tok)
        for tokens in model.generate(ids, mask, model.cfg.max_target - 2):
            names.append(tok.decode(tokens))
    model.train()
    return names


@torch.no_grad()
def held_out_loss(model: Seq2Seq, examples: list[Example], tok: NamingTokenizer, batch: int = 64) -> float:
    model.eval()
    losses = []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        ids, mask = encode_sources(chunk, model.cfg.max_source, tok)
        losses.append(model.loss(ids, mask, encode_targets(chunk, model.cfg.max_target, tok)).item())
    model.train()
    return float(np.mean(losses))


def save(
    path: Path,
    model: Seq2Seq,
    opt: torch.optim.Optimizer,
    step: int,
    tc: TrainConfig,
    metrics: dict,
    tok: NamingTokenizer,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "config": model.cfg.to_dict(),
            "tokenizer": tok.to_str(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "train_config": asdict(tc),
            "metrics": metrics,
        },
        tmp,
    )
    tmp.replace(path)


def train(tc: TrainConfig, mc: Seq2SeqConfig, resume: bool = False) -> dict:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    train_set, val_set = load_examples([Path(p) for p in tc.data] or None, seed=tc.seed)
    sample = [val_set[i] for i in np.random.default_rng(tc.seed).permutation(len(val_set))[: tc.eval_examples]]
    ckpt_path = Path(tc.out) / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False) if resume and ckpt_path.exists() else None
    if ckpt is not None:
        tok = NamingTokenizer.from_checkpoint(ckpt)
    else:
        tok = NamingTokenizer.train(train_set, tc.bpe_vocab) if tc.bpe_vocab else NamingTokenizer()
    mc = tok.config(mc)
    model = Seq2Seq(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=tc.weight_decay)
    step, metrics = 0, {"history": [], "train_seconds": 0.0, "examples_seen": 0}
    if ckpt is not None:
        model = Seq2Seq(Seq2SeqConfig(**ckpt["config"]))
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=tc.weight_decay)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, metrics = ckpt["step"], ckpt["metrics"]
        print(f"resumed from {ckpt_path} at step {step}")
    mc = model.cfg
    print(
        f"task: {len(train_set):,} training functions, {len(val_set):,} held-out; "
        f"model: {model.num_parameters():,} parameters"
    )
    train_sources = [tok.encode(e.source)[: mc.max_source] for e in train_set]  # tokenized once, not every step
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16)
    started = time.monotonic() - metrics["train_seconds"]
    deadline = time.monotonic() + tc.max_minutes * 60 - metrics["train_seconds"]
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True)
    loss_ema = None
    while step < tc.max_steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc, (time.monotonic() - started) / 60)
        rng = np.random.default_rng([tc.seed, step])  # the batch depends only on (seed, step): resumable
        picked = rng.integers(0, len(train_set), tc.batch_size)
        batch = [train_set[i] for i in picked]
        ids, mask = pad_sources([train_sources[i] for i in picked], tok)
        with autocast:
            loss = model.loss(ids, mask, encode_targets(batch, mc.max_target, tok))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        metrics["examples_seen"] += len(batch)
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if step % tc.eval_interval == 0 or step == tc.max_steps:
            entry = {
                "step": step,
                "train_loss": round(loss_ema, 4),
                "val_loss": round(held_out_loss(model, sample, tok), 4),
                **{k: round(v, 4) for k, v in score(predict(model, sample, tok), sample).items()},
            }
            metrics["history"].append(entry)
            metrics["train_seconds"] = time.monotonic() - started
            bar.write(
                f"step {step}: train loss {loss_ema:.3f}, held-out loss {entry['val_loss']:.3f}, "
                f"exact match {entry['exact_match']:.1%} on {len(sample)}"
            )
            save(ckpt_path, model, opt, step, tc, metrics, tok)
    bar.close()
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    metrics["steps"] = step
    print(f"naming all {len(val_set)} held-out functions greedily")
    predictions = predict(model, val_set, tok)
    metrics["held_out"] = {k: round(v, 4) for k, v in score(predictions, val_set).items()}
    metrics["baselines"] = {
        name: {k: round(v, 4) for k, v in s.items()} for name, s in baselines(train_set, val_set).items()
    }
    metrics["held_out_examples"] = len(val_set)
    metrics["samples"] = [
        {"source": e.source[:400], "name": e.name, "predicted": p} for e, p in list(zip(val_set, predictions))[:40]
    ]
    save(ckpt_path, model, opt, step, tc, metrics, tok)
    print(
        f"done: {step} steps in {metrics['train_seconds'] / 60:.1f} min; held-out exact match "
        f"{metrics['held_out']['exact_match']:.1%}, sub-token F1 {metrics['held_out']['subtoken_f1']:.3f}"
    )
    for name, s in metrics["baselines"].items():
        print(f"  baseline {name}: exact match {s['exact_match']:.1%}, sub-token F1 {s['subtoken_f1']:.3f}")
    return metrics


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Seq2SeqConfig, bool]:
    return parse_config_flags(__doc__, (TrainConfig, Seq2SeqConfig), argv)


def main(argv: list[str] | None = None) -> None:
    tc, mc, resume = parse_args(argv)
    train(tc, mc, resume)


if __name__ == "__main__":
    main()
