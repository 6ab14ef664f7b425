import math

import pytest
import torch
from torch.nn import functional as F

from model.transformer import GPT, GPTConfig, MultiHeadAttention, causal_padding_mask, sinusoidal_encoding

pytestmark = pytest.mark.unit  # in-process, no servers or exports: make test-unit

CFG = GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=4, d_model=32, d_ff=64)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_attention_equals_torch_reference():
    torch.manual_seed(0)
    attn = MultiHeadAttention(CFG).eval()
    x = torch.randn(3, 10, CFG.d_model)
    mask = causal_padding_mask(torch.ones(3, 10, dtype=torch.int64), 10)
    ours, _ = attn(x, mask)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(3, 10, CFG.n_head, CFG.head_dim).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 10, CFG.d_model)
    assert torch.allclose(ours, attn.out_proj(ref), atol=1e-5)

    # and the whole module against nn.MultiheadAttention loaded with the same weights
    mha = torch.nn.MultiheadAttention(CFG.d_model, CFG.n_head, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    ref2, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert torch.allclose(ours, ref2, atol=1e-5)


def test_no_causal_leakage(model: GPT):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    base, _ = model(ids)
    for t in range(19):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 256
        out, _ = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position {t + 1} leaked into earlier outputs"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_kv_cache_decoding_equals_full_forward(model: GPT):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 24))
    full, _ = model(ids)
    logits, past = model(ids[:, :5])
    assert torch.allclose(logits, full[:, :5], atol=1e-5)
    for t in range(5, 24):
        logits, past = model(ids[:, t : t + 1], past_key_values=past)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5), f"step {t} differs"
        assert past[0][0].shape == (2, CFG.n_head, t + 1, CFG.head_dim)


def test_left_padding_does_not_change_real_outputs(model: GPT):
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (1, 9))
    alone, _ = model(ids)
    padded = torch.cat([torch.full((1, 4), 256), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 9, dtype=torch.int64)], dim=1)
    out, _ = model(padded, attention_mask=mask)
    assert torch.isfinite(out).all(), "a fully masked padding row produced NaN"
    assert torch.allclose(out[:, 4:], alone, atol=1e-5)


def test_positional_encoding_matches_paper_formula():
    d = 16
    pe = sinusoidal_encoding(torch.arange(50)[None], d)[0]
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)
