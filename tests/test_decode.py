"""The lean decoder step (inference/decode.py) against the model's own forward and transformers.

- GPT-2 (learned positions, LayerNorm, GELU) in fp32: greedy tokens equal transformers'
  GPT2LMHeadModel's on the same weights (an independent implementation);
- under every --weights choice, and a Llama-shaped decoder (rotary, RMSNorm, SwiGLU, grouped
  KV heads): each step's logits equal `model.logits(model(...))`'s, whose equality with
  transformers the interop tests check, position after position;
- shapes it does not cover (post-LN, an encoder) get None, so generation calls the model.
"""

import copy

import pytest
import torch

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.inference import decode
from pretune.inference.generate import generate, gemv_layout
from pretune.models import quantize as Q
from pretune.models.layers import KVCache

torch.set_num_threads(1)

GPT = dict(name="t", vocab_size=96, max_seq_len=48, n_layer=2, n_head=4, d_model=64, dropout=0.0)
LLAMA = dict(GPT, position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**kw)).eval()


def test_greedy_tokens_equal_transformers_gpt2():
    from pretune_bench.cases import hf_gpt2

    model = _model(**GPT)
    hf = hf_gpt2(model).eval()
    x = torch.randint(GPT["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    assert decode.decoder_step(model) is not None
    ours = generate(model, x, 20, temperature=0.0)
    with torch.no_grad():
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", ["gpt", "llama"])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
def test_each_step_equals_the_models_forward(shape, weights):
    model = Q.quantize_model(_model(**(GPT if shape == "gpt" else LLAMA)), weights)
    c = model.config
    dtype = Q.cache_dtype(model)
    ids = torch.randint(c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    a, b = KVCache(c, 2, 12, "cpu", dtype), KVCache(c, 2, 12, "cpu", dtype)
    with gemv_layout(model), torch.inference_mode():
        step = decode.decoder_step(model)
        assert step is not None
        model(ids[:, :4], cache=a)
        model(ids[:, :4], cache=b)
        for t in range(4, 12):
            ref = model.logits(model(ids[:, t:t + 1], cache=a)[:, -1])
            got = step(ids[:, t:t + 1], b)
            assert b.pos == a.pos == t + 1
            torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.k[1], a.k[1], rtol=0, atol=0)


def test_shapes_it_does_not_cover_fall_back_to_the_model():
    assert decode.decoder_step(_model(**GPT, norm_placement="post")) is None
    assert decode.decoder_step(_model(**dict(GPT, causal=False, lm_head=False))) is None
    model = _model(**GPT)
    off = copy.deepcopy(model)
    x = torch.randint(GPT["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(3))
    decode.ENABLED = False
    try:
        ref = generate(off, x, 10, temperature=0.0)
    finally:
        decode.ENABLED = True
    assert torch.equal(generate(model, x, 10, temperature=0.0), ref)
