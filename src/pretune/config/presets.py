"""The named presets: the published shapes of GPT-1, GPT-2, GPT-3, BERT, and small ones for a CPU."""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import PretuneError
from .model import ModelConfig


# --------------------------------------------------------------------------
# Presets: the published shapes.
# --------------------------------------------------------------------------

# Each family names its init and its training recipe (training_recipes.py cites the numbers):
# GPT-1 N(0, 0.02) unscaled (Radford et al. 2018, sec. 4.1); GPT-2/3 residual projections
# scaled by 1/sqrt(2 n_layer) (Radford et al. 2019, sec. 2.3), trained by GPT-3's recipe (GPT-2's
# paper gives none); BERT N(0, 0.02) unscaled (google-research/bert `initializer_range`).
_GPT1 = dict(causal=True, norm_placement="post", mlp="gelu_tanh", vocab_size=40478, max_seq_len=512,
             tokenizer="openai-gpt", residual_scale_init=False, recipe="gpt1")


_GPT2 = dict(causal=True, norm_placement="pre", mlp="gelu_tanh", vocab_size=50257, max_seq_len=1024,
             residual_scale_init=True, recipe="gpt3")


_GPT3 = dict(_GPT2, max_seq_len=2048)


_BERT = dict(causal=False, norm_placement="post", embedding_norm=True, mlp="gelu", vocab_size=30522,
             max_seq_len=512, type_vocab_size=2, norm_eps=1e-12, nsp_head=True, tokenizer="bert-uncased",
             residual_scale_init=False, recipe="bert")


# Llama's init is not published; GPT-2's scaling is kept (pre-LN, as GPT-2).
_LLAMA = dict(causal=True, norm="rmsnorm", norm_placement="pre", position="rotary", mlp="swiglu",
              bias=False, dropout=0.0, residual_scale_init=True, recipe="llama")


PRESETS: dict[str, dict[str, Any]] = {
    # Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", sec. 4.1
    "gpt1": dict(_GPT1, n_layer=12, d_model=768, n_head=12),
    # Radford et al. 2019, Table 2 (the released checkpoints; gpt2-xl is d=1600, 25 heads)
    "gpt2": dict(_GPT2, n_layer=12, d_model=768, n_head=12),
    "gpt2-medium": dict(_GPT2, n_layer=24, d_model=1024, n_head=16),
    "gpt2-large": dict(_GPT2, n_layer=36, d_model=1280, n_head=20),
    "gpt2-xl": dict(_GPT2, n_layer=48, d_model=1600, n_head=25),
    # Brown et al. 2020, Table 2.1 (13B: the table's d=5140 is a typo for 5120 = 40 x 128)
    "gpt3-small": dict(_GPT3, n_layer=12, d_model=768, n_head=12),
    "gpt3-medium": dict(_GPT3, n_layer=24, d_model=1024, n_head=16),
    "gpt3-large": dict(_GPT3, n_layer=24, d_model=1536, n_head=16),
    # Table 2.1 lists 24 heads of 128 for d=2048, which cannot both hold: 16 x 128 = 2048 is used.
    "gpt3-xl": dict(_GPT3, n_layer=24, d_model=2048, n_head=16),
    "gpt3-2.7b": dict(_GPT3, n_layer=32, d_model=2560, n_head=32),
    "gpt3-6.7b": dict(_GPT3, n_layer=32, d_model=4096, n_head=32),
    "gpt3-13b": dict(_GPT3, n_layer=40, d_model=5120, n_head=40),
    "gpt3-175b": dict(_GPT3, n_layer=96, d_model=12288, n_head=96),
    # Devlin et al. 2019, sec. 3
    "bert-base": dict(_BERT, n_layer=12, d_model=768, n_head=12),
    "bert-large": dict(_BERT, n_layer=24, d_model=1024, n_head=16),
    # Small shapes that learn something in minutes on two CPU cores.
    # gpt-mini: a byte-level BPE of 8,192 tokens trained on the built-in corpus.
    "gpt-mini": dict(_GPT2, n_layer=4, d_model=256, n_head=4, max_seq_len=256, vocab_size=8192,
                     tokenizer="bpe-8192", dropout=0.0),
    # bert-mini: BERT's own uncased WordPiece (30,522), as all-MiniLM ships it.
    "bert-mini": dict(_BERT, n_layer=4, d_model=256, n_head=4, max_seq_len=128, dropout=0.0),
    # a Llama-style shape of the same size, for the architecture options
    "llama-mini": dict(_LLAMA, n_layer=4, d_model=256, n_head=4, n_kv_head=2, d_ff=688, max_seq_len=256,
                       vocab_size=8192, tokenizer="bpe-8192"),
    # GPT-4 as rumoured (SemiAnalysis, July 2023; not published by OpenAI): 120 layers, 16 experts
    # of ~111B each, top-2, ~55B shared (attention), ~1.8T total, ~280B active. Solving for d:
    # an expert is a GELU MLP d -> 4d -> d in every layer, 120 * 8 d^2 = 111e9 -> d ~ 10,750, so
    # d = 10,752 = 84 heads x 128; attention 120 * 4 d^2 = 55.5B. With the cl100k vocabulary
    # (100,277) and an 8k window count_params gives 1.832T total, 278.7B active (docs/compute.md).
    "gpt4-moe": dict(_GPT3, n_layer=120, d_model=10752, n_head=84, max_seq_len=8192, vocab_size=100277,
                     n_expert=16, top_k=2, moe_every=1, dropout=0.0, tokenizer="cl100k_base"),
}


# Published parameter totals, for the tests (and `pretune cost`). GPT-2 XL: the
# paper's Table 2 says 1542M ("1.5B"); the released checkpoint holds 1558M.
PUBLISHED_PARAMS = {
    "gpt1": 117e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1542e6,
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9,
    "bert-base": 110e6, "bert-large": 340e6,
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with any field overridden."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(PRESETS)}"
        raise PretuneError(f"unknown preset '{name}'", None, hint)
    return ModelConfig(**{**PRESETS[name], "name": name, **overrides})
