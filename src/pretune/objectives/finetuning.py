"""The fine-tuning objectives as a loss function for the Trainer: L2, and L3 = L2 + lambda * L1
(Radford et al. 2018, eq. 4-5; MLM in place of L1 for an encoder)."""

from __future__ import annotations

import torch

from ..errors import PretuneError
from .losses import l2_loss, l3_loss, mlm_loss, next_token_loss, shift_targets


OBJECTIVES = ("L2", "L3")


def finetune_loss(objective: str = "L2", lam: float = 0.5):
    """loss_fn(model, batch) -> (loss, parts) for the Trainer: L2, or L3 = L2 + lam * L1 (MLM for an encoder)."""
    if objective not in OBJECTIVES:
        raise PretuneError(f"unknown objective '{objective}'", None, "use L2 or L3")

    def loss_fn(model, batch):
        logits, h = model(batch["input_ids"], batch["attention_mask"], batch["lengths"], batch.get("segment_ids"),
                          padded=batch.get("padded"))
        l2 = l2_loss(logits, batch["labels"])
        parts = {"l2": l2}
        loss = l2
        aux = model.moe_losses()
        if objective == "L3":
            body = model.body
            if body.config.causal:  # L1 on the labelled sequence, from the same h_n
                targets = shift_targets(batch["input_ids"], batch["attention_mask"])
                lm = next_token_loss(body, h, targets)
                parts["l1"] = lm
            else:  # MLM on a masked copy of the labelled sequence
                h2 = body(batch["mlm_input_ids"], segment_ids=batch.get("segment_ids"),
                          attention_mask=batch["attention_mask"])
                lm = mlm_loss(body, h2, batch["mlm_labels"], batch.get("mlm_rows"))
                parts["mlm"] = lm
                aux = aux + model.moe_losses()
            loss = l3_loss(l2, lm, lam)
        if torch.is_tensor(aux):
            parts["moe_aux"] = aux
            loss = loss + aux
        return loss, parts

    return loss_fn
