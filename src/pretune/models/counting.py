"""Counting from the config alone (no weights allocated): parameters by part."""

from __future__ import annotations

from ..config.model import ModelConfig
from . import positions


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
    pk = positions.get(c)  # the position kind's own count (learned: the max_seq_len x d table)
    emb = V * d + (pk.n_params(c) if pk.embedding else 0) + c.type_vocab_size * d
    other = (_norm_params(c) if c.embedding_norm else 0) + (0 if pk.embedding else pk.n_params(c))

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


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------

def flop_params(cfg: ModelConfig) -> int:
    """N of 6·N·D: the weights one token multiplies through (active non-embedding + output projection)."""
    p = count_params(cfg)
    out = cfg.padded_vocab_size * cfg.d_model if cfg.lm_head else 0
    return p["active_non_embedding"] + out


def d_attn(cfg: ModelConfig) -> int:
    return cfg.n_head * cfg.head_dim


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, predicted: float = 1.0) -> float:
    """Model FLOPs per trained token, 6·N + 12·L·T·d_attn (PaLM app. B): what MFU is counted in.

    predicted: the fraction of positions the LM head runs on. 1 for L1; for masked-LM 0.15,
    since only the masked positions need the head (BERT's own code gathers them, as
    objectives.mlm_loss does), so the head's 6·(V·d + d²) counts at that fraction.
    Recomputed activations are not counted (that would be hardware FLOPs, HFU)."""
    T = seq_len or cfg.max_seq_len
    head = 0
    if cfg.lm_head:
        head = cfg.padded_vocab_size * cfg.d_model + (0 if cfg.causal else cfg.d_model * cfg.d_model)
    n = flop_params(cfg) - head * (1.0 - predicted)
    return 6.0 * n + 12.0 * cfg.n_layer * T * d_attn(cfg)


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int | None = None) -> dict[str, float]:
    """{'six_nd', 'attention', 'total', 'n', 'per_token'} for `tokens` training tokens."""
    T = seq_len or cfg.max_seq_len
    n = flop_params(cfg)
    six_nd = 6.0 * n * tokens
    attn = 12.0 * cfg.n_layer * T * d_attn(cfg) * tokens
    return {"n": n, "six_nd": six_nd, "attention": attn, "total": six_nd + attn,
            "per_token": (six_nd + attn) / tokens, "seq_len": T}


def inference_flops_per_token(cfg: ModelConfig, context: int | None = None) -> dict[str, float]:
    """Forward FLOPs to generate one token with `context` tokens already in the KV cache."""
    c = cfg.max_seq_len if context is None else context
    weights = 2.0 * flop_params(cfg)
    attn = 4.0 * cfg.n_layer * c * d_attn(cfg)
    return {"weights": weights, "attention": attn, "total": weights + attn, "context": c}
