"""Heads on top of h_n, by name in `HEADS`: the next-token head, BERT's masked-LM and next-sentence
heads, and the fine-tuning classifier (Radford et al. 2018, eq. 3; Devlin et al. 2019, sec. 4.1);
and the pooling of a sequence into one vector, defined once (`POOLINGS`, `pool`, `default_pooling`)
for the classifier and for `inference.embed`. To add a pooling: one `Pooling` and `register_pooling`;
a head: its module and one `HEADS` entry."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..config.model import ModelConfig
from ..errors import PretuneError
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


# ---- pooling: one summary vector per sequence, defined once ----------------------------
# Read by the classification head and by `inference.embed`. Padding is on the right, so the
# real tokens of row b are h[b, :lengths[b]].

def _last(h, lengths):
    """h_n at the last real token: the only one a decoder's causal mask lets see the whole text."""
    return h[torch.arange(h.shape[0], device=h.device), lengths - 1]


def _cls(h, lengths):
    """h_n at [CLS], the first token (raw: BERT's tanh pooler is the classification head's, not the pooling's)."""
    return h[:, 0]


def _mean(h, lengths):
    """The mean of h_n over the real tokens, padding excluded (Reimers & Gurevych 2019, sec. 3)."""
    real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
    return (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)


@dataclass(frozen=True)
class Pooling:
    name: str
    summary: Callable  # (h (B, T, d), lengths (B,)) -> (B, d)
    encoder_only: bool = False  # a decoder's first token has seen only itself


POOLINGS: dict[str, Pooling] = {}


def register_pooling(p: Pooling) -> Pooling:
    POOLINGS[p.name] = p
    return p


for _p in (Pooling("mean", _mean), Pooling("cls", _cls, encoder_only=True), Pooling("last", _last)):
    register_pooling(_p)


def check_pooling(kind: str, causal: bool, option: str = "--pooling", where: str | None = None) -> Pooling:
    """The pooling `kind` names, for a decoder (`causal`) or an encoder; a one-line error otherwise."""
    p = POOLINGS.get(kind)
    if p is None:
        near = difflib.get_close_matches(str(kind), POOLINGS, n=1)
        raise PretuneError(f"unknown pooling '{kind}'", where,
                           (f"did you mean '{near[0]}'? " if near else "") + f"use one of {', '.join(POOLINGS)}")
    if p.encoder_only and causal:
        others = " or ".join(f"{option} {n}" for n, q in POOLINGS.items() if not q.encoder_only)
        raise PretuneError(f"a decoder has no [{kind.upper()}] summary (its first token sees only itself)", where,
                           f"use {others}")
    return p


def pool(h: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, d): the `kind` summary of h_n (B, T, d), with `lengths` (B,) real tokens per row."""
    return check_pooling(kind, False).summary(h, lengths)


def default_pooling(causal: bool, purpose: str) -> str:
    """The one rule for a pooling left unset. "classify": each paper's own readout, GPT's last
    token and BERT's [CLS] (through its tanh pooler, the head's). "embed": a sentence vector,
    the last token of a decoder, the mean of an encoder (Sentence-BERT)."""
    if purpose not in ("classify", "embed"):
        raise ValueError(purpose)
    return "last" if causal else ("cls" if purpose == "classify" else "mean")


# ---- the classification head ---------------------------------------------------------

# What a label is, and so what the head outputs and how it reads as a prediction:
# single      one class of K: softmax over K logits (Radford et al. 2018, eq. 3)
# regression  a number: one scalar output, read as it is (trained with MSE)
# multi       any subset of K classes: K independent sigmoids (trained with binary cross-entropy)
LABEL_KINDS = ("single", "regression", "multi")


class ClassificationHead(nn.Module):
    """softmax(h_l^m W_y) over a summary of h_n (`pool`): the last real token (decoder), [CLS]
    through BERT's tanh pooler (encoder), or the mean over the real tokens (either). `kind`
    (LABEL_KINDS) makes it a scalar (regression) or sigmoid (multi-label) head; `bias`: whether
    W_y has one (Hugging Face's decoder classes, GPT2/LlamaForSequenceClassification, have none)."""

    @staticmethod
    def has_pooler(pool_kind: str) -> bool:
        """BERT's pooler, tanh(h W_p + b_p), sits on [CLS] (Devlin et al. 2019, sec. 4.1) and only there."""
        return pool_kind == "cls"

    def __init__(self, d_model: int, n_classes: int, pool: str, dropout: float = 0.1, kind: str = "single",
                 bias: bool = True):
        super().__init__()
        if pool not in POOLINGS or kind not in LABEL_KINDS:
            raise ValueError((pool, kind))
        self.pool, self.kind = pool, kind
        self.pooler = nn.Linear(d_model, d_model) if self.has_pooler(pool) else None  # BERT's pooler, tanh
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, 1 if kind == "regression" else n_classes, bias=bias)  # W_y
        for m in (self.pooler, self.out):
            if m is not None:
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def summary(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per sequence: the pooling, then the pooler where there is one."""
        v = pool(h, lengths, self.pool)
        return torch.tanh(self.pooler(v)) if self.pooler is not None else v

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes) (regression: (B, 1)); `predictions` turns them into P(y | x)."""
        return self.out(self.drop(self.summary(h, lengths)))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """P(y | x) (single: softmax; multi: one sigmoid per class) or the predicted number (regression)."""
        logits = logits.float()
        if self.kind == "regression":
            return logits
        return logits.sigmoid() if self.kind == "multi" else logits.softmax(-1)


# ---- the heads, by name --------------------------------------------------------------

def _next_token(c: ModelConfig, tied=None) -> nn.Module:
    """P(u) = softmax(h_n W_e^T): the output matrix, W_e itself when tied."""
    head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
    if tied is not None:
        head.weight = tied  # https://paperswithcode.com/method/weight-tying
    return head


# name -> build(c, tied W_e or None): the module the Transformer installs (at `lm_head`, `nsp_head`)
# or the classifier (at `head`); their parameter counts are models.counting's (torch-free).
HEADS: dict[str, Callable] = {
    "next-token": _next_token,
    "mlm": MLMHead,
    "nsp": lambda c, tied=None: NSPHead(c),
    "classification": lambda c, tied=None, n_classes=2, pool=None, dropout=0.1, bias=True: ClassificationHead(
        c.d_model, n_classes, pool or default_pooling(c.causal, "classify"), dropout, "single", bias),
    # a scalar head for a number (regression, MSE) and K sigmoids for a set of labels (multi-label, BCE)
    "regression": lambda c, tied=None, n_classes=1, pool=None, dropout=0.1, bias=True: ClassificationHead(
        c.d_model, 1, pool or default_pooling(c.causal, "classify"), dropout, "regression", bias),
    "multi-label": lambda c, tied=None, n_classes=2, pool=None, dropout=0.1, bias=True: ClassificationHead(
        c.d_model, n_classes, pool or default_pooling(c.causal, "classify"), dropout, "multi", bias),
}

HEAD_OF_KIND = {"single": "classification", "regression": "regression", "multi": "multi-label"}


def register_head(name: str, build: Callable) -> None:
    HEADS[name] = build


def lm_head_kind(c: ModelConfig) -> str:
    """The LM head a config asks for: next-token for a decoder, masked-LM for an encoder."""
    return "next-token" if c.causal else "mlm"


def build_head(name: str, c: ModelConfig, tied=None, **kw) -> nn.Module:
    if name not in HEADS:
        near = difflib.get_close_matches(str(name), HEADS, n=1)
        raise PretuneError(f"unknown head '{name}'", None,
                           (f"did you mean '{near[0]}'? " if near else "") + f"use one of {', '.join(HEADS)}")
    return HEADS[name](c, tied, **kw)


# ---- the model -------------------------------------------------------------------

class Classifier(nn.Module):
    """The Transformer (`body`) and its classification head; saved together as one safetensors file."""

    def __init__(self, body: nn.Module, n_classes: int, head_dropout: float = 0.1, pool: str | None = None,
                 kind: str = "single", bias: bool = True):
        super().__init__()
        self.body = body
        c = body.config
        self.head = build_head(HEAD_OF_KIND[kind], c, n_classes=n_classes, pool=pool, dropout=head_dropout, bias=bias)

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
