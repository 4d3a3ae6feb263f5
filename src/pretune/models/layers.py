"""The Transformer's layers: norms, activations, rotary positions (the module; the kind is in
positions.py), the KV cache, attention, the MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.model import ModelConfig


def Norm(c: ModelConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return nn.RMSNorm(c.d_model, eps=c.norm_eps)
    return nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.bias)


def activation(kind: str):
    # GPT uses the tanh approximation of GELU (Hendrycks & Gimpel 2016); BERT the exact erf form.
    if kind == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class RotaryEmbedding(nn.Module):
    """Rotary positions (Su et al. 2021), in the half-split layout of Llama / HF.
    `scaling` > 1 is position interpolation (Chen et al. 2023): positions are
    divided by it, so a window `scaling` times longer maps into the trained range."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.head_dim, self.theta, self.scaling = c.head_dim, c.rope_theta, c.rope_scaling
        self._build(c.max_seq_len)

    def _build(self, n: int):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        t = torch.arange(n, dtype=torch.float32) / self.scaling
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T, hd); pos: (T,) absolute positions
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """A static key/value cache: preallocated once, written in place (no concatenation per token)."""

    def __init__(self, c: ModelConfig, batch: int, length: int, device, dtype):
        shape = (batch, c.kv_heads, length, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        self.pos = 0  # tokens already written
        self.length = length


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention through SDPA."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.d_model, (c.n_head + 2 * c.kv_heads) * c.head_dim, bias=c.bias)
        self.proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=c.bias)
        self.proj.residual_scale = True  # GPT-2 init: std / sqrt(2 n_layer), if the config asks
        self.dropout = c.dropout

    def forward(self, x, rotate=None, pos=None, mask=None, cache: KVCache | None = None, layer: int = 0,
                bias=None):
        """`rotate(q, k, pos)` and `bias` (an additive score bias, H or 1 x T x S) come from the
        model's position kind (positions.py); None: nothing to do."""
        c = self.c
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if rotate is not None:
            q, k = rotate(q, k, pos)
        is_causal = c.causal and mask is None
        out_dtype = q.dtype
        if cache is not None:
            start = cache.pos
            if cache.k[layer].dtype != q.dtype:  # an fp32 cache under bf16 weights (quantize.cache_dtype)
                q = q.to(cache.k[layer].dtype)
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            if start > 0:
                is_causal = False
                if T > 1 and mask is None:  # a chunk after a prefix: query i sees keys <= start + i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        if bias is not None:  # one float mask: the bias where a key may be seen, -inf where not
            S = k.shape[2]
            if mask is None and is_causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            bias = bias.to(q.dtype)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=c.kv_heads != c.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim).to(out_dtype))


class MLP(nn.Module):
    """The position-wise feed-forward layer: d -> d_ff -> d (GELU), or SwiGLU (Shazeer 2020)."""

    def __init__(self, c: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or c.ffn_dim
        self.glu = c.mlp == "swiglu"
        self.fc = nn.Linear(c.d_model, (2 if self.glu else 1) * d_ff, bias=c.bias)
        self.proj = nn.Linear(d_ff, c.d_model, bias=c.bias)
        self.proj.residual_scale = True
        self.act = activation(c.mlp)

    def forward(self, x):
        if self.glu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(self.act(self.fc(x)))
