"""ModelConfig: one dataclass for every shape of GPT and BERT, and the named presets.

Every choice that differs between the families is a field here, never a
subclass: the same `Transformer` builds GPT-1 (post-LN, learned positions),
GPT-2/3 (pre-LN), BERT (bidirectional, segments, embedding LayerNorm) and
Llama-style models (RMSNorm, rotary, SwiGLU, grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import PretuneError


NORMS = ("layernorm", "rmsnorm")


PLACEMENTS = ("pre", "post")


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
    position: str = "learned"  # learned | rotary (models/positions.py POSITIONS, which checks it)
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
    tokenizer: str = "gpt2"  # the vocabulary this shape expects (see data/tokenizers.py)
    # how the family initialises and trains (None: the family's, by shape; training_recipes.py)
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
        """The recipe this model trains by: the field, else the family's by shape (training_recipes.py)."""
        from .training_recipes import recipe_name
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
        # `position` is checked by its kind (models/positions.py), above this layer: when built or counted
        for f, allowed in (("norm", NORMS), ("norm_placement", PLACEMENTS), ("mlp", MLPS)):
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
            from .training_recipes import RECIPES
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

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
