"""A decoder-only Transformer written from scratch, after "Attention Is All You Need".

Read top to bottom: config, sinusoidal positional encoding, multi-head attention,
position-wise feed-forward, the Add & Norm block, and the GPT that stacks them.

The forward takes and returns a KV cache in the Hugging Face / Optimum decoder-with-past
layout (past keys/values [B, n_head, past_len, head_dim] in, present out), so the exported
ONNX graph serves both the prompt pass (past_len == 0) and one-token decode steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTConfig:
    vocab_size: int = 257  # 256 byte values + <|endoftext|>
    block_size: int = 256  # longest context (prompt + generated) the model is trained for
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    d_ff: int = 768
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_encoding(position_ids: torch.Tensor, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Computed from the position ids rather than looked up in a table, so left-padded rows
    (whose positions start later) and any position up to the context get the paper's values.
    """
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=position_ids.device) * (-math.log(10000.0) / d_model)
    )  # (d/2,)
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, d/2)
    # interleave so even channels hold sin and odd channels hold cos
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, d)


class MultiHeadAttention(nn.Module):
    """Q, K, V projections split into heads, scaled dot-product attention, concat, output."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, T, C); mask: (B, 1, T, S) bool, True where a query may attend a key."""
        B, T, C = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hd)
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nh, S, hd), S = past_len + T
            v = torch.cat((past[1], v), dim=2)
        return self.attend(q, k, v, mask), (k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over heads, then concat and the output projection.
        q: (B, nh, T, hd); k, v: (B, nh, S, hd); mask: (B, 1, T, S) bool -> (B, T, C)."""
        B, _, T, _ = q.shape
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        # A finite minimum instead of -inf: a row with every key masked (a left-padding
        # query) then softmaxes to a uniform row instead of NaN, and its output is ignored.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = self.dropout(F.softmax(scores, dim=-1))
        y = weights @ v  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # concat heads: (B, T, C)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """FFN(x) = W2 · GELU(W1 · x + b1) + b2, applied to each position alone."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Self-attention and feed-forward, each wrapped in the paper's residual Add & Norm:
    x = LayerNorm(x + Sublayer(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, present = self.attn(x, mask, past)
        x = self.norm1(x + self.dropout(a))
        x = self.norm2(x + self.ff(x))
        return x, present


def causal_padding_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, S) 0/1 key mask -> (B, 1, T, S) bool: query t (at absolute slot S-T+t) may see key s
    when s <= S-T+t (causal) and key s is not padding."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(query_len, device=attention_mask.device) + (S - query_len)  # (T,)
    k_pos = torch.arange(S, device=attention_mask.device)  # (S,)
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (T, S)
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    return causal[None, None, :, :] & keys


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: input and output share a space
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, T); attention_mask (B, past_len + T), 1 = real token; position_ids (B, T).

        Returns logits (B, T, vocab) and the present cache, one (key, value) per layer, each
        (B, n_head, past_len + T, head_dim).
        """
        B, T = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -T:]

        # the paper scales embeddings by sqrt(d_model) before adding the encodings
        x = self.tok_emb(input_ids) * math.sqrt(self.cfg.d_model)
        x = self.drop(x + sinusoidal_encoding(position_ids, self.cfg.d_model))
        mask = causal_padding_mask(attention_mask, T)
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.lm_head(x), presents

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = self(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def empty_cache(self, batch_size: int) -> KVCache:
        shape = (batch_size, self.cfg.n_head, 0, self.cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.cfg.n_layer)]

    @torch.no_grad()
    def generate(
        self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, seed: int = 0
    ) -> list[int]:
        """Reference decoding with the KV cache (greedy at temperature 0); the exported graph
        and the server are checked against it."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.tensor([prompt])
        logits, past = self(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            last = logits[0, -1]
            if temperature <= 0:
                nxt = int(last.argmax())
            else:
                last = last / temperature
                if top_k:
                    last = last.masked_fill(last < last.topk(top_k).values[-1], float("-inf"))
                nxt = int(torch.multinomial(F.softmax(last, -1), 1, generator=gen))
            out.append(nxt)
            if len(prompt) + len(out) >= self.cfg.block_size:
                break
            logits, past = self(torch.tensor([[nxt]]), past_key_values=past)
        return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_checkpoint(path: str, map_location: str = "cpu") -> tuple[GPT, dict]:
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
