"""ModelConfig: one dataclass for every shape of GPT and BERT, and the named presets.

Every choice that differs between the families is a field here, never a
subclass: the same `Transformer` builds GPT-1 (post-LN, learned positions),
GPT-2/3 (pre-LN), BERT (bidirectional, segments, embedding LayerNorm) and
Llama-style models (RMSNorm, rotary, SwiGLU, grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PretuneError

NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "gelu_tanh", "swiglu")


@dataclass
class ModelConfig:
    """The shape of a Transformer. Validated on construction."""

    name: str = "custom"
    causal: bool = True  # True: GPT decoder (masked self-attention); False: BERT encoder
    vocab_size: int = 50257
    vocab_multiple: int = 64  # pad the embedding rows to a multiple of this (fast matmuls); 1 = off
    max_seq_len: int = 1024  # T, the context window
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (multi-head)
    d_model: int = 768
    d_ff: int | None = None  # None = 4 * d_model
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre (GPT-2/3, Llama) | post (GPT-1, BERT)
    embedding_norm: bool = False  # BERT normalises h_0
    position: str = "learned"  # learned | rotary
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # position interpolation factor for a longer window (Chen et al. 2023)
    mlp: str = "gelu_tanh"  # gelu (exact, BERT) | gelu_tanh (GPT) | swiglu (Llama)
    bias: bool = True
    tie_embeddings: bool = True  # P(u) = softmax(h_n W_e^T)
    type_vocab_size: int = 0  # segment embeddings (BERT: 2)
    dropout: float = 0.1
    # heads on top of h_n
    lm_head: bool = True  # next-token head (decoder) or MLM head (encoder)
    nsp_head: bool = False  # pooled [CLS] -> 2 classes (BERT)
    # mixture of experts (0 experts = dense)
    n_expert: int = 0
    top_k: int = 2
    moe_every: int = 1  # a routed layer in every k-th block (blocks k-1, 2k-1, ...)
    d_expert_ff: int | None = None  # None = d_ff
    shared_expert: bool = False
    capacity_factor: float | None = None  # None = dropless
    aux_loss_coef: float = 0.01  # Switch Transformer load balancing
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    tokenizer: str = "gpt2"  # the vocabulary this shape expects (see tokenizer.py)
    # how the family initialises and trains (None: the family's, by shape; recipes.py)
    residual_scale_init: bool | None = None  # residual projections' init std / sqrt(2 n_layer) (GPT-2)
    recipe: str | None = None  # the training recipe (recipes.RECIPES): gpt1 | gpt3 | bert | llama

    def __post_init__(self):
        self.validate()

    # ---- derived -------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def expert_ffn_dim(self) -> int:
        return self.d_expert_ff or self.ffn_dim

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.vocab_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def residual_scaled(self) -> bool:
        """Whether the init scales residual projections by 1/sqrt(2 n_layer): GPT-2 (Radford et al.
        2019, sec. 2.3) does, with its move to pre-LN; GPT-1 ("a simple weight initialization of
        N(0, 0.02) was sufficient", 2018 sec. 4.1) and BERT (N(0, 0.02) everywhere) do not. Unset
        (an import, an older config.json): by the shape, pre-LN scaled, post-LN not."""
        if self.residual_scale_init is not None:
            return self.residual_scale_init
        return self.norm_placement == "pre"

    @property
    def train_recipe(self) -> str:
        """The recipe this model trains by: the field, else the family's by shape (recipes.py)."""
        from .recipes import recipe_name
        return recipe_name(self)

    def is_moe_block(self, i: int) -> bool:
        return self.n_expert > 0 and (i + 1) % self.moe_every == 0

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        def bad(msg, fix):
            raise PretuneError(f"impossible model config: {msg}", f"model '{self.name}'", fix)

        for f in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "vocab_multiple"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{f}={v!r} must be a positive integer", f"set {f} to a whole number > 0")
        if self.d_model % self.n_head:
            bad(f"d_model={self.d_model} is not divisible by n_head={self.n_head}",
                "choose n_head that divides d_model")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            bad(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}", "pick a divisor of n_head")
        if self.position == "rotary" and self.head_dim % 2:
            bad(f"rotary positions need an even head_dim, got {self.head_dim}", "change d_model or n_head")
        for f, allowed in (("norm", NORMS), ("norm_placement", PLACEMENTS), ("position", POSITIONS), ("mlp", MLPS)):
            if getattr(self, f) not in allowed:
                bad(f"{f}={getattr(self, f)!r} is unknown", f"use one of {', '.join(allowed)}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout={self.dropout} must be in [0, 1)", "use e.g. 0.1")
        if self.d_ff is not None and self.d_ff <= 0:
            bad(f"d_ff={self.d_ff} must be positive", "set d_ff or leave it empty for 4*d_model")
        if self.rope_scaling < 1.0:
            bad(f"rope_scaling={self.rope_scaling} must be >= 1", "use 1 for the trained window")
        if self.n_expert < 0:
            bad(f"n_expert={self.n_expert} must be >= 0", "use 0 for a dense model")
        moe_only = [f for f, on in (("capacity_factor", self.capacity_factor is not None),
                                    ("shared_expert", self.shared_expert), ("d_expert_ff", self.d_expert_ff is not None),
                                    ("moe_every", self.moe_every != 1)) if on]
        if self.n_expert == 0 and moe_only:  # zero experts asked for alongside expert options: a slip
            bad(f"n_expert=0 (a dense model, zero experts) but {', '.join(moe_only)} set",
                "set n_expert to 1 or more for a mixture of experts, or drop the expert options")
        if self.n_expert > 0:
            if self.top_k <= 0 or self.top_k > self.n_expert:
                bad(f"top_k={self.top_k} must be between 1 and n_expert={self.n_expert}",
                    "route each token to at most n_expert experts")
            if self.moe_every <= 0:
                bad(f"moe_every={self.moe_every} must be positive", "use 1 for every block")
            if self.capacity_factor is not None and not self.capacity_factor > 0:
                bad(f"capacity_factor={self.capacity_factor} must be positive",
                    "use e.g. 1.25, or leave it empty for dropless routing")
        if self.recipe is not None:
            from .recipes import RECIPES
            if self.recipe not in RECIPES:
                near = difflib.get_close_matches(str(self.recipe), RECIPES, n=1)
                bad(f"recipe={self.recipe!r} is unknown",
                    (f"did you mean '{near[0]}'? " if near else "") + f"use one of {', '.join(RECIPES)}")
        if self.nsp_head and self.causal:
            bad("next-sentence prediction needs an encoder (causal=False)", "set nsp_head=false")

    # ---- (de)serialisation ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            near = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"known fields: {', '.join(sorted(known))}"
            raise PretuneError(f"unknown model config field '{unknown[0]}'", where, hint)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise PretuneError(f"cannot read model config: {e}", str(p), "pass a JSON file written by pretune")
        return cls.from_dict(d.get("model", d), str(p))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------
# Presets: the published shapes.
# --------------------------------------------------------------------------

# Each family names its init and its training recipe (recipes.py cites the numbers):
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


# --------------------------------------------------------------------------
# Counting, from the config alone (no weights allocated).
# --------------------------------------------------------------------------

def _norm_params(c: ModelConfig) -> int:
    return c.d_model * (2 if (c.norm == "layernorm" and c.bias) else 1)


def _mlp_params(c: ModelConfig, ff: int) -> int:
    d = c.d_model
    if c.mlp == "swiglu":
        return 3 * d * ff + (2 * ff + d if c.bias else 0)
    return 2 * d * ff + (ff + d if c.bias else 0)


def count_params(c: ModelConfig) -> dict[str, int]:
    """Parameters by part: `total`, `embedding` (token, position and segment
    tables, and an untied output matrix), `non_embedding` (Kaplan et al. 2020's N),
    and `active` (per token: a routed layer counts only its top-k experts).
    Equals `sum(p.numel())` of the built model, the tied W_e counted once."""
    d, V = c.d_model, c.padded_vocab_size
    emb = V * d + (c.max_seq_len * d if c.position == "learned" else 0) + c.type_vocab_size * d
    other = _norm_params(c) if c.embedding_norm else 0

    qkv_out = (c.n_head + 2 * c.kv_heads) * c.head_dim
    attn = d * qkv_out + c.n_head * c.head_dim * d + ((qkv_out + d) if c.bias else 0)
    dense_block = attn + 2 * _norm_params(c) + _mlp_params(c, c.ffn_dim)
    expert = _mlp_params(c, c.expert_ffn_dim)
    moe_ffn = d * c.n_expert + c.n_expert * expert + (_mlp_params(c, c.ffn_dim) if c.shared_expert else 0)
    moe_block = attn + 2 * _norm_params(c) + moe_ffn
    n_moe = sum(c.is_moe_block(i) for i in range(c.n_layer))
    blocks = (c.n_layer - n_moe) * dense_block + n_moe * moe_block
    inactive = n_moe * (c.n_expert - c.top_k) * expert
    if c.norm_placement == "pre":
        other += _norm_params(c)  # final norm
    heads = 0
    if c.lm_head:
        if not c.tie_embeddings:
            emb += V * d
        if not c.causal:  # MLM head: transform (dense + act + norm) and an output bias
            heads += d * d + d + _norm_params(c) + V
    if c.nsp_head:
        heads += d * d + d + 2 * d + 2  # pooler (tanh) and classifier
    total = emb + other + blocks + heads
    return dict(total=total, embedding=emb, non_embedding=total - emb, active=total - inactive,
                active_non_embedding=total - emb - inactive)
