import math

import pytest
import torch
import torch.nn.functional as F

from pretune import Transformer, preset
from pretune.config.model import ModelConfig
from pretune.models.layers import KVCache


def tiny(**kw):
    base = dict(name="tiny", vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=32, dropout=0.0)
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "gpt2": dict(),
    "gpt1": dict(norm_placement="post"),
    "llama": dict(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_is_causal(variant):
    m = Transformer(tiny(**VARIANTS[variant])).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    hx, hy = m(x), m(y)
    torch.testing.assert_close(hx[:, :10], hy[:, :10])
    assert not torch.allclose(hx[:, 10:], hy[:, 10:])


def test_encoder_sees_both_directions():
    m = Transformer(tiny(causal=False, type_vocab_size=2, embedding_norm=True, norm_placement="post")).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    assert not torch.allclose(m(x)[:, :12], m(y)[:, :12])


def test_padding_is_never_attended():
    m = Transformer(tiny(causal=False, type_vocab_size=2)).eval()
    x = torch.randint(0, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[:, 7:] = False
    y = x.clone()
    y[:, 7:] = 0  # different padding content
    torch.testing.assert_close(m(x, attention_mask=mask)[:, :7], m(y, attention_mask=mask)[:, :7])
    # and equals the unpadded sequence alone
    torch.testing.assert_close(m(x, attention_mask=mask)[:, :7], m(x[:, :7]), atol=1e-5, rtol=1e-5)


def test_lm_head_shares_storage_with_W_e():
    m = Transformer(tiny())
    assert m.lm_head.weight is m.wte.weight
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    e = Transformer(tiny(causal=False))
    assert e.lm_head.decoder.weight.data_ptr() == e.wte.weight.data_ptr()


def test_gpt2_init_scales_residual_projections():
    cfg = tiny(n_layer=8, d_model=256, n_head=4)
    m = Transformer(cfg)
    std = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.0015
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_matches_full_forward(variant):
    m = Transformer(tiny(**VARIANTS[variant])).eval()
    x = torch.randint(0, 97, (2, 12))
    full = m(x)
    cache = KVCache(m.config, 2, 12, "cpu", torch.float32)
    parts = [m(x[:, :5], cache=cache), m(x[:, 5:8], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_rotary_matches_explicit_rotation():
    # RoPE (Su et al. 2021) in the half-split layout: pair (x_i, x_{i+d/2}) rotated by pos * theta^(-2i/d).
    cfg = tiny(position="rotary")
    m = Transformer(cfg)
    x = torch.randn(1, 1, 3, 8)
    got = m.rope(x, torch.arange(3))
    want = torch.empty_like(x)
    for p in range(3):
        for i in range(4):
            ang = p * 10000 ** (-2 * i / 8)
            a, b = x[0, 0, p, i], x[0, 0, p, i + 4]
            want[0, 0, p, i] = a * math.cos(ang) - b * math.sin(ang)
            want[0, 0, p, i + 4] = b * math.cos(ang) + a * math.sin(ang)
    torch.testing.assert_close(got, want)


def test_tiny_model_memorises_a_repeated_text():
    torch.manual_seed(0)
    m = Transformer(tiny(vocab_size=16, max_seq_len=32))
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(m.logits(m(seq[:, :-1]))[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_presets_build_the_paper_shapes():
    c = preset("gpt2-xl")
    assert (c.n_layer, c.d_model, c.n_head, c.max_seq_len) == (48, 1600, 25, 1024)
    c = preset("gpt3-175b")
    assert (c.n_layer, c.d_model, c.n_head, c.max_seq_len, c.head_dim) == (96, 12288, 96, 2048, 128)
    assert preset("gpt3-13b").d_model == 5120
    c = preset("gpt1")
    assert (c.norm_placement, c.vocab_size, c.max_seq_len) == ("post", 40478, 512)
