"""Heads on top of h_n: BERT's masked-LM and next-sentence heads, and the fine-tuning classifier
(Radford et al. 2018, eq. 3; Devlin et al. 2019, sec. 4.1) with its pooling of the sequence."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config.model import ModelConfig
from .layers import Norm, activation


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


# ---- the model -------------------------------------------------------------------

POOLS = ("last", "cls", "mean")


def default_pool(causal: bool) -> str:
    """Each paper's own: GPT reads the last token, BERT the pooled [CLS]."""
    return "last" if causal else "cls"


class ClassificationHead(nn.Module):
    """softmax(h_l^m W_y) over a summary of h_n: the last real token (decoder), the pooled
    [CLS] (encoder), or the mean over the real tokens (either)."""

    def __init__(self, d_model: int, n_classes: int, pool: str, dropout: float = 0.1):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(pool)
        self.pool = pool
        self.pooler = nn.Linear(d_model, d_model) if pool == "cls" else None  # BERT's pooler, tanh
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_classes)  # W_y
        for m in (self.pooler, self.out):
            if m is not None:
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def summary(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per sequence; padding is on the right, so the real tokens are h[:, :length]."""
        if self.pool == "last":
            return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        if self.pool == "mean":
            real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
            return (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return torch.tanh(self.pooler(h[:, 0]))

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes); softmax of them is P(y | x)."""
        return self.out(self.drop(self.summary(h, lengths)))


class Classifier(nn.Module):
    """The Transformer (`body`) and its classification head; saved together as one safetensors file."""

    def __init__(self, body: nn.Module, n_classes: int, head_dropout: float = 0.1, pool: str | None = None):
        super().__init__()
        self.body = body
        c = body.config
        self.head = ClassificationHead(c.d_model, n_classes, pool or default_pool(c.causal), head_dropout)

    @property
    def config(self) -> ModelConfig:
        return self.body.config

    def forward(self, input_ids, attention_mask, lengths, segment_ids=None, padded: bool | None = None):
        """(class logits, h_n). `padded`: whether any row is padded, known on the host from the batch
        (`data.encoding.collate`); without it the mask is read, a host sync."""
        if padded is None:
            padded = not bool(attention_mask.all())
        mask = attention_mask if padded else None  # no padding: the fast causal path
        h = self.body(input_ids, segment_ids=segment_ids, attention_mask=mask)
        return self.head(h, lengths), h

    def moe_losses(self):
        return self.body.moe_losses()
