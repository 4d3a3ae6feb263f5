"""The fine-tuning objectives as a loss function for the Trainer: L2, and L3 = L2 + lambda * L1
(Radford et al. 2018, eq. 4-5; MLM in place of L1 for an encoder). The entries are in
objectives/registry.py; L3's auxiliary term is that of the body's pre-training objective."""

from __future__ import annotations

from .registry import Objective, get


OBJECTIVES = ("L2", "L3")  # the built-in ones; registry.names("finetune") lists any registered since


def finetune_loss(objective: str = "L2", lam: float = 0.5, body_objective: Objective | None = None):
    """loss_fn(model, batch) -> (loss, parts) for the Trainer: L2, or L3 = L2 + lam * the LM term of
    `body_objective` (default: the body's own, `registry.pretraining_objective`)."""
    return get(objective, "finetune").build(lam, body_objective)
