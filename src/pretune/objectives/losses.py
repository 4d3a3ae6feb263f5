"""The objectives, named as in the papers.

L1   next-token log-likelihood (Radford et al. 2018, eq. 1)
MLM  masked-LM: 15% of tokens, 80% [MASK] / 10% random / 10% unchanged (Devlin et al. 2019, sec. 3.1)
NSP  next-sentence prediction on the pooled [CLS]
L2   log-likelihood of the label (Radford et al. 2018, eq. 4)
L3   L2 + lambda * L1 (Radford et al. 2018, eq. 5; lambda = 0.5 there)

Losses are means over the predicted positions; IGNORE marks positions that
predict nothing (padding, unmasked tokens). Which of them a run minimises is its
objective's entry in objectives/registry.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_cross_entropy import IGNORE, linear_cross_entropy
from .masking import mlm_rows


def weighted(batch: dict, name: str, value: torch.Tensor) -> torch.Tensor:
    """A term's mean as its share of the global mean: value * n_local * W / N, the scale the
    data-parallel step put in batch["loss_scale"] (training/distributed.py: loss_scales); the
    mean itself at one process and one micro-batch (no scale given)."""
    s = batch.get("loss_scale")
    return value if s is None else value * s.get(name, 1.0)


def loss_counts(batch: dict) -> dict[str, torch.Tensor]:
    """How many things each loss term of `batch` predicts (its mean's denominator), counted on the
    CPU from the batch before the step (0-dim tensors: no host sync): l1 target tokens, mlm masked
    tokens, nsp pairs, l2 labelled examples. A term's global mean is sum(n * mean) / sum(n) over
    micro-batches and ranks."""
    out = {}

    def n(t):
        return torch.tensor(t.numel())
    if "lengths" in batch and batch.get("void"):  # a stand-in row (data/encoding.py): it predicts nothing
        return {k: torch.tensor(0) for k in ("l2", "l1", *(("mlm",) if "mlm_labels" in batch else ()))}
    if "lengths" in batch:  # a classification batch (data/encoding.py)
        out["l2"] = n(batch["labels"])
        out["l1"] = (shift_targets(batch["input_ids"], batch["attention_mask"]) != IGNORE).sum()
        if "mlm_labels" in batch:
            out["mlm"] = (batch["mlm_labels"] != IGNORE).sum()
        return out
    if "targets" in batch:
        out["l1"] = (batch["targets"] != IGNORE).sum()
    if "labels" in batch:
        out["mlm"] = (batch["labels"] != IGNORE).sum()
    if "nsp_labels" in batch:
        out["nsp"] = n(batch["nsp_labels"])
    return out


def l1_loss(model, input_ids, targets, attention_mask=None) -> torch.Tensor:
    """L1 = -sum_i log P(u_i | u_{i-k}..u_{i-1}), as a mean over the target tokens.
    `targets` are the inputs shifted left by one, IGNORE where there is none."""
    return next_token_loss(model, model(input_ids, attention_mask=attention_mask), targets)


def next_token_loss(model, h, targets) -> torch.Tensor:
    """L1 from h_n already computed (L3 reuses the classifier's forward pass)."""
    V, head = model.config.vocab_size, model.lm_head
    dev = h.device.type
    plain = isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.dtype == torch.float32
    if plain and h.dtype == torch.float32 and not torch.is_autocast_enabled(dev):
        # the same value without the (N, V) logits: linear_cross_entropy.py
        return linear_cross_entropy(h, head.weight[:V], targets)  # the padding rows are not tokens
    if plain and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        # bf16 autocast: the same products autocast would run, the softmax and loss in fp32, no (N, V) tensor
        with torch.autocast(dev, enabled=False):
            return linear_cross_entropy(h.to(torch.bfloat16), head.weight[:V].to(torch.bfloat16), targets)
    logits = model.logits(h)[..., :V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def shift_targets(input_ids, attention_mask=None) -> torch.Tensor:
    """Next-token targets for a padded batch: u_{i+1} at position i, IGNORE past the last real token."""
    t = torch.full_like(input_ids, IGNORE)
    t[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        nxt = torch.zeros_like(attention_mask, dtype=torch.bool)
        nxt[:, :-1] = attention_mask[:, 1:].bool()
        t = t.masked_fill(~nxt, IGNORE)  # not t[~nxt] = ...: a boolean index waits for the device
    return t


def mlm_loss(model, h, labels, rows=None) -> torch.Tensor:
    """Cross-entropy at the masked positions only: the MLM head runs on those
    rows alone (about 15% of them), not on every position. `rows`: mlm_rows(labels),
    computed here if not given. A batch without a masked position (mlm_mask never
    makes one from text) gives 0, still a graph for backward, not the NaN of a
    mean over nothing."""
    rows = mlm_rows(labels) if rows is None else rows
    logits = model.logits(h.reshape(-1, h.shape[-1]).index_select(0, rows))[:, :model.config.vocab_size]
    if logits.shape[0] == 0:
        return logits.float().sum()
    return F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, rows))


def nsp_loss(model, h, nsp_labels) -> torch.Tensor:
    """Is B the sentence that followed A? 0 = IsNext, 1 = NotNext (BERT's convention)."""
    return F.cross_entropy(model.nsp_head(h).float(), nsp_labels)


def mlm_nsp_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """BERT pre-training: MLM + NSP on one batch of sentence pairs."""
    h = model(batch["input_ids"], segment_ids=batch.get("segment_ids"), attention_mask=batch.get("attention_mask"))
    mlm = weighted(batch, "mlm", mlm_loss(model, h, batch["labels"], batch.get("mlm_rows")))
    parts = {"mlm": mlm}
    loss = mlm
    if model.nsp_head is not None and "nsp_labels" in batch:
        nsp = weighted(batch, "nsp", nsp_loss(model, h, batch["nsp_labels"]))
        parts["nsp"] = nsp
        loss = loss + nsp
    return loss, parts


def l2_loss(class_logits, labels) -> torch.Tensor:
    """L2 = sum log P(y | x^1..x^m): cross-entropy of the label."""
    return F.cross_entropy(class_logits.float(), labels)


def label_loss(kind: str, logits, labels) -> torch.Tensor:
    """L2 for each kind of label (models/heads.py LABEL_KINDS): -log P(y | x) of one class (single),
    the squared error of a number (regression), binary cross-entropy per class (multi-label)."""
    if kind == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return l2_loss(logits, labels)


def l3_loss(l2: torch.Tensor, l1: torch.Tensor | float, lam: float) -> torch.Tensor:
    """L3 = L2 + lambda * L1."""
    return l2 + lam * l1
