"""The whole Transformer of "Attention Is All You Need": an encoder and a decoder.

The multi-head attention of model/transformer.py serves three ways here:
  - encoder self-attention: every source position sees every real source position (padding
    mask, no causal mask);
  - decoder self-attention: causal, over the target so far (with a KV cache at generation);
  - decoder cross-attention: queries from the decoder, keys and values from the encoder's
    output, masked by the source's padding. Its keys and values are computed once per source
    and cached for every step.
Sinusoidal positions, residual Add & Norm and the feed-forward layers are the decoder-only
model's. One embedding table is shared by source, target and the output projection.

The decode step takes and returns its caches in the Optimum seq2seq layout, so the exported
graphs (export/seq2seq.py) are what a Hugging Face export of T5, BART or Marian looks like:
self-attention `decoder.key/value` [B, n_head, tgt_len, head_dim] that grow, cross-attention
`encoder.key/value` [B, n_head, src_len, head_dim] that do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from model.transformer import FeedForward, GPTConfig, MultiHeadAttention, causal_padding_mask, sinusoidal_encoding

# The byte-level vocabulary: 0-255 are bytes, then the special tokens (a BPE puts its own
# special tokens first; the config carries whichever ids the model was trained with).
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Seq2SeqConfig:
    vocab_size: int = VOCAB_SIZE
    max_source: int = 192  # longest source the model reads (tokens; longer ones are cut)
    max_target: int = 40  # longest target it writes, BOS and EOS included
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID  # the decoder's start token
    eos_id: int = EOS_ID
    n_encoder_layers: int = 3
    n_decoder_layers: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout: float = 0.1  # 16k training functions: the model sees each about a dozen times

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def attention(self) -> GPTConfig:
        """The shape of one attention / feed-forward layer, in the decoder-only model's terms."""
        return GPTConfig(
            vocab_size=self.vocab_size, n_head=self.n_head, d_model=self.d_model, d_ff=self.d_ff, dropout=self.dropout
        )

    def to_dict(self) -> dict:
        return asdict(self)


class CrossAttention(MultiHeadAttention):
    """Queries from the decoder; keys and values from the encoder's output, projected once."""

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None, cached: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        """x: (B, T, C); mask: (B, 1, 1, S) bool; memory: (B, S, C) the encoder's output, or
        cached: its projected (key, value), each (B, nh, S, hd)."""
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hd)
        if cached is None:
            cached = (self._split_heads(self.k_proj(memory)), self._split_heads(self.v_proj(memory)))
        return self.attend(q, cached[0], cached[1], mask), cached


class EncoderBlock(nn.Module):
    """Self-attention over the whole source, then feed-forward, each with Add & Norm."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        layer = cfg.attention()
        self.attn = MultiHeadAttention(layer)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(layer)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, mask)
        x = self.norm1(x + a)
        return self.norm2(x + self.ff(x))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder, feed-forward; each Add & Norm."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        layer = cfg.attention()
        self.self_attn = MultiHeadAttention(layer)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = CrossAttention(layer)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(layer)
        self.norm3 = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor,
        past: KV | None,
        memory: torch.Tensor | None,
        cross: KV | None,
    ) -> tuple[torch.Tensor, KV, KV]:
        a, present = self.self_attn(x, self_mask, past)
        x = self.norm1(x + a)
        c, cross = self.cross_attn(x, cross_mask, memory, cross)
        x = self.norm2(x + c)
        return self.norm3(x + self.ff(x)), present, cross


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 -> (B, 1, 1, S) bool: every query may see every real key."""
    return attention_mask.bool()[:, None, None, :]


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # one embedding space for source, target and output
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * math.sqrt(self.cfg.d_model) + sinusoidal_encoding(positions, self.cfg.d_model)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, S) -> the encoder's output (B, S, C). Sources are
        right-padded, so positions are simply 0..S-1."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self._embed(input_ids, positions)
        mask = padding_mask(attention_mask)
        for block in self.encoder:
            x = block(x, mask)
        return x

    def decode(
        self,
        input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        past: list[KV] | None = None,
        cross: list[KV] | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV], list[KV]]:
        """One decoder pass over input_ids (B, T) after `past` (self-attention caches, each
        (B, nh, P, hd)). Cross-attention reads encoder_hidden_states (first pass) or `cross`
        (every later one). decoder_attention_mask (B, P + T), 1 = real target token, lets rows
        of different target lengths share a batch (left-padded); omitted, every row is full.
        Returns logits (B, T, V), the self caches (P + T long) and the cross caches."""
        B, T = input_ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones(B, P + T, dtype=torch.int64, device=input_ids.device)
        positions = (decoder_attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self._embed(input_ids, positions)
        self_mask = causal_padding_mask(decoder_attention_mask, T)
        cross_mask = padding_mask(encoder_attention_mask)
        presents, crosses = [], []
        for i, block in enumerate(self.decoder):
            x, present, c = block(
                x,
                self_mask,
                cross_mask,
                None if past is None else past[i],
                encoder_hidden_states,
                None if cross is None else cross[i],
            )
            presents.append(present)
            crosses.append(c)
        return self.lm_head(x), presents, crosses

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: target_ids (B, T) = BOS, y1..yn, EOS, PAD...; predict each next one."""
        memory = self.encode(input_ids, attention_mask)
        logits, _, _ = self.decode(target_ids[:, :-1], attention_mask, memory)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target_ids[:, 1:].reshape(-1), ignore_index=self.cfg.pad_id
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding with both caches, a batch at once (the reference the exported graphs
        and the server are checked against). Each row stops at EOS."""
        memory = self.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        tokens = torch.full((B, 1), self.cfg.bos_id, dtype=torch.int64)
        logits, past, cross = self.decode(tokens, attention_mask, memory)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            for b in range(B):
                if not done[b]:
                    token = int(nxt[b])
                    if token == self.cfg.eos_id:
                        done[b] = True
                    else:
                        out[b].append(token)
            if all(done):
                break
            logits, past, cross = self.decode(nxt[:, None], attention_mask, past=past, cross=cross)
        return out


def load_seq2seq(path: str) -> tuple[Seq2Seq, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = Seq2Seq(Seq2SeqConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
