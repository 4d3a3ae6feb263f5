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


# ---- the positions seam (models/positions.py) ---------------------------------------------

from pretune.errors import PretuneError  # noqa: E402
from pretune.models import heads, positions  # noqa: E402
from pretune.models.counting import count_params  # noqa: E402


class _NoPositions(positions.Position):
    """A toy kind: no position information at all (the base class's defaults)."""
    name = "none-toy"


class _SelfOnly(positions.Position):
    """A toy additive bias (ALiBi's interface, Press et al. 2022): 0 on the diagonal, -inf
    elsewhere, so each query sees only its own key and attention returns proj(v_i)."""
    name = "self-only-toy"

    @staticmethod
    def bias(m, c, pos, n_keys):
        keys = torch.arange(n_keys)
        return torch.where(pos[:, None] == keys[None, :], 0.0, float("-inf"))[None]


def test_a_position_kind_registered_in_a_test_builds_counts_and_trains(monkeypatch):
    """One class and a register call, no other edit: the ordinary Transformer builds it, counts
    its (zero) parameters, and an encoder without positions is permutation-equivariant (nothing
    tells it where a token is), which a learned-position one is not."""
    monkeypatch.setitem(positions.POSITIONS, _NoPositions.name, _NoPositions)
    enc = dict(causal=False, norm_placement="post", type_vocab_size=0)
    learned = tiny(**enc)
    c = tiny(**enc, position="none-toy")
    m = Transformer(c).eval()
    n = sum(p.numel() for p in m.parameters())
    assert count_params(c)["total"] == n == count_params(learned)["total"] - 32 * 32  # the 32 x 32 W_p gone
    assert "wpe.weight" not in m.state_dict()
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 10))
    perm = torch.randperm(10)
    torch.testing.assert_close(m(x)[:, perm], m(x[:, perm]), rtol=1e-5, atol=1e-5)
    ml = Transformer(learned).eval()
    assert not torch.allclose(ml(x)[:, perm], ml(x[:, perm]), atol=1e-3)
    m.train()
    m(x).pow(2).mean().backward()
    assert m.wte.weight.grad is not None and torch.isfinite(m.wte.weight.grad).all()


def test_a_position_kinds_attention_bias_reaches_every_layers_scores(monkeypatch):
    """The toy bias lets each token see only itself, so the first block's attention output
    is proj(v) with v = x W_v^T + b_v, written out here from the qkv weights; also through the
    KV cache, token by token."""
    monkeypatch.setitem(positions.POSITIONS, _SelfOnly.name, _SelfOnly)
    c = tiny(position="self-only-toy")
    m = Transformer(c).eval()
    attn = m.blocks[0].attn
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    x = torch.randint(0, 97, (1, 7))
    h = m(x)
    hd = c.head_dim * c.kv_heads
    v = seen["x"] @ attn.qkv.weight[-hd:].T + attn.qkv.bias[-hd:]
    torch.testing.assert_close(seen["y"], v @ attn.proj.weight.T + attn.proj.bias, rtol=1e-5, atol=1e-5)
    cache = KVCache(c, 1, 7, "cpu", torch.float32)
    steps = torch.cat([m(x[:, i:i + 1], cache=cache) for i in range(7)], 1)
    torch.testing.assert_close(steps, h, rtol=1e-5, atol=1e-5)


def test_unknown_position_kind_names_the_near_one():
    for build in (Transformer, count_params):
        with pytest.raises(PretuneError) as e:
            build(tiny(position="rotery"))
        assert "position='rotery' is unknown" in str(e.value) and "did you mean 'rotary'" in str(e.value)
    with pytest.raises(PretuneError, match="even head_dim"):
        Transformer(tiny(position="rotary", d_model=36, n_head=4))  # head_dim 9


def test_position_modules_keep_their_state_dict_keys():
    """W_p stays `wpe.weight` (the interop rules and old checkpoints name it); rotary keeps no tensor."""
    learned = Transformer(tiny()).state_dict()
    assert learned["wpe.weight"].shape == (32, 32)
    rotary = Transformer(tiny(position="rotary"))
    assert not [k for k in rotary.state_dict() if "wpe" in k or "rope" in k]
    assert rotary.rope.cos.shape == (32, 8)


# ---- pooling, defined once (models/heads.py) ---------------------------------------------

def _hand_made():
    """Two sequences of 3 positions, d = 2; the second has 2 real tokens and a padding row of 100s."""
    h = torch.tensor([[[1., 2.], [3., 4.], [5., 9.]],
                      [[-1., 0.], [2., 6.], [100., 100.]]])
    return h, torch.tensor([3, 2])


def test_pooling_by_hand():
    h, lengths = _hand_made()
    torch.testing.assert_close(heads.pool(h, lengths, "last"), torch.tensor([[5., 9.], [2., 6.]]), rtol=0, atol=0)
    torch.testing.assert_close(heads.pool(h, lengths, "cls"), torch.tensor([[1., 2.], [-1., 0.]]), rtol=0, atol=0)
    torch.testing.assert_close(heads.pool(h, lengths, "mean"), torch.tensor([[3., 5.], [0.5, 3.]]), rtol=0, atol=0)


def test_the_default_pooling_per_use():
    assert [heads.default_pooling(causal, use) for causal in (True, False) for use in ("classify", "embed")] == \
        ["last", "last", "cls", "mean"]


def test_bad_pooling_is_one_line_naming_the_near_one():
    with pytest.raises(PretuneError) as e:
        heads.check_pooling("maen", causal=False)
    assert "unknown pooling 'maen'" in str(e.value) and "did you mean 'mean'" in str(e.value)
    with pytest.raises(PretuneError) as e:
        heads.check_pooling("cls", causal=True, option="--pool")
    assert "a decoder has no [CLS]" in str(e.value) and "--pool mean or --pool last" in str(e.value)


def test_embed_and_the_classifier_both_pool_through_the_one_function(monkeypatch):
    """Replace heads.pool by a spy: embeddings and the classifier's summary both call it, and the
    classifier's [CLS] head is BERT's tanh pooler over what it returns (the raw [CLS] state)."""
    from pretune.inference.embed import embed_texts
    from pretune.models.heads import Classifier
    from pretune.data.tokenizers import load_tokenizer
    calls, real = [], heads.pool

    def spy(h, lengths, kind):
        calls.append(kind)
        return real(h, lengths, kind)

    monkeypatch.setattr(heads, "pool", spy)
    tok = load_tokenizer("bert-uncased")
    c = tiny(causal=False, norm_placement="post", vocab_size=tok.vocab_size, type_vocab_size=2)
    body = Transformer(c).eval()
    e = embed_texts(body, tok, ["a b c", "a"], pooling="cls")
    assert calls == ["cls"]
    clf = Classifier(body, 3).eval()
    ids = torch.tensor([tok.encode("a b c")])
    logits, h = clf(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([ids.shape[1]]))
    assert calls == ["cls", "cls"] and clf.head.pool == "cls"
    torch.testing.assert_close(e[0], h[0, 0], rtol=1e-5, atol=1e-5)
    want = clf.head.out(torch.tanh(clf.head.pooler(h[:, 0])))
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
