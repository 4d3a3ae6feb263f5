"""Counting from the config alone (no weights allocated): parameters by part."""

from __future__ import annotations

from ..config.model import ModelConfig


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
