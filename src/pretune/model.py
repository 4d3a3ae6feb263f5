"""The Transformer of GPT and BERT, in the papers' own equations.

    h_0  = U W_e + W_p                  token embedding + position (+ segment, for BERT)
    h_i  = block(h_{i-1}),  1 <= i <= n
    P(u) = softmax(h_n W_e^T)           the output reuses the input embedding

`causal=True` is the GPT decoder, `causal=False` the BERT encoder. Everything
else that differs (norm placement and kind, positions, MLP kind, KV heads,
bias, tying, experts) is a `ModelConfig` field.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config.model import ModelConfig


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

    def forward(self, x, rope=None, pos=None, mask=None, cache: KVCache | None = None, layer: int = 0):
        c = self.c
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, pos), rope(k, pos)
        is_causal = c.causal and mask is None
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            if start > 0:
                is_causal = False
                if T > 1 and mask is None:  # a chunk after a prefix: query i sees keys <= start + i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=c.kv_heads != c.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


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


class Block(nn.Module):
    """Attention then feed-forward, each in a residual branch.
    post-LN (GPT-1, BERT): x = LN(x + f(x)); pre-LN (GPT-2/3): x = x + f(LN(x))."""

    def __init__(self, c: ModelConfig, i: int):
        super().__init__()
        self.pre = c.norm_placement == "pre"
        self.norm1, self.attn = Norm(c), Attention(c)
        self.norm2 = Norm(c)
        self.routed = c.is_moe_block(i)
        if self.routed:
            from .moe import MoE
            self.mlp = MoE(c)
        else:
            self.mlp = MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def ff(self, x, tokens=None):
        """The feed-forward branch; routed experts see the token mask, so padding takes no expert's slot."""
        return self.mlp(x, tokens) if self.routed else self.mlp(x)

    def forward(self, x, rope=None, pos=None, mask=None, cache=None, layer=0, tokens=None):
        """`tokens` (B, T): True at real tokens, for a routed feed-forward layer (moe.py)."""
        if self.pre:
            x = x + self.drop(self.attn(self.norm1(x), rope, pos, mask, cache, layer))
            return x + self.drop(self.ff(self.norm2(x), tokens))
        x = self.norm1(x + self.drop(self.attn(x, rope, pos, mask, cache, layer)))
        return self.norm2(x + self.drop(self.ff(x, tokens)))


class MLMHead(nn.Module):
    """BERT's masked-LM head: transform (dense, GELU, LayerNorm), then the tied decoder plus a bias."""

    def __init__(self, c: ModelConfig, W_e: nn.Parameter | None):
        super().__init__()
        self.dense, self.act, self.norm = nn.Linear(c.d_model, c.d_model), activation(c.mlp), Norm(c)
        self.decoder = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
        if W_e is not None:
            self.decoder.weight = W_e  # https://paperswithcode.com/method/weight-tying
        self.bias = nn.Parameter(torch.zeros(c.padded_vocab_size))

    def forward(self, h):
        return self.decoder(self.norm(self.act(self.dense(h)))) + self.bias


class Pooler(nn.Module):
    """BERT's pooled [CLS]: tanh(h_[CLS] W + b)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(c.d_model, c.d_model)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class NSPHead(nn.Module):
    """Next-sentence prediction: pooled [CLS] -> IsNext / NotNext."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.pooler, self.classifier = Pooler(c), nn.Linear(c.d_model, 2)

    def forward(self, h):
        return self.classifier(self.pooler(h))


class Transformer(nn.Module):
    """The backbone (embeddings and n blocks) and the pre-training heads the config asks for."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.padded_vocab_size, c.d_model)  # W_e
        self.wpe = nn.Embedding(c.max_seq_len, c.d_model) if c.position == "learned" else None  # W_p
        self.wse = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None  # segments
        self.emb_norm = Norm(c) if c.embedding_norm else None
        self.drop = nn.Dropout(c.dropout)
        self.rope = RotaryEmbedding(c) if c.position == "rotary" else None
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = Norm(c) if c.norm_placement == "pre" else None
        tied = self.wte.weight if c.tie_embeddings else None
        self.lm_head = None
        if c.lm_head and c.causal:
            self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
            if tied is not None:
                self.lm_head.weight = tied  # https://paperswithcode.com/method/weight-tying
        elif c.lm_head:
            self.lm_head = MLMHead(c, tied)
        self.nsp_head = NSPHead(c) if c.nsp_head else None
        self.apply(self._init)

    def _init(self, m: nn.Module):
        # N(0, 0.02) everywhere (GPT-1, GPT-2, BERT); GPT-2 also scales the residual projections by
        # 1/sqrt(2 n_layer) (Radford et al. 2019, sec. 2.3), GPT-1 and BERT do not (`residual_scale_init`)
        std = 0.02
        if isinstance(m, nn.Linear):
            scaled = getattr(m, "residual_scale", False) and self.config.residual_scaled
            s = std / math.sqrt(2 * self.config.n_layer) if scaled else std
            if m.weight is not self.wte.weight:
                nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once

    def forward(self, idx, segment_ids=None, attention_mask=None, cache: KVCache | None = None):
        """h_n for token ids `idx` (B, T). `attention_mask` (B, T) is True at real
        tokens; padding is never attended to. With a `cache`, idx continues it."""
        c = self.config
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.max_positions:
            from .errors import PretuneError
            raise PretuneError(f"sequence of {start + T} tokens exceeds the model's window of "
                               f"{self.max_positions}", None, "shorten the input or extend the window")
        pos = torch.arange(start, start + T, device=idx.device)
        h = self.wte(idx)  # h_0 = U W_e + W_p
        if self.wpe is not None:
            h = h + self.wpe(pos)
        if self.wse is not None:
            h = h + self.wse(segment_ids if segment_ids is not None else torch.zeros_like(idx))
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        h = self.drop(h)
        mask = tokens = None
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            if c.causal:
                keys = keys & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = keys
            if c.n_expert and attention_mask.shape == idx.shape:
                tokens = attention_mask.bool()  # routers skip the padding
        for i, block in enumerate(self.blocks):  # h_i = block(h_{i-1})
            h = block(h, self.rope, pos, mask, cache, i, tokens)
        if self.norm_f is not None:
            h = self.norm_f(h)
        if cache is not None:
            cache.pos += T
        return h

    @property
    def max_positions(self) -> int:
        if self.rope is not None:
            return self.rope.cos.shape[0]
        return self.wpe.num_embeddings

    def logits(self, h):
        """P(u) = softmax(h_n W_e^T): next-token logits (decoder) or MLM logits (encoder)."""
        return self.lm_head(h)

    def moe_losses(self) -> torch.Tensor | float:
        """The routers' auxiliary losses from the last forward pass (0 for a dense model)."""
        losses = [b.mlp.aux_loss for b in self.blocks if hasattr(b.mlp, "aux_loss")]
        return sum(losses) if losses else 0.0

    def extend_window(self, n: int) -> None:
        """Use a window of n > max_seq_len tokens (the GPT-4 lecture's 8K -> 32K).
        Learned positions: the new rows copy the trained table cyclically, as
        done to extend BERT/Longformer (Beltagy et al. 2020). Rotary: position
        interpolation, positions scaled by max_seq_len / n (Chen et al. 2023)."""
        c = self.config
        if n <= self.max_positions:
            return
        if self.wpe is not None:
            old = self.wpe.weight.data
            new = nn.Embedding(n, c.d_model).to(old.device, old.dtype)
            reps = (n + old.shape[0] - 1) // old.shape[0]
            new.weight.data.copy_(old.repeat(reps, 1)[:n])
            self.wpe = new
        else:
            self.rope.scaling = c.rope_scaling * n / c.max_seq_len
            self.rope._build(n)
            self.rope.to(self.wte.weight.device)
        self.config = c.replace(max_seq_len=n, rope_scaling=self.rope.scaling if self.rope else c.rope_scaling)
