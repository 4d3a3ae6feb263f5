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

from ..config.model import ModelConfig
from . import positions
from .heads import build_head, lm_head_kind
from .layers import MLP, Attention, KVCache, Norm


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

    def forward(self, x, rotate=None, pos=None, mask=None, cache=None, layer=0, tokens=None, bias=None):
        """`tokens` (B, T): True at real tokens, for a routed feed-forward layer (moe.py);
        `rotate`, `bias`: the position kind's, for attention (positions.py)."""
        if self.pre:
            x = x + self.drop(self.attn(self.norm1(x), rotate, pos, mask, cache, layer, bias))
            return x + self.drop(self.ff(self.norm2(x), tokens))
        x = self.norm1(x + self.drop(self.attn(x, rotate, pos, mask, cache, layer, bias)))
        return self.norm2(x + self.drop(self.ff(x, tokens)))


class Transformer(nn.Module):
    """The backbone (embeddings and n blocks) and the pre-training heads the config asks for."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.padded_vocab_size, c.d_model)  # W_e
        self.position = positions.get(c)  # the kind (a class, no state); its module, if any, at its attribute
        if self.position.attribute:
            setattr(self, self.position.attribute, self.position.build(c))  # W_p at `wpe`, rotary at `rope`
        self.wse = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None  # segments
        self.emb_norm = Norm(c) if c.embedding_norm else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = Norm(c) if c.norm_placement == "pre" else None
        tied = self.wte.weight if c.tie_embeddings else None
        self.lm_head = build_head(lm_head_kind(c), c, tied) if c.lm_head else None  # next-token or MLM
        self.nsp_head = build_head("nsp", c) if c.nsp_head else None
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
            from ..errors import PretuneError
            raise PretuneError(f"sequence of {start + T} tokens exceeds the model's window of "
                               f"{self.max_positions}", None, "shorten the input or extend the window")
        pos = torch.arange(start, start + T, device=idx.device)
        h = self.position.embed(self.position_module, self.wte(idx), pos)  # h_0 = U W_e + W_p
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
        bias = self.position.bias(self.position_module, c, pos, start + T)
        rotate = self._rotate if self.position.rotates() else None
        for i, block in enumerate(self.blocks):  # h_i = block(h_{i-1})
            h = block(h, rotate, pos, mask, cache, i, tokens, bias)
        if self.norm_f is not None:
            h = self.norm_f(h)
        if cache is not None:
            cache.pos += T
        return h

    @property
    def position_module(self) -> nn.Module | None:
        """The position kind's module (W_p, the rotary tables), or None."""
        return getattr(self, self.position.attribute) if self.position.attribute else None

    def _rotate(self, q, k, pos):
        return self.position.rotate(self.position_module, q, k, pos)

    def embedding_modules(self) -> list[nn.Module]:
        """What `--freeze embeddings` freezes: W_e, a position table, the segment table, the embedding norm."""
        pe = self.position_module if self.position.embedding else None
        return [m for m in (self.wte, pe, self.wse, self.emb_norm) if m is not None]

    @property
    def max_positions(self) -> int:
        return self.position.max_positions(self.position_module, self.config)

    def logits(self, h):
        """P(u) = softmax(h_n W_e^T): next-token logits (decoder) or MLM logits (encoder)."""
        return self.lm_head(h)

    def moe_losses(self) -> torch.Tensor | float:
        """The routers' auxiliary losses from the last forward pass (0 for a dense model)."""
        losses = [b.mlp.aux_loss for b in self.blocks if hasattr(b.mlp, "aux_loss")]
        return sum(losses) if losses else 0.0

    def extend_window(self, n: int) -> None:
        """Use a window of n > max_seq_len tokens (the GPT-4 lecture's 8K -> 32K).
        Each position kind says how (`Position.extend`): learned positions copy the trained
        table cyclically (Beltagy et al. 2020), rotary interpolates (Chen et al. 2023)."""
        if n <= self.max_positions:
            return
        m, self.config = self.position.extend(self.position_module, self.config, n)
        if self.position.attribute:
            setattr(self, self.position.attribute, m)
